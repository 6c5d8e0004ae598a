"""Pipeline parallel in the trainer: which layers each pp rank holds, and the pipelined step.

The model is cut into n_stages = pp x v consecutive stages (v = parallelism.pp_virtual_stages
under interleaved_1f1b, else 1). Stage 0 also holds the embedding, the last stage the final
norm, the output projection and the loss. Virtual stage s lives on pp rank s % pp, so a rank
holds only its stages' parameters: the ranks along pp hold *different* tensors (pp is not a
replication dim), each written to checkpoints by its own rank, so a checkpoint stays
layout-independent and resumes under any pp.

A step runs, for each of the rank's optimizer micro-batches (training.local_batch_size rows,
accumulated as without pp), one pipeline over pp_microbatches microbatches of those rows, with
the schedule's action list (minititan/schedules/). Each stage is a slice of the model:

    first stage    h = model.hidden(params, tokens, layers=its layers)          (embeds)
    middle stage   h = model.hidden(params, tokens, layers=its layers, x=h_in)  (tokens: positions)
    last stage     h, w = model.final_hidden(...); loss = ops.cross_entropy(h, w, labels) / global tokens

so the scaling is the trainer's: the loss is the summed token cross-entropy over the global
token count and the weights' grads add up over microbatches. The loss exists on the last pp
rank only (zero elsewhere), so the layout's loss group includes pp.

Gradient sync over the data dims is the layout's, as without pp, with one difference: dp_replicate's
grads are all-reduced after the pipeline, not overlapped with its backward (the bucketed reducer
starts a bucket at a parameter's first gradient, and a pipeline accumulates one per microbatch).
FSDP reduce-scatters each unit's grads at every microbatch's backward, or, with
parallelism.fsdp_reduce_every_microbatch = false, once after the pipeline.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.config import Config, UserError
from minititan.core.metrics import say
from minititan.schedules.runtime import connect, run_pipeline
from minititan.schedules.schedule import SCHEDULES, rank_stages, stage_rank

DATA_DIMS = ("dp_replicate", "dp_shard", "cp")  # parallelize.DATA_DIMS (which imports this file)


# ---------------------------------------------------------------- stages


def virtual_stages(cfg: Config) -> int:
    """Stages per pp rank: several only for the interleaved schedule."""
    p = cfg.parallelism
    return p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1


def splits_backward(cfg: Config) -> bool:
    """Whether the schedule runs each backward in two passes (zero bubble: I now, W later)."""
    return cfg.parallelism.pp != 1 and cfg.parallelism.pp_schedule == "zero_bubble"  # pp = -1 may fill the world


def n_microbatches(cfg: Config) -> int:
    """Pipeline microbatches per optimizer micro-batch; 0 = local_batch_size (one sequence each)."""
    return cfg.parallelism.pp_microbatches or cfg.training.local_batch_size


def layers_per_stage(cfg: Config) -> list[int]:
    n_stages = cfg.parallelism.pp * virtual_stages(cfg)
    return list(cfg.parallelism.pp_layers_per_stage) or balanced_split(cfg, n_stages)


def balanced_split(cfg: Config, n_stages: int) -> list[int]:
    """Layers per stage that make the slowest stage as fast as it can be, counting training flops
    per token: every layer costs the same, and the last stage also pays for the output projection
    (6 x dim x vocab). The embedding is a lookup (no matmul), so the first stage pays nothing
    extra. Each stage gets one layer, then each further layer goes to the stage that would be
    cheapest with it (ties: the earlier stage)."""
    m = cfg.model
    output = 6 * m.dim * m.vocab_size
    layer = (model.flops_per_token(m, cfg.training.seq_len) - output) / m.n_layers
    extra = [0.0] * (n_stages - 1) + [output]
    counts = [1] * n_stages
    for _ in range(m.n_layers - n_stages):
        cheapest = min(range(n_stages), key=lambda s: (counts[s] + 1) * layer + extra[s])
        counts[cheapest] += 1
    return counts


def stage_layers(cfg: Config) -> list[range]:
    """The consecutive layers of each stage."""
    out, start = [], 0
    for n in layers_per_stage(cfg):
        out.append(range(start, start + n))
        start += n
    return out


def rank_layers(cfg: Config, pp_rank: int) -> dict[int, range]:
    """This pp rank's stages -> their layers."""
    layers = stage_layers(cfg)
    return {s: layers[s] for s in rank_stages(pp_rank, cfg.parallelism.pp, virtual_stages(cfg))}


def held_shapes(cfg: Config, mesh: Mesh) -> dict[str, tuple[int, ...]]:
    """The full shapes of the tensors this rank's stages use (all of them without pp)."""
    shapes = model.param_shapes(cfg.model)
    if mesh.size("pp") == 1:
        return shapes
    stages = rank_layers(cfg, mesh.local_rank("pp"))
    n_stages = cfg.parallelism.pp * virtual_stages(cfg)
    held = {i for layers in stages.values() for i in layers}

    def is_held(name: str) -> bool:
        if name == "tok_embeddings":
            return 0 in stages
        if name in ("norm", "output"):
            return n_stages - 1 in stages
        return int(name.split(".")[1]) in held

    return {name: shape for name, shape in shapes.items() if is_held(name)}


def layers_per_forward(cfg: Config, mesh: Mesh) -> int | None:
    """The blocks one forward runs (activation checkpointing's every-N-th counts restart there):
    one stage's layers under pp (the first of this rank's stages: interleaved chunks usually
    have equal sizes), None (all of them) without."""
    if mesh.size("pp") == 1:
        return None
    return len(next(iter(rank_layers(cfg, mesh.local_rank("pp")).values())))


# ---------------------------------------------------------------- checks


def validate(cfg: Config, pp: int) -> None:
    """One UserError naming the fix for a pipeline the model or the batch cannot make."""
    if pp == 1:
        return
    p, n_layers = cfg.parallelism, cfg.model.n_layers
    if p.pp_schedule == "interleaved_1f1b" and p.pp_virtual_stages < 2:
        raise UserError(f"parallelism.pp_schedule = interleaved_1f1b needs parallelism.pp_virtual_stages >= 2, got "
                        f"{p.pp_virtual_stages}: raise it, or use pp_schedule = 1f1b")
    v = virtual_stages(cfg)
    n_stages = pp * v
    stages = f"{n_stages} pipeline stages (parallelism.pp={pp}" + (f" x pp_virtual_stages={v})" if v > 1 else ")")
    if p.pp_layers_per_stage:
        given = list(p.pp_layers_per_stage)
        if len(given) != n_stages or min(given) < 1 or sum(given) != n_layers:
            raise UserError(f"parallelism.pp_layers_per_stage = {given} must list {n_stages} numbers, one per stage "
                            f"of the {stages}, each >= 1, adding up to model.n_layers={n_layers}; "
                            f"or set it to [] for a balanced split")
    elif n_layers < n_stages:
        lower = "parallelism.pp" + (" or pp_virtual_stages" if v > 1 else "")
        raise UserError(f"model.n_layers={n_layers} is fewer than the {stages}: every stage needs a layer; "
                        f"lower {lower} or raise model.n_layers")
    ac = cfg.activation_checkpoint
    if p.pp_schedule == "zero_bubble" and ac.mode == "selective" and ac.selective == "op":
        raise UserError("pp_schedule = zero_bubble runs each backward in two passes (I, then W), which torch's "
                        "selective activation checkpointing (activation_checkpoint.selective = \"op\") refuses: "
                        "use activation_checkpoint.mode = full, or selective = N (every N-th block), "
                        "or another schedule")
    m, local = n_microbatches(cfg), cfg.training.local_batch_size
    if p.pp_microbatches < 0 or local % m:
        raise UserError(f"parallelism.pp_microbatches={p.pp_microbatches} must divide training.local_batch_size="
                        f"{local} (each pipeline runs one local batch): pick a divisor of {local}, or 0 for {local}")
    if p.pp_schedule == "interleaved_1f1b" and m % pp:
        raise UserError(f"interleaved_1f1b sends microbatches through each chunk in rounds of parallelism.pp={pp}, "
                        f"but there are {m} per pipeline: set parallelism.pp_microbatches (and training."
                        f"local_batch_size) to a multiple of {pp}")


# ---------------------------------------------------------------- the step


def add_pipeline(layout, cfg: Config, mesh: Mesh, device: torch.device) -> None:
    """Give the layout its pipelined forward_backward (and a forward-only eval_loss_sum, which
    validation uses), and a loss group that includes pp."""
    step = PipelineStep(layout, cfg, mesh, device)
    layout.forward_backward = step.forward_backward
    layout.eval_loss_sum = step.eval_loss_sum
    layout.loss_group = mesh.group("pp", *DATA_DIMS)


class PipelineStep:
    """This pp rank's stages over the layout's params and ops, run by the schedule."""

    def __init__(self, layout, cfg: Config, mesh: Mesh, device: torch.device):
        self.layout, self.cfg, self.device = layout, cfg, device
        self.pp, self.pp_rank = mesh.size("pp"), mesh.local_rank("pp")
        self.n_stages = self.pp * virtual_stages(cfg)
        self.n_micro = n_microbatches(cfg)
        self.actions = SCHEDULES[cfg.parallelism.pp_schedule](self.pp_rank, self.pp, self.n_micro, virtual_stages(cfg))
        self.layers = rank_layers(cfg, self.pp_rank)
        self.group = mesh.group("pp")
        connect(self.group, device)
        self.dtype = getattr(torch, cfg.training.param_dtype)
        # what crosses a stage boundary is the residual stream: [rows, seq, dim], the sequence
        # split under cp (done by layout.prepare) and under sequence parallel
        self.seq_split = mesh.size("tp") if mesh.size("tp") > 1 and cfg.parallelism.sequence_parallel else 1
        say(f"pipeline: {cfg.parallelism.pp_schedule}, {self.n_stages} stages of {layers_per_stage(cfg)} layers, "
            f"{self.n_micro} microbatches per pipeline", mesh.rank)

    def stage(self, s: int, microbatches: list[tuple[Tensor, Tensor]], positions: Tensor | None, scale: float):
        """Stage s as the runtime calls it: (input activation or None, microbatch) -> activation or loss."""
        layout, m = self.layout, self.cfg.model

        def forward(x: Tensor | None, mb: int) -> Tensor:
            tokens, labels = microbatches[mb]
            with layout.forward_context():
                h = model.hidden(layout.params, tokens, m, layout.ops, positions, layers=self.layers[s], x=x)
                if s < self.n_stages - 1:
                    return h
                h, w_out = model.final_hidden(layout.params, h, m, layout.ops)
                return layout.ops.cross_entropy(h, w_out, labels, layout.ops.linear) * scale
        return forward

    def split(self, inputs: Tensor, labels: Tensor, n_local: int):
        """Per optimizer micro-batch: its pipeline microbatches, the positions, the activation shape."""
        inputs, labels, positions = self.layout.prepare(inputs, labels)
        for x, y in zip(inputs.chunk(n_local), labels.chunk(n_local)):
            shape = (x.shape[0] // self.n_micro, x.shape[1] // self.seq_split, self.cfg.model.dim)
            yield list(zip(x.chunk(self.n_micro), y.chunk(self.n_micro))), positions, shape

    def forward_backward(self, inputs: Tensor, labels: Tensor, n_local: int, scale: float) -> Tensor:
        """One pipeline per optimizer micro-batch; returns this rank's share of the loss (zero but
        on the last stage). Grads sum over microbatches, then over the data ranks in finish_grads."""
        total = torch.zeros((), device=inputs.device)
        for microbatches, positions, shape in self.split(inputs, labels, n_local):
            stages = {s: self.stage(s, microbatches, positions, scale) for s in self.layers}
            loss = run_pipeline(self.actions, stages, self.n_stages, self.group, shape, self.dtype, self.device)
            if loss is not None:
                total += loss
        self.layout.finish_grads()
        return total

    @torch.no_grad()
    def eval_loss_sum(self, inputs: Tensor, labels: Tensor, n_local: int) -> Tensor:
        """Forward only (validation): the summed token loss on the last stage, zero elsewhere.
        Every rank walks the same (microbatch, stage) order, runs its own stages and hands each
        activation on with a blocking send: no overlap, but no schedule needed, and it cannot
        deadlock (it is the one-process order)."""
        total = torch.zeros((), device=inputs.device)
        peers = [dist.get_global_rank(self.group, r) for r in range(self.pp)]
        for microbatches, positions, shape in self.split(inputs, labels, n_local):
            for mb in range(self.n_micro):
                for s in self.layers:  # stage order: s = chunk * pp + pp_rank
                    x = None
                    if s > 0:
                        x = torch.empty(shape, dtype=self.dtype, device=self.device)
                        dist.recv(x, peers[stage_rank(s - 1, self.pp)], group=self.group)
                    y = self.stage(s, microbatches, positions, 1.0)(x, mb)
                    if s == self.n_stages - 1:
                        total += y.float()
                    else:
                        dist.send(y.contiguous(), peers[stage_rank(s + 1, self.pp)], group=self.group)
        return total
