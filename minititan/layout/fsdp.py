"""FSDP / HSDP glue (parallelism.dp_shard, and cp, which FSDP shards over too): collectives/fsdp.py
over this rank's tensors, and its fp8 all-gather (float8.fsdp_all_gather, collectives/fsdp_float8.py).

  apply      the layout's main storage: one flat fp32 shard per unit of this rank's (tp-sliced)
             tensors over dp_shard x cp, as in torchtitan, replicated over dp_replicate (HSDP);
             ops.gather all-gathers a unit (cast to param_dtype by FSDP's gather codec)
  shard      the storage, filled one unit at a time, so no rank ever holds its whole local model.
             A checkpoint chunk is each parameter's part of a shard: its box, and the flat range
             of the box this rank holds (padding is in none)
  attach     every forward runs in fsdp.resharding() (a unit's gathered params are freed after its
             forward and gathered again in backward); each unit's grads are reduce-scattered (SUM)
             as soon as its backward is done, then all-reduced over dp_replicate under HSDP, and
             finish_grads waits for the last. parallelism.fsdp_reduce_every_microbatch = false:
             earlier micro-batches only add up full grads locally, the last one reduces the sum

MoE's expert FSDP (moe.py) is another storage of the same kind, over another group.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.fsdp import FSDP
from minititan.collectives.fsdp_float8 import enable_float8_all_gather
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.checkpoint import Slice
from minititan.core.float8 import float8_all_gather_applies
from minititan.layout.contract import Facts, Layout, owns

FSDP_DIMS = ("dp_shard", "cp")  # the shard group; cp ranks hold the same params, so FSDP folds them in


@dataclasses.dataclass
class FSDPShards:
    """A Storage of flat FSDP shards, keyed by unit."""
    fsdp: FSDP
    slices: dict[str, Slice]  # per parameter this rank holds a part of

    @property
    def params(self) -> dict[str, Tensor]:
        return self.fsdp.shards

    def chunks(self, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Slice]]:
        return {name: (self.fsdp.param_slice(name, t), self.slices[name])
                for unit, t in tensors.items() for name in self.fsdp.shard_ranges(unit)}


def shard(facts: Facts, units: dict[str, list[str]], boxes: dict[str, list[list[int]]],
          shapes: dict[str, tuple[int, ...]], owners: dict[str, bool], group: dist.ProcessGroup,
          replicate_group: dist.ProcessGroup | None, device: torch.device) -> FSDPShards:
    """FSDP over the `boxes` of the full tensors, one shard per unit (unit -> its parameter names),
    sharded over `group` and replicated over `replicate_group`. owners: which parameters' parts this
    rank writes to checkpoints (see contract.owns)."""
    fsdp = FSDP({name: tuple(b - a for a, b in box) for name, box in boxes.items()}, units, group, replicate_group,
                device=device, param_dtype=facts.param_dtype, reduce_dtype=facts.reduce_dtype,
                reshard_after_forward=facts.reshard_after_forward, reduce_every_microbatch=facts.reduce_every_microbatch)
    for names in units.values():
        fsdp.load_full({n: model.init_box(facts.model, facts.seed, n, shapes[n], boxes[n], device) for n in names})
    slices = {name: Slice(shape=list(shapes[name]), box=boxes[name], flat=[start, stop], owner=owners[name])
              for unit in fsdp.order for name, (start, stop, _) in fsdp.shard_ranges(unit).items()}
    return FSDPShards(fsdp, slices)


def apply(layout: Layout, boxes: dict[str, list[list[int]]], shapes: dict[str, tuple[int, ...]], mesh: Mesh,
          device: torch.device) -> FSDPShards:
    """The layout's main storage, sharded over dp_shard x cp and replicated over dp_replicate (HSDP)."""
    units: dict[str, list[str]] = {}
    for name in boxes:
        units.setdefault(model.unit_of(name), []).append(name)
    replicate = mesh.group("dp_replicate") if mesh.size("dp_replicate") > 1 else None
    main = shard(layout.facts, units, boxes, shapes, {name: owns(mesh, name, FSDP_DIMS) for name in boxes},
                 mesh.group(*FSDP_DIMS), replicate, device)
    attach(layout, main)
    layout.ops.gather = gather_op(main.fsdp)
    return main


def attach(layout: Layout, shards: FSDPShards) -> None:
    """Hold the shards, run every forward in their resharding(), and reduce their grads at the
    step's sync points."""
    fsdp = shards.fsdp
    layout.hold(shards)
    layout.forward_contexts.append(fsdp.resharding)
    if not fsdp.reduce_every_microbatch:
        layout.start_last_microbatch.append(fsdp.reduce_next_backward)
    layout.finish_grads.append(fsdp.finish_grad_sync)


def gather_op(fsdp: FSDP) -> Callable:
    """ops.gather: the unit all-gathered by FSDP, under the names the unit's function reads."""
    def gather(params, unit):
        return {model.local_name(name): t for name, t in fsdp.gather(unit).items()}

    return gather


def float8_all_gather(layout: Layout, fsdp: FSDP, filter: tuple[str, ...], precompute_scale: bool) -> None:
    """FSDP all-gathers the weights that run in fp8 (tensorwise) as fp8 bytes, cast with a scale
    shared over the shard group, and the linears use them as gathered. With precompute_scale the
    scales of all of them come from one all-reduce right after each optimizer step instead of one
    per unit at its first gather."""
    fp8_names = [name for unit in fsdp.order for name, shape in zip(fsdp.layouts[unit].names, fsdp.layouts[unit].shapes)
                 if float8_all_gather_applies(name, shape, filter)]
    if not fp8_names:
        return
    codec = enable_float8_all_gather(fsdp, fp8_names)
    if precompute_scale:
        layout.after_optimizer_step.append(functools.partial(codec.precompute_scales, fsdp.shards))
