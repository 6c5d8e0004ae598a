"""One layout's estimate: the worst rank's memory and the step's time, from dry runs.

    est = estimate(cfg, world=64, device=devices.load("h100"), gpus_per_node=8)
    est.peak_gib, est.tokens_per_s, est.step.exposed

Which ranks: every rank of a layout holds the same shapes except along pp (the first stage
holds the embedding, the last the output layer and the loss, and under 1F1B the first keeps
the most microbatches in flight), so rank 0 and the first rank of the last pipeline stage are
dry-run, and the worse of the two is reported.

Fewer layers and micro-batches, then straight lines. A dry run costs about a millisecond per op
on this CPU, and a rank of Llama 3.1 405B runs thousands of ops per layer and micro-batch, so a
layout is dry-run with the same shapes but fewer layers (3u and 4u per pipeline stage, u = 1, or
the period of layers that differ: MoE every N-th block, activation checkpointing every N-th)
and fewer micro-batches (1 and 2), and every measured quantity, bytes and seconds alike, is
extended along the lines through those runs to the real numbers. Every layer and every
micro-batch is the same code on the same shapes, so the lines are exact for what is held per
layer and for per-layer, per-micro-batch times; `exact=True` dry-runs the real model instead
(tests/test_plan.py checks the two agree).
"""
from __future__ import annotations

import dataclasses
import math

import msgspec

from minititan.core import model
from minititan.core.config import Config
from minititan.core.optim import pick_implementation
from minititan.layout import pipeline
from minititan.plan.devices import Device
from minititan.plan.dryrun import RankRun, dry_run
from minititan.plan.timing import StepTime, pipeline_bubble, step_time

GiB = 2**30


@dataclasses.dataclass
class RankEstimate:
    rank: int
    pp_rank: int
    peak_bytes: float  # allocated peak of the step
    setup_peak_bytes: float
    at_peak: dict[str, float]
    state_bytes: dict[str, float]
    step: StepTime
    forward_s: float  # one forward of one stage on one microbatch (pipeline costs)
    backward_s: float


@dataclasses.dataclass
class Estimate:
    world: int
    gpus_per_node: int
    device: str
    ranks: list[RankEstimate]
    worst: RankEstimate  # the most memory
    peak_bytes: float  # the worst rank's allocated peak (step or setup, whichever is higher)
    reserved_bytes: float  # the caching allocator's reserve for it (x fragmentation)
    fits: bool
    over_gib: float  # how much more than the device holds (negative: headroom)
    step: StepTime  # the slowest rank's step, with the pipeline bubble
    tokens_per_s: float  # per GPU
    mfu: float  # percent, as metrics.jsonl counts it (the fp8 peak under float8)
    eager_under_compile: list[str] = dataclasses.field(default_factory=list)  # ran eagerly in the dry run: priced slow


def ranks_to_run(cfg: Config, world: int) -> list[int]:
    """Rank 0, and under pp the first rank of the last stage (pp is the outermost mesh dim)."""
    pp = cfg.parallelism.pp
    return [0] if pp <= 1 else [0, (pp - 1) * (world // pp)]


def layer_period(cfg: Config) -> int:
    """The fewest consecutive layers that repeat exactly (MoE frequency, AC every N-th block)."""
    period = cfg.model.moe_frequency if cfg.model.name == "moe" else 1
    ac = cfg.activation_checkpoint
    if ac.mode == "selective" and ac.selective.isdigit():
        period = math.lcm(period, int(ac.selective))
    return period


def with_layers_per_stage(cfg: Config, per_stage: int) -> Config:
    """cfg with every pipeline stage (or the whole model, without pp) holding per_stage layers."""
    n_stages = cfg.parallelism.pp * pipeline.virtual_stages(cfg)
    par = cfg.parallelism
    if par.pp > 1:
        par = msgspec.structs.replace(par, pp_layers_per_stage=[per_stage] * n_stages)
    return msgspec.structs.replace(cfg, model=msgspec.structs.replace(cfg.model, n_layers=per_stage * n_stages),
                                   parallelism=par)


def rank_layers_per_stage(cfg: Config, world: int, rank: int) -> float:
    pp = cfg.parallelism.pp
    if pp <= 1:
        return cfg.model.n_layers
    layers = pipeline.rank_layers(cfg, rank // (world // pp))
    return sum(len(r) for r in layers.values()) / len(layers)


def points(cfg: Config, world: int, exact: bool = False, quick: bool = False) -> tuple[list, list]:
    """The layers per stage and the micro-batches per step the dry runs take: the real ones, or
    (3u, 4u) and (1, 2) where the real ones are more (quick, the search's first looks: (2u, 3u),
    and micro-batches 2 only, each taken to cost half of those two). Not one and two layers: with
    few, the peak sits elsewhere in the step (in backward, once the gradients outweigh the
    activations), and the line through such points misses the real one by a few percent."""
    u = layer_period(cfg)
    layers = max(rank_layers_per_stage(cfg, world, r) for r in ranks_to_run(cfg, world))
    n_micro = microbatches(cfg, world)
    first = 2 * u if quick else 3 * u
    reduce_layers, reduce_micro = not exact and layers > first + u, not exact and n_micro > 2
    return ([first, first + u] if reduce_layers else [None]), ([2] if quick else [1, 2]) if reduce_micro else [None]


def microbatches(cfg: Config, world: int) -> int:
    p, t = cfg.parallelism, cfg.training
    return t.global_batch_size // (world // (p.pp * p.tp * p.cp)) // t.local_batch_size


def reduced(cfg: Config, world: int, layers: int | None, n_micro: int | None) -> Config:
    """cfg with `layers` per stage and a global batch of `n_micro` micro-batches (None: as is)."""
    if layers is not None:
        cfg = with_layers_per_stage(cfg, layers)
    if n_micro is not None:
        p, t = cfg.parallelism, cfg.training
        data = world // (p.pp * p.tp * p.cp)
        cfg = msgspec.structs.replace(cfg, training=msgspec.structs.replace(
            t, global_batch_size=data * t.local_batch_size * n_micro))
    return cfg


def dry_runs_needed(cfg: Config, world: int, exact: bool = False, quick: bool = False) -> list[tuple[Config, int]]:
    """The (config, rank) dry runs an estimate takes."""
    layer_points, micro_points = points(cfg, world, exact, quick)
    return [(reduced(cfg, world, n, m), r) for r in ranks_to_run(cfg, world)
            for n in layer_points for m in micro_points]


def estimate(cfg: Config, world: int, device: Device, gpus_per_node: int, exact: bool = False,
             runs: dict | None = None, quick: bool = False) -> Estimate:
    """The estimate of one layout. `runs` maps (config, rank) -> RankRun for runs already made
    (by a pool of workers, say); the ones missing are dry-run here.

    Each quantity is a line (or a plane) through the reduced runs: in layers per stage, and in
    micro-batches (each does the same work on the same shapes), except the peak, which is the
    same for every micro-batch after the first: it is read from the runs with two (or the real one)."""
    runs, needed = dict(runs or {}), dry_runs_needed(cfg, world, exact, quick)
    for key in needed:
        if run_key(*key) not in runs:
            runs[run_key(*key)] = dry_run(key[0], world, key[1], tuple(device.capability))
    layer_points, micro_points = points(cfg, world, exact, quick)
    per_rank = []
    for rank in ranks_to_run(cfg, world):
        at = {(n, m): _rank_estimate(c, runs[run_key(c, rank)], device, gpus_per_node)
              for n in layer_points for m in micro_points for c in [reduced(cfg, world, n, m)]}
        layers = rank_layers_per_stage(cfg, world, rank)
        x = (layers - layer_points[0]) / (layer_points[1] - layer_points[0]) if layer_points[0] else 0.0
        one = _plane(at, layer_points, micro_points, x, microbatches(cfg, world) - 1 if micro_points[0] else 0.0)
        if micro_points == [2]:  # quick: half of two micro-batches' time per micro-batch
            one = _extend(dataclasses.replace(one, step=_zero(one.step)), one, microbatches(cfg, world) / 2)
        steady = _plane(at, layer_points, micro_points[-1:], x, 0.0)  # memory: the last micro-batch's
        per_rank.append(dataclasses.replace(one, peak_bytes=steady.peak_bytes, at_peak=steady.at_peak,
                                            setup_peak_bytes=steady.setup_peak_bytes, state_bytes=steady.state_bytes))
    eager = sorted({f for key in needed for f in runs[run_key(*key)].eager_under_compile})
    return dataclasses.replace(_combine(cfg, world, device, gpus_per_node, per_rank), eager_under_compile=eager)


def _zero(step: StepTime) -> StepTime:
    def zero(v):
        return {k: 0.0 for k in v} if isinstance(v, dict) else 0.0
    return StepTime(**{f.name: zero(getattr(step, f.name)) for f in dataclasses.fields(StepTime)})


def _plane(at: dict, layer_points: list, micro_points: list, x: float, y: float) -> RankEstimate:
    """The point (x, y) of the plane through the runs: x steps of the layer line, y of the micro-batch line."""
    n0, m0 = layer_points[0], micro_points[0]
    base = at[(n0, m0)]
    if len(layer_points) > 1:
        base = _extend(base, at[(layer_points[1], m0)], x)
    if len(micro_points) > 1:
        other = at[(n0, micro_points[1])]
        if len(layer_points) > 1:
            other = _extend(other, at[(layer_points[1], micro_points[1])], x)
        base = _extend(base, other, y)
    return base


def run_key(cfg: Config, rank: int) -> tuple[bytes, int]:
    """What identifies a dry run: the config (as JSON) and the rank."""
    return msgspec.json.encode(cfg), rank


def _rank_estimate(cfg: Config, run: RankRun, device: Device, gpus_per_node: int) -> RankEstimate:
    par = cfg.parallelism
    optimizer = pick_implementation(cfg.optimizer.implementation, cfg.compile.enable, on_gpu=True)
    step = step_time(run.events, device, gpus_per_node, optimizer)
    passes = run.n_micro * (pipeline.n_microbatches(cfg) * pipeline.virtual_stages(cfg) if par.pp > 1 else 1)
    return RankEstimate(run.rank, run.coords["pp"], run.peak_bytes, run.setup_peak_bytes, dict(run.at_peak),
                        dict(run.state_bytes), step, step.phases.get("forward", 0.0) / passes,
                        step.phases.get("backward", 0.0) / passes)


def _extend(a: RankEstimate, b: RankEstimate, steps: float) -> RankEstimate:
    """The point `steps` from a along the line a -> b (b is one step), for every number in them."""
    def line(u, v):
        if isinstance(u, dict):
            return {k: line(u.get(k, 0.0), v.get(k, 0.0)) for k in u.keys() | v.keys()}
        if isinstance(u, StepTime):
            return StepTime(**{f.name: line(getattr(u, f.name), getattr(v, f.name))
                               for f in dataclasses.fields(StepTime)})
        return u + (v - u) * steps
    return RankEstimate(b.rank, b.pp_rank, **{f.name: line(getattr(a, f.name), getattr(b, f.name))
                                               for f in dataclasses.fields(RankEstimate)
                                               if f.name not in ("rank", "pp_rank")})


def _combine(cfg: Config, world: int, device: Device, gpus_per_node: int, ranks: list[RankEstimate]) -> Estimate:
    par, t = cfg.parallelism, cfg.training
    worst = max(ranks, key=lambda r: max(r.peak_bytes, r.setup_peak_bytes))
    slowest = max(ranks, key=lambda r: r.step.total)
    step = dataclasses.replace(slowest.step)
    if par.pp > 1:  # every rank waits for the pipeline to fill and drain, at its slowest stage's pace
        forward, backward = max(r.forward_s for r in ranks), max(r.backward_s for r in ranks)
        n_pipelines = t.global_batch_size // (world // (par.pp * par.tp * par.cp)) // t.local_batch_size
        step.bubble = n_pipelines * pipeline_bubble(par.pp_schedule, par.pp, pipeline.n_microbatches(cfg),
                                                    pipeline.virtual_stages(cfg), forward, backward)
        step.total += step.bubble
    peak = max(worst.peak_bytes, worst.setup_peak_bytes)
    reserved = peak * device.fragmentation
    over = (reserved / GiB + device.reserved_gib) - device.memory_gib
    tokens = t.global_batch_size * t.seq_len / world / step.total
    peak_flops = device.peak_bf16_tflops * 1e12 * (2 if cfg.float8.enable else 1)
    mfu = 100 * tokens * model.flops_per_token(cfg.model, t.seq_len) / peak_flops
    return Estimate(world, gpus_per_node, device.name, ranks, worst, peak, reserved, over <= 0, over, step, tokens, mfu)
