"""The Layout: everything the training loop knows about parallelism, declared in one place.

parallelize.build makes one from (config, mesh, device), one dimension after another; the
trainer, validation and checkpoints read only what is declared here.

  Facts     what the config and the mesh decide about this rank, computed once
  Storage   where some of this rank's fp32 master tensors live, under one key scheme, and which
            checkpoint chunk each parameter's part of them is
  Layout    the storages and their union `params` (what the optimizer updates), the Ops the
            forward calls, how this rank prepares its rows, the pipeline if any, and the step's
            synchronisation points: ordered lists the trainer runs at fixed places of a step
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.checkpoint import Slice
from minititan.core.config import Model

DATA_DIMS = ("dp_replicate", "dp_shard", "cp")  # ranks along these see different tokens and sum their gradients


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the config and the mesh decide about this rank's layout (parallelize.layout_facts)."""
    model: Model  # the model config the forward runs
    seed: int  # every tensor's init depends on (seed, name) only, never on the layout
    param_dtype: torch.dtype  # the forward's compute dtype (training.param_dtype)
    reduce_dtype: torch.dtype  # the dtype gradients are summed over ranks in (training.reduce_dtype)
    loss_scale: float  # 1 / label tokens of a global batch: each micro-batch's summed loss is multiplied by it
    data_rank: int  # which rows of the global batch this rank reads: its index over dp_replicate x dp_shard
    data_size: int  # ... out of how many (the ranks along cp, tp and pp read the same rows)
    n_micro: int  # micro-batches per step on this rank (training.local_batch_size rows each)
    fsdp: bool  # dp_shard x cp > 1: each unit's tensors are one flat shard over those ranks
    reshard_after_forward: bool  # FSDP frees a unit's gathered params after its forward
    reduce_every_microbatch: bool  # FSDP reduce-scatters every micro-batch's grads, not only the last's
    ep: int  # MoE: the ranks of dp_shard x cp that split a layer's experts
    sequence_parallel: bool  # tp > 1 and sequence parallel: tp ranks hold slices of the sequence between blocks
    async_tp: bool  # ... with its collectives overlapped with the matmuls
    sequence_dims: tuple[str, ...]  # the mesh dims whose ranks hold parts of the same sequences: cp (and tp under SP)
    n_stages: int  # pipeline stages over all pp ranks (1 without pp)
    stages: dict[int, range]  # this rank's stages -> their layers (without pp: stage 0, every layer)
    splits_backward: bool  # zero bubble: the schedule runs each backward in two passes


class Storage(Protocol):
    """Some of this rank's fp32 masters. Its keys are storage keys: a parameter's name where the
    tensor holds that parameter (whole, or this rank's tp / ep slice of it), a unit's name where it
    is a flat FSDP shard holding parts of the unit's parameters. The checkpoint and the gradient
    norm never read the keys: they go through chunks()."""
    params: dict[str, Tensor]

    def chunks(self, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Slice]]:
        """For tensors shaped and keyed like params (the params, their grads, optimizer moments):
        {parameter name: (its part, a view, Slice)}. The parts whose Slice.owner is set hold one
        copy of every element over all ranks: what checkpoints write and the grad norm counts."""


class Stages(Protocol):
    """A pipeline: this pp rank's stages of the model (pipeline.PipelineStages)."""

    def run(self, layout: Layout, x: Tensor, y: Tensor, positions: Tensor | None, scale: float,
            backward: bool, documents: Tensor | None = None) -> Tensor | None:
        """One micro-batch through the pipeline; this rank's loss share (None off the last stage)."""


def whole_sequences(inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    return inputs, labels, None  # positions None: 0..seq_len-1


def whole_documents(positions: Tensor, documents: Tensor) -> tuple[Tensor, Tensor]:
    return positions, documents


@dataclasses.dataclass
class Layout:
    """This rank's part of the training: built by parallelize.build, read by the trainer."""
    facts: Facts
    ops: model.Ops  # the operations the forward calls
    loss_group: dist.ProcessGroup  # summing every rank's loss share over it gives the global loss
    storages: list[Storage] = dataclasses.field(default_factory=list)  # added by hold()
    params: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # their union: what the optimizer updates
    # (inputs, labels) of this rank's rows -> (inputs, labels, positions) of the part it computes (CP)
    prepare: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]] = whole_sequences
    # document masking: per-row (positions, document indices) -> the part this rank computes (CP), cut like prepare's
    prepare_documents: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = whole_documents
    pipeline: Stages | None = None  # pp: runs each micro-batch through this rank's stages
    forward_contexts: list[Callable[[], ContextManager]] = dataclasses.field(default_factory=list)  # FSDP's resharding
    # The step's synchronisation points, each list run in order where the step reaches it:
    #   start_last_microbatch  before the backward of a step's last micro-batch: reductions from
    #                          then on overlap it (layout/microbatches.py; not under pp)
    #   finish_grads           after the last backward: every cross-rank gradient sum (train.train_step)
    #   after_grads            after those, before the grad norm and clipping (MoE's expert-bias update)
    #   after_optimizer_step   right after the optimizer step (fp8 all-gather: next step's scales)
    #   log_metrics            on logging steps, collective: {name: float} for the log line (MoE loads)
    start_last_microbatch: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    finish_grads: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    after_grads: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    after_optimizer_step: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    log_metrics: list[Callable[[], dict[str, float]]] = dataclasses.field(default_factory=list)

    def hold(self, storage: Storage) -> None:
        self.storages.append(storage)
        self.params |= storage.params

    def chunks(self, tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Slice]]:
        """Storage.chunks over every storage, for tensors keyed like params (any subset of them)."""
        out = {}
        for storage in self.storages:
            out |= storage.chunks({key: tensors[key] for key in storage.params if key in tensors})
        return out

    def forward_context(self) -> contextlib.ExitStack:
        """The context every forward runs in: all of forward_contexts, nested in list order."""
        with contextlib.ExitStack() as stack:
            for context in self.forward_contexts:
                stack.enter_context(context())
            return stack.pop_all()  # entered; closed by the caller's with


def owns(mesh: Mesh, name: str, split_over: tuple[str, ...] = ()) -> bool:
    """Whether this rank's copy of `name`'s part is the one written to checkpoints and counted in the
    gradient norm: the copy at coordinate 0 of every mesh dim the part is replicated over. Those are
    the data dims but the ones it is split over (FSDP's, ep's), and tp for the tensors tp does not
    split; never pp (each tensor lives on one pp rank)."""
    replicated_over = [d for d in DATA_DIMS if d not in split_over]
    if model.tp_shard_dim(name) is None:
        replicated_over.append("tp")
    return all(mesh.coords[d] == 0 for d in replicated_over)


def may_share_casts(facts: Facts) -> bool:
    """Whether the tensors a layout casts itself may take one compute-dtype copy per optimizer step,
    shared by its micro-batches (mixed_precision.StepCasts): in bf16, unless zero bubble splits the
    backward at the casts. Data parallel's all-reduce keeps its overlap with the backward: it
    listens to the masters' gradient hooks, which the shared copy runs."""
    return facts.param_dtype != torch.float32 and not facts.splits_backward
