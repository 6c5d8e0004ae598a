"""Context parallel glue (parallelism.cp, cp_rotate): collectives/ring_attention.py in the layout.

Each cp rank keeps its load-balanced part of every sequence, with its tokens' global positions
for RoPE (layout.prepare); attention fetches the other cp ranks' keys and values (ops.attention:
a ring, or one all-gather). With document masking the per-row positions and document indices are
cut the same way (layout.prepare_documents), and the document indices themselves are the mask the
ring attends with (ops.document_mask passes them through). The cp ranks' gradients are summed like data parallel's (they saw
different tokens): by DDP over dp_replicate x cp, or by FSDP, which shards over dp_shard x cp.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from minititan.collectives import ring_attention
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.config import UserError
from minititan.layout.contract import Layout


def refuse(seq_len: int, cp: int) -> None:
    try:
        ring_attention.check_divisible(seq_len, cp)
    except ValueError as e:
        raise UserError(str(e)) from None


def apply(layout: Layout, mesh: Mesh, device: torch.device, seq_len: int, rotate: str) -> None:
    cp, cp_rank = mesh.size("cp"), mesh.local_rank("cp")
    positions = ring_attention.shard_positions(seq_len, cp_rank, cp, device)
    layout.prepare = functools.partial(shard_sequences, cp_rank=cp_rank, cp=cp, positions=positions)
    layout.prepare_documents = functools.partial(shard_documents, cp_rank=cp_rank, cp=cp)
    layout.ops.document_mask = model.identity
    layout.ops.attention = functools.partial(ring_attention.context_parallel_attention, group=mesh.group("cp"),
                                             rotate=rotate)


def shard_sequences(inputs: Tensor, labels: Tensor, cp_rank: int, cp: int,
                    positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """layout.prepare: this rank's part of each sequence of its rows, and the part's positions."""
    return (ring_attention.shard_sequence(inputs, cp_rank, cp), ring_attention.shard_sequence(labels, cp_rank, cp),
            positions)


def shard_documents(positions: Tensor, documents: Tensor, cp_rank: int, cp: int) -> tuple[Tensor, Tensor]:
    """layout.prepare_documents: this rank's part of the per-row positions and document indices."""
    return ring_attention.shard_sequence(positions, cp_rank, cp), ring_attention.shard_sequence(documents, cp_rank, cp)
