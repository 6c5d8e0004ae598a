"""From (config, mesh) to a Layout: what this rank holds, the ops its forward calls, how grads sync.

A Layout is everything the training loop needs to know about parallelism:
  params        the local fp32 master tensors the optimizer updates (full tensors, slices, shards)
  chunks(d)     maps a dict shaped like params (the params, their grads, optimizer moments) to
                {full name: (tensor view, Slice)}: what a checkpoint writes and reads
  owned         the local tensors this rank counts in the gradient norm (one rank among replicas)
  ops           the model.Ops the forward calls
  data_rank/size  which rows of the global batch this rank reads
  loss_group    summing the per-rank loss over it gives the global loss
  start_last_microbatch / finish_grads   hooks around the backward of a step's last micro-batch
Each parallelism adds its piece here; the mechanisms live in minititan/collectives/.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.checkpoint import Slice
from minititan.core.config import Config, UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class Layout:
    params: dict[str, Tensor]
    chunks: Callable[[dict[str, Tensor]], dict[str, tuple[Tensor, Slice]]]
    owned: set[str]
    ops: model.Ops
    data_rank: int
    data_size: int
    loss_group: dist.ProcessGroup
    start_last_microbatch: Callable[[], None] = lambda: None
    finish_grads: Callable[[], None] = lambda: None


NOT_YET = {"dp_shard": "FSDP", "tp": "tensor parallel", "pp": "pipeline parallel", "cp": "context parallel",
           "ep": "expert parallel"}


def build(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    par = cfg.parallelism
    for dim, what in NOT_YET.items():
        if getattr(par, dim) > 1 or (dim == "dp_shard" and mesh.sizes["dp_shard"] > 1):
            raise UserError(f"parallelism.{dim} > 1 ({what}) is not implemented yet: set parallelism.{dim} = 1")
    return replicated_layout(cfg, mesh, device)


def replicated_layout(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    """Every rank holds every parameter; dp_replicate ranks sum their gradients (DDP)."""
    params = {n: t.requires_grad_() for n, t in model.init(cfg.model, cfg.training.seed, device).items()}
    ops = base_ops(cfg)
    owner = mesh.coords["dp_replicate"] == 0  # one replica writes checkpoints and counts in the grad norm

    def chunks(tensors):
        return {n: (t, Slice(list(t.shape), [[0, s] for s in t.shape], owner=owner)) for n, t in tensors.items()}

    layout = Layout(params=params, chunks=chunks, owned=set(params) if owner else set(), ops=ops,
                    data_rank=mesh.local_rank("dp_replicate"), data_size=mesh.size("dp_replicate"),
                    loss_group=mesh.group("dp_replicate"))
    if mesh.size("dp_replicate") > 1:
        reducer = GradAllReducer(params, mesh.group("dp_replicate"), DTYPES[cfg.training.reduce_dtype])
        layout.start_last_microbatch = lambda: setattr(reducer, "enabled", True)
        layout.finish_grads = lambda: (reducer.finish(), setattr(reducer, "enabled", False))
    return layout


def base_ops(cfg: Config, layers_per_forward: int | None = None) -> model.Ops:
    """The single-device ops: select each unit's params (cast to the compute dtype) and run blocks
    with the configured activation checkpointing and compile."""
    ops = model.default_ops(cfg.model)
    dtype = DTYPES[cfg.training.param_dtype]
    if dtype != torch.float32:
        select = ops.gather
        ops.gather = lambda params, unit: {n: t.to(dtype) for n, t in select(params, unit).items()}
    ac = cfg.activation_checkpoint
    ops.run_block = block_runner(ac.mode, ac.selective, cfg.compile.enable, layers_per_forward or cfg.model.n_layers)
    return ops
