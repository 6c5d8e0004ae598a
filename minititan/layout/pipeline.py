"""Pipeline parallel glue (parallelism.pp*): which layers each pp rank holds, and the stages a
micro-batch runs through (docs/pipeline.md tells the whole story).

The model is cut into n_stages = pp x v consecutive stages (v = parallelism.pp_virtual_stages
under interleaved_1f1b, else 1); stage s lives on pp rank s % pp, stage 0 also holds the
embedding, the last stage the final norm, the output projection and the loss. A rank holds only
its stages' tensors: pp is not a replication dim, each tensor is written to checkpoints by its
own rank, so a checkpoint resumes under any pp.

The micro-batch loop (microbatches.py) runs each optimizer micro-batch as one pipeline over
pp_microbatches microbatches, with the schedule's action list (schedules/); the last stage
returns the summed token loss times the trainer's scale, so grads add up over microbatches as
they do over micro-batches. The loss exists on the last pp rank only: the loss group includes pp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives.mesh import Mesh
from minititan.core import model
from minititan.core.config import Config, UserError
from minititan.core.metrics import say
from minititan.layout.contract import Facts, Layout
from minititan.layout.microbatches import split_rows
from minititan.schedules.runtime import connect, run_pipeline
from minititan.schedules.schedule import SCHEDULES, rank_stages, stage_rank


# ---------------------------------------------------------------- stages


def virtual_stages(cfg: Config) -> int:
    """Stages per pp rank: several only for the interleaved schedule."""
    p = cfg.parallelism
    return p.pp_virtual_stages if p.pp_schedule == "interleaved_1f1b" else 1


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


def rank_layers(cfg: Config, pp_rank: int) -> dict[int, range]:
    """This pp rank's stages -> their (consecutive) layers."""
    starts = [0]
    for n in layers_per_stage(cfg):
        starts.append(starts[-1] + n)
    return {s: range(starts[s], starts[s + 1]) for s in rank_stages(pp_rank, cfg.parallelism.pp, virtual_stages(cfg))}


def held_shapes(facts: Facts) -> dict[str, tuple[int, ...]]:
    """The full shapes of the tensors this rank's stages use (all of them without pp)."""
    shapes = model.param_shapes(facts.model)
    held = {i for layers in facts.stages.values() for i in layers}

    def is_held(name: str) -> bool:
        if name == "tok_embeddings":
            return 0 in facts.stages
        if name in ("norm", "output"):
            return facts.n_stages - 1 in facts.stages
        return int(name.split(".")[1]) in held

    return {name: shape for name, shape in shapes.items() if is_held(name)}


# ---------------------------------------------------------------- refusals


def refuse(cfg: Config, pp: int) -> None:
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
    if p.pp_schedule == "zero_bubble" and ac.mode == "selective" and not ac.selective.isdigit():
        raise UserError("pp_schedule = zero_bubble runs each backward in two passes (I, then W), which torch's "
                        f"selective activation checkpointing (activation_checkpoint.selective = \"{ac.selective}\") refuses: "
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


# ---------------------------------------------------------------- the stages of a micro-batch


class PipelineStages:
    """This pp rank's stages of the model and the schedule that runs them over the pipeline
    microbatches of one optimizer micro-batch (the micro-batch loop calls run)."""

    def __init__(self, facts: Facts, schedule: str, n_micro: int, virtual: int, mesh: Mesh, device: torch.device):
        self.facts, self.n_micro, self.device = facts, n_micro, device
        self.pp, self.pp_rank = mesh.size("pp"), mesh.local_rank("pp")
        self.actions = SCHEDULES[schedule](self.pp_rank, self.pp, n_micro, virtual)
        self.group = mesh.group("pp")
        connect(self.group, device)
        # what crosses a stage boundary is the residual stream: [rows, seq, dim], the sequence
        # split under cp (done by layout.prepare) and under sequence parallel
        self.seq_split = mesh.size("tp") if facts.sequence_parallel else 1

    def run(self, layout: Layout, x: Tensor, y: Tensor, positions: Tensor | None, scale: float,
            backward: bool, documents: Tensor | None = None) -> Tensor | None:
        """One pipeline over this micro-batch: the schedule's forwards and backwards (grads add up
        in .grad), or with backward=False the forwards alone. This rank's loss (the last stage's),
        None on the other pp ranks. Per-row positions and documents (document masking) go with
        their rows into the pipeline microbatches."""
        microbatches = split_rows(self.n_micro, x, y, positions, documents)
        shape = (x.shape[0] // self.n_micro, x.shape[1] // self.seq_split, self.facts.model.dim)
        if not backward:
            return self.forward_only(layout, microbatches, scale, shape)
        stages = {s: self.stage(layout, s, microbatches, scale) for s in self.facts.stages}
        return run_pipeline(self.actions, stages, self.facts.n_stages, self.group, shape, self.facts.param_dtype,
                            self.device)

    def stage(self, layout: Layout, s: int, microbatches: list[tuple], scale: float):
        """Stage s as the runtime calls it: (input activation or None, microbatch) -> activation or loss.
        A microbatch is (tokens, labels, positions, documents)."""
        m, ops, layers, last = self.facts.model, layout.ops, self.facts.stages[s], s == self.facts.n_stages - 1

        def forward(x: Tensor | None, mb: int) -> Tensor:
            tokens, labels, positions, documents = microbatches[mb]
            with layout.forward_context():
                h = model.hidden(layout.params, tokens, m, ops, positions, layers=layers, x=x, documents=documents)
                if not last:
                    return h
                h, w_out = model.final_hidden(layout.params, h, m, ops)
                return ops.cross_entropy(h, w_out, labels, ops.linear) * scale
        return forward

    def forward_only(self, layout: Layout, microbatches: list[tuple], scale: float,
                     shape: tuple[int, ...]) -> Tensor | None:
        """The forwards alone (validation). Every rank walks the same (microbatch, stage) order, runs
        its own stages and hands each activation on with a blocking send: no overlap, but no
        schedule needed, and it cannot deadlock (it is the one-process order)."""
        total = None
        peers = [dist.get_global_rank(self.group, r) for r in range(self.pp)]
        for mb in range(self.n_micro):
            for s in self.facts.stages:  # stage order: s = chunk * pp + pp_rank
                x = None
                if s > 0:
                    x = torch.empty(shape, dtype=self.facts.param_dtype, device=self.device)
                    dist.recv(x, peers[stage_rank(s - 1, self.pp)], group=self.group)
                y = self.stage(layout, s, microbatches, scale)(x, mb)
                if s == self.facts.n_stages - 1:
                    total = y if total is None else total + y
                else:
                    dist.send(y.contiguous(), peers[stage_rank(s + 1, self.pp)], group=self.group)
        return total


def apply(layout: Layout, cfg: Config, mesh: Mesh, device: torch.device) -> None:
    """Give the layout its stages (the micro-batch loop runs them instead of the whole model)."""
    layout.pipeline = PipelineStages(layout.facts, cfg.parallelism.pp_schedule, n_microbatches(cfg),
                                     virtual_stages(cfg), mesh, device)
    say(f"pipeline: {cfg.parallelism.pp_schedule}, {layout.facts.n_stages} stages of {layers_per_stage(cfg)} "
        f"layers, {layout.pipeline.n_micro} microbatches per pipeline", mesh.rank)
