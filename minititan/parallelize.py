"""From (config, mesh) to a Layout: what this rank holds, the ops its forward calls, how grads sync.

A Layout is everything the training loop needs to know about parallelism:
  params        the local fp32 master tensors the optimizer updates (full tensors, slices, shards)
  chunks(d)     maps a dict shaped like params (the params, their grads, optimizer moments) to
                {full name: (tensor view, Slice)}: what a checkpoint writes and reads
  owned         the local tensors this rank counts in the gradient norm (one rank among replicas)
  ops           the model.Ops the forward calls
  data_rank/size  which rows of the global batch this rank reads
  loss_group    summing the per-rank loss over it gives the global loss
  prepare       (inputs, labels) -> (inputs, labels, positions): this rank's part of its rows
  start_last_microbatch / finish_grads   hooks around the backward of a step's last micro-batch
Each parallelism adds its piece here; the mechanisms live in minititan/collectives/.

The layout is composed dimension by dimension over the mesh (pp x dp_replicate x dp_shard x cp x tp):
  tp            each rank keeps its tensor-parallel slice of every tensor (collectives/tensor_parallel.py)
  cp            each rank keeps its load-balanced part of every sequence; attention is ring attention
                (collectives/ring_attention.py)
  dp_replicate  each rank reads its own rows of the global batch
Ranks that differ only along the data dims (dp_replicate, cp) hold identical tensors and sum their
gradients, because each saw different tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives import ring_attention
from minititan.collectives import tensor_parallel as tpm
from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.checkpoint import Slice
from minititan.core.config import Config, UserError, hidden_dim
from minititan.core.float8 import float8_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def whole_sequences(inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    return inputs, labels, None  # positions None: 0..seq_len-1


@dataclasses.dataclass
class Layout:
    params: dict[str, Tensor]
    chunks: Callable[[dict[str, Tensor]], dict[str, tuple[Tensor, Slice]]]
    owned: set[str]
    ops: model.Ops
    data_rank: int
    data_size: int
    loss_group: dist.ProcessGroup
    prepare: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]] = whole_sequences
    start_last_microbatch: Callable[[], None] = lambda: None
    finish_grads: Callable[[], None] = lambda: None


NOT_YET = {"dp_shard": "FSDP", "pp": "pipeline parallel", "ep": "expert parallel"}
DATA_DIMS = ("dp_replicate", "dp_shard", "cp")  # ranks along these see different tokens


def build(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    validate(cfg, mesh)
    return composed_layout(cfg, mesh, device)


def validate(cfg: Config, mesh: Mesh) -> None:
    """Refuse, before any collective, a layout that is not implemented or does not divide the model."""
    par, m = cfg.parallelism, cfg.model
    for dim, what in NOT_YET.items():
        if getattr(par, dim) > 1 or mesh.sizes.get(dim, 1) > 1:  # dp_shard = -1 may fill the world
            raise UserError(f"parallelism.{dim} > 1 ({what}) is not implemented yet: set parallelism.{dim} = 1")
    if par.async_tp and cfg.float8.enable:
        raise UserError("parallelism.async_tp and float8.enable both replace the linear op; "
                        "set one of them to false")
    if par.async_tp and not par.sequence_parallel:
        raise UserError("parallelism.async_tp overlaps the sequence-parallel collectives with the matmuls: "
                        "set parallelism.sequence_parallel = true as well (or async_tp = false)")
    tp, cp, seq_len = mesh.size("tp"), mesh.size("cp"), cfg.training.seq_len
    try:
        if cp > 1:
            ring_attention.check_divisible(seq_len, cp)
        if tp > 1:
            tpm.check_tp_divisibility(tp, m.n_heads, m.n_kv_heads, hidden_dim(m), m.vocab_size,
                                      seq_len=seq_len // cp if par.sequence_parallel else None)
    except ValueError as e:
        raise UserError(str(e)) from None


def composed_layout(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    """dp_replicate x cp x tp. Every rank keeps its tp slice of every tensor whole; ranks along the
    data dims hold the same slices and sum their gradients (DDP over dp_replicate and cp)."""
    par = cfg.parallelism
    tp, tp_rank = mesh.size("tp"), mesh.local_rank("tp")
    shapes = model.param_shapes(cfg.model)
    tp_boxes = {name: tp_box(name, shape, tp_rank, tp) for name, shape in shapes.items()}
    # The storage step: here each rank keeps its local tensor whole. FSDP replaces this step: it
    # flat-shards each unit's local tensors over (dp_shard, cp), adds the flat range to the Slice,
    # and all-gathers the unit in ops.gather.
    params = {name: local_init(cfg, name, box, device).requires_grad_() for name, box in tp_boxes.items()}
    slices = {name: Slice(shape=list(shapes[name]), box=box, owner=is_owner(mesh, name))
              for name, box in tp_boxes.items()}

    def chunks(tensors):
        return {name: (t, slices[name]) for name, t in tensors.items()}

    ops = base_ops(cfg)
    if tp > 1:
        ops = dataclasses.replace(ops, **tpm.tp_ops(mesh.group("tp"), par.sequence_parallel, par.async_tp))
    if cfg.float8.enable:  # last: it wraps whatever gather and linear the layout chose
        ops = float8_ops(ops, recipe=cfg.float8.recipe, filter=tuple(cfg.float8.filter), device=device)
    layout = Layout(params=params, chunks=chunks, owned={n for n, s in slices.items() if s.owner}, ops=ops,
                    data_rank=mesh.local_rank("dp_replicate", "dp_shard"),
                    data_size=mesh.size("dp_replicate", "dp_shard"), loss_group=mesh.group(*DATA_DIMS))
    if mesh.size("cp") > 1:
        add_context_parallel(layout, cfg, mesh, device)
    add_grad_sync(layout, cfg, mesh)
    return layout


def tp_box(name: str, shape: tuple[int, ...], tp_rank: int, tp: int) -> list[list[int]]:
    """[start, stop) per dim of the full tensor: this tp rank's slice (all of it for replicated tensors)."""
    box = [[0, s] for s in shape]
    dim = tpm.tp_shard_dim(name)
    if dim is not None:
        n = shape[dim] // tp
        box[dim] = [tp_rank * n, (tp_rank + 1) * n]
    return box


def local_init(cfg: Config, name: str, box: list[list[int]], device: torch.device) -> Tensor:
    """The fp32 master of this rank's box of one tensor; init is per name, so one full tensor at a time."""
    full = model.init(cfg.model, cfg.training.seed, device, names=[name])[name]
    return full[tuple(slice(a, b) for a, b in box)].clone(memory_format=torch.contiguous_format)


def is_owner(mesh: Mesh, name: str) -> bool:
    """One copy of every element is written to checkpoints and counted in the gradient norm: the copy
    at coordinate 0 of every mesh dim the local tensor is replicated over (the data dims, and tp for
    the tensors tp does not split)."""
    replicated_over = DATA_DIMS + (("tp",) if tpm.tp_shard_dim(name) is None else ())
    return all(mesh.coords[d] == 0 for d in replicated_over)


def add_context_parallel(layout: Layout, cfg: Config, mesh: Mesh, device: torch.device) -> None:
    """Each cp rank keeps its load-balanced part of every sequence (with its tokens' global positions
    for RoPE); attention fetches the other cp ranks' keys and values (cp_rotate: ring or allgather)."""
    cp, cp_rank, seq_len = mesh.size("cp"), mesh.local_rank("cp"), cfg.training.seq_len
    positions = ring_attention.shard_positions(seq_len, cp_rank, cp, device)

    def prepare(inputs, labels):
        return (ring_attention.shard_sequence(inputs, cp_rank, cp), ring_attention.shard_sequence(labels, cp_rank, cp),
                positions)

    layout.prepare = prepare
    layout.ops.attention = functools.partial(ring_attention.context_parallel_attention, group=mesh.group("cp"),
                                             rotate=cfg.parallelism.cp_rotate)


def add_grad_sync(layout: Layout, cfg: Config, mesh: Mesh) -> None:
    """Sum gradients over the data dims that replicate the params (bucketed, overlapped with the last
    micro-batch's backward); under sequence parallel also sum the replicated norms' gradients over tp, since each
    tp rank saw only its part of the sequence."""
    reducer = None
    if mesh.size("dp_replicate", "cp") > 1:
        reducer = GradAllReducer(layout.params, mesh.group("dp_replicate", "cp"), DTYPES[cfg.training.reduce_dtype])
        layout.start_last_microbatch = lambda: setattr(reducer, "enabled", True)
    sequence_parallel = mesh.size("tp") > 1 and cfg.parallelism.sequence_parallel
    tp_group = mesh.group("tp") if sequence_parallel else None

    def finish_grads():
        if reducer is not None:
            reducer.finish()
            reducer.enabled = False
        if sequence_parallel:
            tpm.allreduce_replicated_grads(layout.params, tp_group)

    layout.finish_grads = finish_grads


def base_ops(cfg: Config, layers_per_forward: int | None = None) -> model.Ops:
    """The single-device ops: select each unit's params (cast to the compute dtype) and run blocks
    with the configured activation checkpointing and compile."""
    ops = model.default_ops(cfg.model)
    dtype = DTYPES[cfg.training.param_dtype]
    if dtype != torch.float32:
        select = ops.gather
        ops.gather = lambda params, unit: {n: t.to(dtype) for n, t in select(params, unit).items()}
    if cfg.compile.enable:  # the loss too: the fp32 upcast and log-softmax fuse into one pass over the logits
        ops.cross_entropy = torch.compile(ops.cross_entropy)
    ac = cfg.activation_checkpoint
    ops.run_block = block_runner(ac.mode, ac.selective, cfg.compile.enable, layers_per_forward or cfg.model.n_layers)
    return ops
