"""Tensor parallel glue (parallelism.tp, sequence_parallel, async_tp): collectives/tensor_parallel.py
driven by the model's tp plan (model.tp_shard_dim).

  boxes   each rank keeps its tp slice of every tensor the plan splits, and the rest whole
  apply   ops.into_tp / out_of_tp (Megatron's f and g, or sequence parallel's gather / scatter),
          the vocabulary-parallel embedding and loss, and under async TP the overlapped linear;
          under sequence parallel a gradient sum over tp for the tensors tp does not split (the
          norms; under MoE the router and experts too), since each tp rank saw part of each sequence
"""
from __future__ import annotations

import dataclasses
import functools

import torch.distributed as dist

from minititan.collectives import tensor_parallel as tpm
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.config import Model, UserError, hidden_dim
from minititan.layout.contract import Layout, Storage


def boxes(shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, list[list[int]]]:
    """[start, stop) per dim of each full tensor: this tp rank's slice (all of it for replicated tensors)."""
    tp, tp_rank = mesh.size("tp"), mesh.local_rank("tp")
    out = {}
    for name, shape in shapes.items():
        box = [[0, s] for s in shape]
        dim = model.tp_shard_dim(name)
        if dim is not None:
            n = shape[dim] // tp
            box[dim] = [tp_rank * n, (tp_rank + 1) * n]
        out[name] = box
    return out


def refuse(m: Model, tp: int, seq_len: int | None) -> None:
    """A UserError naming the fix if the model cannot be split tp ways; seq_len: the sequence one tp
    group sees, under sequence parallel only."""
    if m.qk_norm and seq_len is None:  # plain tp: nothing sums the per-head norms' partial grads
        raise UserError("model.qk_norm under plain tensor parallel: each tp rank norms only its own heads, so the "
                        "q/k norm gradients would be partial; set parallelism.sequence_parallel = true (which sums "
                        "them over tp) or parallelism.tp = 1")
    try:
        tpm.check_tp_divisibility(tp, m.n_heads, m.n_kv_heads, hidden_dim(m), m.vocab_size, seq_len=seq_len)
    except ValueError as e:
        raise UserError(str(e)) from None


def apply(layout: Layout, storage: Storage, mesh: Mesh) -> None:
    """The tp ops; under sequence parallel, the sum over tp of `storage`'s replicated tensors' grads
    (after that storage's own gradient sum: tp peers hold the same shard layout, so the same view
    holds the same elements on each)."""
    facts, group = layout.facts, mesh.group("tp")
    layout.ops = dataclasses.replace(layout.ops, **tpm.tp_ops(group, facts.sequence_parallel, facts.async_tp,
                                                              lookup=layout.ops.embedding))
    if facts.sequence_parallel:
        layout.finish_grads.append(functools.partial(sum_replicated_grads, storage, group))


def sum_replicated_grads(storage: Storage, group: dist.ProcessGroup) -> None:
    """Sequence parallel: sum over tp the grads of the tensors tp does not split, in one all-reduce."""
    grads = {key: t.grad for key, t in storage.params.items() if t.grad is not None}
    tpm.sum_in_place([view for name, (view, _) in storage.chunks(grads).items() if model.tp_shard_dim(name) is None],
                     group)
