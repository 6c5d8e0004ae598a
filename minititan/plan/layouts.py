"""Every layout worth trying for a model on N GPUs, dry-run in two rounds, ranked.

The knobs: pp (with each schedule) x dp_replicate x dp_shard x cp x tp (and ep for MoE), the
activation checkpointing mode (selective: per op), and the local batch size; the global batch,
the model and every other setting stay the config's. A knob set on the command line stays
fixed (`--activation_checkpoint.selective=2`: selective AC, wherever tried, is every 2nd block).

    meshes       pp: divisors of the world up to the layer count; tp: divisors of the GPUs per
                 node (tensor parallel stays inside a node) that divide the heads, kv heads,
                 hidden and vocabulary, with sequence parallel on; cp: 1, and powers of two when
                 the sequence is long (>= 16,384 tokens) or nothing fits without it; the data
                 ranks left split into dp_shard x dp_replicate with shard groups of one node,
                 a few nodes, or all of them; ep: the divisors of dp_shard x cp that divide
                 the experts. A mesh the global batch cannot be spread over is left out
                 (train would refuse it).
    round 1      each mesh, most sharded (dp_replicate 1), at its lightest (full activation
                 checkpointing, local batch 1, 1F1B): a mesh that does not fit so is dropped,
                 with by how much.
    round 2      the WIDTH fastest meshes of round 1: every AC mode, growing the local batch
                 until it no longer fits (memory only grows with it); then, at each mesh's best,
                 the other schedules (interleaved 1F1B, zero bubble; GPipe has 1F1B's bubble and
                 holds more, so it is tried only when asked for) and the HSDP splits.
    round 3      the best `top`, estimated again with every run the estimate takes (rounds 1
                 and 2 take a micro-batch's time as half of two's, and run compiled configs
                 eagerly: see _looked_at).

Every candidate is checked by the trainer's own refusals first (the same one-line messages
`train` prints), and each dry run is done once, on a pool of worker processes that start with
the search; a candidate is estimated as soon as its own dry runs are back.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import time

import msgspec

from minititan.core.config import Config, UserError, hidden_dim
from minititan.core import config as config_lib
from minititan.layout import parallelize
from minititan.plan.devices import Device
from minititan.plan.estimate import Estimate, dry_runs_needed, estimate, run_key

LONG_SEQUENCE = 16384  # from here on context parallel is worth trying
AC_MODES = ("full", "selective", "none")
# and from LONG_SEQUENCE on, "attention": selective = "attention" (full AC keeping the attention's results)
SCHEDULES = ("1f1b", "interleaved_1f1b", "zero_bubble")  # gpipe: 1F1B's bubble with more memory (ask for it to get it)
WIDTH = 4  # round 2 explores this many of the fastest meshes of round 1
MESH_KEYS = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")


@dataclasses.dataclass
class Candidate:
    settings: dict[str, object]  # "parallelism.tp" -> 8, "activation_checkpoint.mode" -> "full", ...
    cfg: Config | None = None
    refusal: str | None = None  # train's one-line refusal, if it would refuse this
    estimate: Estimate | None = None

    def label(self) -> str:
        s = {k.split(".")[-1]: v for k, v in self.settings.items()}
        parts = [f"{d} {s[d]}" for d in MESH_KEYS if s.get(d, 1) != 1]
        if s.get("pp", 1) > 1:
            parts[0] += f" {s['pp_schedule']}"
        return " x ".join(parts) or "one rank"


def with_settings(cfg: Config, settings: dict[str, object]) -> Config:
    """cfg with `section.key` -> value replaced, typed and checked as an override would be
    (tp="abc" and ac="bogus" are refused here)."""
    raw = msgspec.to_builtins(cfg)
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return config_lib.from_dict(raw)


def refusal(cfg: Config, world: int) -> str | None:
    """The line `train` would refuse this layout with on `world` ranks, or None."""
    try:
        parallelize.check(cfg, world)
    except UserError as e:
        return str(e)
    return None


# ---------------------------------------------------------------- the candidates


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(cfg: Config, world: int, gpus_per_node: int, pinned: dict[str, int], with_cp: bool) -> list[dict]:
    m, seq = cfg.model, cfg.training.seq_len
    tps = [t for t in divisors(gpus_per_node) if world % t == 0
           and all(x % t == 0 for x in (m.n_heads, m.n_kv_heads, hidden_dim(m), m.vocab_size, seq))]
    cps = [c for c in (1, 2, 4, 8, 16, 32) if world % c == 0 and seq % (2 * c) == 0 and (c == 1 or with_cp)]
    out = []
    for tp in _pinned(tps, pinned, "tp"):
        for cp in _pinned(cps, pinned, "cp"):
            for pp in _pinned([p for p in divisors(world // (tp * cp)) if p <= m.n_layers], pinned, "pp"):
                data = world // (tp * cp * pp)
                for dp_shard in _pinned(shard_sizes(data, tp * cp, gpus_per_node), pinned, "dp_shard"):
                    dp_replicate = data // dp_shard
                    if data % dp_shard or pinned.get("dp_replicate", dp_replicate) != dp_replicate:  # a pin that does not fit here
                        continue
                    for ep in _pinned(expert_degrees(cfg, dp_shard * cp), pinned, "ep"):
                        out.append(dict(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, ep=ep))
    return out


def _pinned(values: list[int], pinned: dict[str, int], key: str) -> list[int]:
    return [pinned[key]] if key in pinned else values


def shard_sizes(data: int, per_rank_gpus: int, gpus_per_node: int) -> list[int]:
    """dp_shard choices for `data` data ranks: all of them (FSDP), and shard groups of one node,
    two and four nodes (HSDP), which keep the all-gathers on fewer network hops."""
    per_node = max(1, gpus_per_node // per_rank_gpus)
    sizes = {data} | {per_node * k for k in (1, 2, 4)} | ({1} if data <= 8 else set())
    return sorted(s for s in sizes if s <= data and data % s == 0)


def expert_degrees(cfg: Config, data: int) -> list[int]:
    if cfg.model.name != "moe":
        return [1]
    return [e for e in divisors(data) if cfg.model.n_experts % e == 0]


def settings_of(mesh: dict, ac: str, local_batch: int, schedule: str) -> dict[str, object]:
    s = {f"parallelism.{k}": v for k, v in mesh.items()}
    s |= {"parallelism.sequence_parallel": mesh["tp"] > 1, "parallelism.pp_schedule": schedule,
          "parallelism.pp_microbatches": 0, "activation_checkpoint.mode": ac,
          "training.local_batch_size": local_batch}
    if ac in ("selective", "attention"):  # unless pinned: make() lays the pins over these
        s["activation_checkpoint.mode"] = "selective"
        s["activation_checkpoint.selective"] = "op" if ac == "selective" else "attention"
    return s


def ac_choice(settings: dict[str, object]) -> str:
    """The AC_MODES entry a candidate's settings came from (settings_of's inverse)."""
    if settings.get("activation_checkpoint.selective") == "attention":
        return "attention"
    return settings["activation_checkpoint.mode"]


def local_batches(cfg: Config, mesh: dict) -> list[int]:
    per_rank = cfg.training.global_batch_size // (mesh["dp_replicate"] * mesh["dp_shard"])
    return [b for b in divisors(per_rank) if b <= 16]


# ---------------------------------------------------------------- the search


@dataclasses.dataclass
class Search:
    ranked: list[Candidate]  # fitting, best tokens/s per GPU first
    unfit: list[Candidate]  # meshes that do not fit even at their lightest, least over first
    refused: dict[str, int]  # train's refusal -> how many candidates got it
    dry_runs: int
    seconds: float


def search(cfg: Config, world: int, device: Device, gpus_per_node: int, pinned: dict[str, object],
           workers: int | None = None, progress=None, width: int = WIDTH, top: int = 10) -> Search:
    start = time.time()
    pool = DryRunPool(world, device, gpus_per_node, workers)
    refused: dict[str, int] = {}
    mesh_pins = {k.split(".")[1]: v for k, v in pinned.items() if k.split(".")[1] in MESH_KEYS}
    long = cfg.training.seq_len >= LONG_SEQUENCE or "parallelism.cp" in pinned

    def lightest(with_cp: bool) -> list[Candidate]:
        out = []
        for mesh in meshes(cfg, world, gpus_per_node, mesh_pins, with_cp):
            if mesh["dp_replicate"] > 1 and "parallelism.dp_replicate" not in pinned:
                continue  # round 1 takes the most sharded split; the others are round 2's
            batches = local_batches(cfg, mesh)
            schedule = pinned.get("parallelism.pp_schedule", "1f1b")
            c = make(cfg, world, settings_of(mesh, pinned.get("activation_checkpoint.mode", "full"),
                                             pinned.get("training.local_batch_size", batches[0] if batches else 1),
                                             schedule), pinned, refused)
            if c is not None:
                out.append(c)
        return out

    first = lightest(long)
    pool.run(first, progress, "round 1: each mesh at its lightest", quick=True)
    fit = [c for c in first if c.estimate and c.estimate.fits]
    if not fit and not long:  # nothing fits without context parallel: try it
        more = [c for c in lightest(True) if c.settings["parallelism.cp"] > 1]
        pool.run(more, progress, "round 1: with context parallel", quick=True)
        first += more
        fit = [c for c in more if c.estimate and c.estimate.fits]
    fit.sort(key=lambda c: -c.estimate.tokens_per_s)
    explored = fit[:width]

    def variants(base: Candidate, **changes) -> Candidate | None:
        mesh = {k: base.settings[f"parallelism.{k}"] for k in MESH_KEYS} | changes.pop("mesh", {})
        s = {"ac": ac_choice(base.settings), "batch": base.settings["training.local_batch_size"],
             "schedule": base.settings["parallelism.pp_schedule"]} | changes
        return make(cfg, world, settings_of(mesh, s["ac"], s["batch"], s["schedule"]), pinned, refused)

    def best_of(group: list[Candidate]) -> Candidate:
        return max((c for c in group if c.estimate and c.estimate.fits), key=lambda c: c.estimate.tokens_per_s)

    # round 2a: every AC mode, growing the local batch until it no longer fits
    grown = []
    for light in explored:
        acs = ([pinned["activation_checkpoint.mode"]] if "activation_checkpoint.mode" in pinned else
               AC_MODES + ("attention",) if cfg.training.seq_len >= LONG_SEQUENCE else AC_MODES)
        batches = ([pinned["training.local_batch_size"]] if "training.local_batch_size" in pinned
                   else local_batches(cfg, {k: light.settings[f"parallelism.{k}"] for k in MESH_KEYS}))
        grown += [c for ac in acs for b in batches if (c := variants(light, ac=ac, batch=b)) is not None]
    pool.run(grown, progress, "round 2: AC modes and batch sizes", quick=True,
             grow=lambda c: (ac_choice(c.settings),
                             tuple(c.settings[f"parallelism.{k}"] for k in MESH_KEYS)))
    # round 2b: the other schedules and the HSDP splits, each at its mesh's best so far
    others = []
    for light in explored:
        mesh = {k: light.settings[f"parallelism.{k}"] for k in MESH_KEYS}
        best = best_of([light] + [c for c in grown if _same_mesh(c, light)])
        if mesh["pp"] > 1 and "parallelism.pp_schedule" not in pinned:
            others += [c for sch in SCHEDULES if sch != best.settings["parallelism.pp_schedule"]
                       if (c := variants(best, schedule=sch)) is not None]
        if "parallelism.dp_shard" not in pinned and "parallelism.dp_replicate" not in pinned:
            for split in meshes(cfg, world, gpus_per_node, {k: mesh[k] for k in ("pp", "cp", "tp", "ep")}, True):
                if split["dp_shard"] != mesh["dp_shard"] and (c := variants(best, mesh=split)) is not None:
                    others.append(c)
    pool.run(others, progress, "round 2: schedules and HSDP splits", quick=True)
    second = grown + others
    # round 3: the best, estimated with both micro-batch points
    quick_ranked = sorted((c for c in first + second if c.estimate and c.estimate.fits),
                          key=lambda c: -c.estimate.tokens_per_s)
    final = [Candidate(c.settings, c.cfg) for c in _unique(quick_ranked)[:top]]
    pool.run(final, progress, "round 3: the best, in full")
    ranked = sorted((c for c in final if c.estimate and c.estimate.fits), key=lambda c: -c.estimate.tokens_per_s)
    unfit = sorted((c for c in first if c.estimate and not c.estimate.fits), key=lambda c: c.estimate.over_gib)
    for c in first + second:
        if c.refusal:
            refused[c.refusal] = refused.get(c.refusal, 0) + 1
    pool.close()
    return Search(ranked, unfit, refused, pool.count, time.time() - start)


def make(cfg: Config, world: int, settings: dict[str, object], pinned: dict[str, object],
         refused: dict[str, int]) -> Candidate | None:
    settings = settings | pinned
    try:  # the global batch as train derives it for this layout (0: local batch x data-parallel ranks)
        layout_cfg = parallelize.with_global_batch(with_settings(cfg, settings), world)
    except UserError as e:
        refused[str(e)] = refused.get(str(e), 0) + 1
        return None
    why = refusal(layout_cfg, world)
    if why is not None:
        refused[why] = refused.get(why, 0) + 1
        return None
    return Candidate(settings, layout_cfg)


def _identity(c: Candidate) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in c.settings.items()))


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in candidates:
        if _identity(c) not in seen:
            seen.add(_identity(c))
            out.append(c)
    return out


def _same_mesh(a: Candidate, b: Candidate) -> bool:
    return all(a.settings[f"parallelism.{k}"] == b.settings[f"parallelism.{k}"] for k in MESH_KEYS)


# ---------------------------------------------------------------- the workers


def _dry_run_job(job):
    cfg, world, rank, capability = job
    from minititan.plan.dryrun import dry_run
    try:
        return dry_run(cfg, world, rank, capability)
    except Exception as e:  # noqa: BLE001  a layout the dry run cannot take is reported, not fatal
        return f"{type(e).__name__}: {e}"


def _warm_up() -> None:
    """A worker imports what a dry run needs as it starts, while the search enumerates."""
    import minititan.plan.dryrun  # noqa: F401
    import minititan.train  # noqa: F401


RESULT_WAIT_S = 900  # far longer than any one dry run of a search takes (405B on 512 ranks: seconds)


class DryRunPool:
    """Dry runs on worker processes (each needs a process without a process group of its own),
    each (config, rank) once. The workers start with the pool; a candidate is estimated (here,
    in the parent) as soon as its own dry runs are back, while the workers go on with the rest."""

    def __init__(self, world: int, device: Device, gpus_per_node: int, workers: int | None):
        self.world, self.device, self.gpus_per_node = world, device, gpus_per_node
        self.workers = workers if workers is not None else max(1, min(len(os.sched_getaffinity(0)), 8))
        self.results: dict = {}  # run key -> RankRun, or the line a failed dry run left
        self.count = 0
        self._done: queue.Queue = queue.Queue()  # (run key, result) as the workers finish
        self._pool = (multiprocessing.get_context("spawn").Pool(self.workers, initializer=_warm_up)
                      if self.workers > 1 else None)

    def run(self, candidates: list[Candidate], progress, what: str, grow=None, quick: bool = False) -> None:
        """Estimate every candidate. With `grow`, candidates sharing grow(c) are taken in order of
        local batch, each once the one before fits (memory only grows with the batch): the rest
        of a group is skipped once one does not fit."""
        groups: dict = {}
        for c in candidates:
            groups.setdefault(grow(c) if grow else id(c), []).append(c)
        for group in groups.values():
            group.sort(key=lambda c: c.settings["training.local_batch_size"])
        waiting: dict[int, tuple[Candidate, list, list]] = {}  # id -> (candidate, its run keys, its group)
        in_flight: set = set()
        total, done = len(candidates), 0

        def start(c: Candidate, group: list) -> None:
            keys = []
            for cfg, rank in dry_runs_needed(_looked_at(c.cfg, quick), self.world, quick=quick):
                key = run_key(cfg, rank)
                if key not in self.results and key not in in_flight:
                    in_flight.add(key)
                    self._submit(key, (cfg, self.world, rank, tuple(self.device.capability)))
                keys.append(key)
            waiting[id(c)] = (c, keys, group)

        for group in groups.values():
            start(group[0], group)
        while waiting:
            for ready, keys, group in [w for w in waiting.values() if all(k in self.results for k in w[1])]:
                del waiting[id(ready)]
                self._estimate(ready, quick)
                done += 1
                following = group.index(ready) + 1
                if following < len(group) and (ready.estimate is None or ready.estimate.fits):
                    start(group[following], group)
                if progress:
                    fit = [c for c in candidates if c.estimate and c.estimate.fits]
                    best = max((c.estimate.tokens_per_s for c in fit), default=0)
                    progress(f"plan: {what}: {done}/{total} layouts, {len(fit)} fit, best {best:,.0f} tokens/s/GPU, "
                             f"{self.count} dry runs")
            if waiting:
                key, out = self._next_result()
                in_flight.discard(key)
                self.results[key] = out
                self.count += 1

    def _next_result(self, timeout: float = RESULT_WAIT_S):
        """The next (run key, result) a worker sends. A worker killed mid-way (out of memory, a
        signal) never answers, and the pool does not say so: after `timeout` with no answer, stop."""
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            raise UserError(f"no dry run came back in {timeout:.0f} s: a worker process probably died (out of "
                            f"memory, killed); run again with --workers 1, which dry-runs in this process and "
                            f"shows why") from None

    def _submit(self, key, job) -> None:
        if self._pool is None:  # a failed dry run: its line, as on the pool
            self._done.put((key, _dry_run_job(job)))
            return
        self._pool.apply_async(_dry_run_job, (job,), callback=lambda out: self._done.put((key, out)),
                               error_callback=lambda e: self._done.put((key, f"{type(e).__name__}: {e}")))

    def _estimate(self, c: Candidate, quick: bool) -> None:
        cfg = _looked_at(c.cfg, quick)
        needed = dry_runs_needed(cfg, self.world, quick=quick)
        failed = [self.results[run_key(*k)] for k in needed if isinstance(self.results[run_key(*k)], str)]
        if failed:
            c.refusal = f"the dry run failed: {failed[0]}"
            return
        c.estimate = estimate(cfg, self.world, self.device, self.gpus_per_node, runs=self.results, quick=quick)

    def close(self) -> None:
        """Stop the workers: after a search nothing is pending, after an error nothing is wanted."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _looked_at(cfg: Config, quick: bool) -> Config:
    """The config a first look dry-runs: eager, where compile is on (the compile stand-in traces
    each new shape once per process, and a search meets many; compiled steps hold less and run
    faster, so a layout that fits eager fits compiled): round 3 estimates the best compiled."""
    if not quick or not cfg.compile.enable:
        return cfg
    return msgspec.structs.replace(cfg, compile=msgspec.structs.replace(cfg.compile, enable=False))
