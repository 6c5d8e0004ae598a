"""Data parallel glue (parallelism.dp_replicate without dp_shard or cp, which shard: fsdp.py): tensors
kept whole, their gradients summed by collectives/data_parallel.py's bucketed all-reduce.

Ranks that differ only along the data dims hold the same tensors and sum their gradients, because
each saw different tokens. The sum starts during the backward of a step's last micro-batch
(earlier ones only accumulate) and finishes after it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.checkpoint import Slice
from minititan.layout.contract import Facts, Layout, owns


@dataclasses.dataclass
class WholeTensors:
    """A Storage of plain tensors, each a whole parameter or this rank's slice of one (its tp box,
    its ep experts), keyed by the parameter's name."""
    params: dict[str, Tensor]
    slices: dict[str, Slice]

    def chunks(self, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Slice]]:
        return {name: (t, self.slices[name]) for name, t in tensors.items()}


def whole_tensors(facts: Facts, boxes: dict[str, list[list[int]]], shapes: dict[str, tuple[int, ...]],
                  owners: dict[str, bool], device: torch.device) -> WholeTensors:
    """The fp32 box of each full tensor, built from its init alone (so the values never depend on
    the layout). owners: which of them this rank writes to checkpoints (see contract.owns)."""
    params = {name: model.init_box(facts.model, facts.seed, name, shapes[name], box, device).requires_grad_()
              for name, box in boxes.items()}
    slices = {name: Slice(shape=list(shapes[name]), box=box, owner=owners[name]) for name, box in boxes.items()}
    return WholeTensors(params, slices)


def apply(layout: Layout, boxes: dict[str, list[list[int]]], shapes: dict[str, tuple[int, ...]], mesh: Mesh,
          device: torch.device) -> WholeTensors:
    """The layout's main storage without FSDP (dp_shard = cp = 1): each box whole on every rank of
    dp_replicate, its grads summed over it."""
    main = whole_tensors(layout.facts, boxes, shapes, {name: owns(mesh, name) for name in boxes}, device)
    layout.hold(main)
    if mesh.size("dp_replicate") > 1:
        sum_grads(layout, main.params, mesh.group("dp_replicate"), layout.facts.reduce_dtype)
    return main


def sum_grads(layout: Layout, tensors: dict[str, Tensor], group: dist.ProcessGroup, dtype: torch.dtype) -> None:
    """Sum these tensors' grads over `group` in `dtype`: bucketed all-reduces that start during the
    backward of the step's last micro-batch (layout.start_last_microbatch) and end in finish_grads."""
    reducer = GradAllReducer(tensors, group, dtype)
    layout.start_last_microbatch.append(reducer.reduce_next_backward)
    layout.finish_grads.append(reducer.finish)
