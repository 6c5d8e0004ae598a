"""`minititan plan` and `minititan train --dry-run`: the commands over plan/'s pieces.

    minititan plan -c configs/llama3_70b.toml --gpus 64 --gpu h100         # every valid layout, ranked
    minititan plan -c configs/llama3_8b.toml --gpus 8 --layout dp_shard=8  # one layout's breakdown
    minititan train -c configs/llama3_405b.toml --nproc 512 --dry-run      # the job's refusals, in seconds
"""
from __future__ import annotations

import json
import sys
import time

from minititan.core.config import Config, UserError
from minititan.layout import parallelize
from minititan.plan import devices, report
from minititan.plan.estimate import GiB
from minititan.plan.layouts import MESH_KEYS, Candidate, make, search

LAYOUT_KEYS = {**{k: f"parallelism.{k}" for k in MESH_KEYS}, "pp_schedule": "parallelism.pp_schedule",
               "pp_microbatches": "parallelism.pp_microbatches", "pp_virtual_stages": "parallelism.pp_virtual_stages",
               "ac": "activation_checkpoint.mode", "batch": "training.local_batch_size",
               "sequence_parallel": "parallelism.sequence_parallel"}


def parse_layout(text: str) -> dict[str, object]:
    """"dp_shard=8,tp=2,ac=full" -> {"parallelism.dp_shard": 8, ...}; unnamed mesh dims are 1."""
    out: dict[str, object] = {f"parallelism.{k}": 1 for k in MESH_KEYS}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        if key not in LAYOUT_KEYS or not value:
            raise UserError(f"--layout {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(LAYOUT_KEYS)} "
                            f"(e.g. --layout dp_shard=8,tp=2)")
        out[LAYOUT_KEYS[key]] = int(value) if value.lstrip("-").isdigit() else (
            value.lower() == "true" if value.lower() in ("true", "false") else value)
    tp = out["parallelism.tp"]
    if isinstance(tp, int) and tp > 1:  # a value of the wrong type is refused where the config is checked
        out.setdefault("parallelism.sequence_parallel", True)
    return out


def run_plan(cfg: Config, overridden: set[str], gpus: int, gpu: str, gpus_per_node: int, layout: str | None,
             as_json: bool, top: int, workers: int | None) -> None:
    device = devices.load(gpu)
    if layout is not None:
        refused: dict[str, int] = {}
        c = make(cfg, gpus, _defaults_for_layout(cfg) | parse_layout(layout), {}, refused)
        if c is None:
            raise UserError(next(iter(refused)))  # the one line train would print
        from minititan.plan.estimate import estimate
        c.estimate = estimate(c.cfg, gpus, device, gpus_per_node)
        print(json.dumps(report.as_dict(c), indent=1) if as_json else
              report.breakdown(c, _header(c.cfg, gpus, device.name, gpus_per_node)))
        return
    try:  # every layout searched trains on the global batch this config would train on with `gpus`
        cfg = parallelize.with_global_batch(cfg, gpus)
    except UserError as e:
        raise UserError(f"training.global_batch_size = 0 means local batch x data-parallel ranks of the config's "
                        f"layout, which {gpus} GPUs cannot take ({e}): set --training.global_batch_size") from None
    header = _header(cfg, gpus, device.name, gpus_per_node)
    pinned = {key: _value(cfg, key) for key in overridden if key in _knobs()}
    result = search(cfg, gpus, device, gpus_per_node, pinned, workers, progress=_progress(), top=top)
    _progress_done()
    if as_json:
        print(json.dumps({"ranked": [report.as_dict(c) for c in result.ranked],
                          "unfit": [report.as_dict(c) for c in result.unfit], "refused": result.refused,
                          "dry_runs": result.dry_runs, "seconds": round(result.seconds, 1)}, indent=1))
    else:
        print(report.table(result, top, header))
        if result.ranked:
            print("\nthe best:\n" + report.breakdown(result.ranked[0], "").strip("\n"))


def _header(cfg: Config, gpus: int, gpu_name: str, gpus_per_node: int) -> str:
    t = cfg.training
    return (f"minititan plan: {cfg.model.name} dim {cfg.model.dim} x {cfg.model.n_layers} layers on {gpus} x "
            f"{gpu_name} ({gpus_per_node} per node); global batch {t.global_batch_size} x {t.seq_len} tokens, "
            f"compile {'on' if cfg.compile.enable else 'off'}, float8 {'on' if cfg.float8.enable else 'off'}")


def _defaults_for_layout(cfg: Config) -> dict[str, object]:
    """--layout takes the config's other knobs as they are."""
    return {"activation_checkpoint.mode": cfg.activation_checkpoint.mode,
            "training.local_batch_size": cfg.training.local_batch_size,
            "parallelism.pp_schedule": cfg.parallelism.pp_schedule}


def _knobs() -> set[str]:
    """The settings a search varies: one set on the command line stays as set."""
    return set(LAYOUT_KEYS.values()) | {"activation_checkpoint.selective"}


def _value(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


_last = [0.0]


def _progress():
    if not sys.stderr.isatty():
        def line(text: str) -> None:
            if time.time() - _last[0] > 10:
                _last[0] = time.time()
                print(text, file=sys.stderr, flush=True)
        return line

    def line(text: str) -> None:
        print("\r" + text[:150].ljust(150), end="", file=sys.stderr, flush=True)
    return line


def _progress_done() -> None:
    if sys.stderr.isatty():
        print("\r" + " " * 150 + "\r", end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- train --dry-run


def run_dry_train(cfg: Config, world: int) -> None:
    """What `minititan train --dry-run` does: the trainer's own refusals for this world, then one
    rank of each kind (the first and last pipeline stage) set up and stepped on fake tensors, so
    a shape, divisibility or layout error of a 512-rank job shows in seconds; and each rank's
    memory."""
    from minititan.plan.estimate import ranks_to_run
    from minititan.plan.layouts import refusal
    from minititan.plan.dryrun import dry_run
    cfg = parallelize.with_global_batch(cfg, world)  # as train derives it
    why = refusal(cfg, world)
    if why is not None:
        raise UserError(why)
    start = time.time()
    for rank in ranks_to_run(cfg, world):
        try:
            run = dry_run(cfg, world, rank)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  the error the real job would meet, in one line
            raise UserError(f"the dry run of rank {rank} of {world} failed: {type(e).__name__}: {e}") from None
        state = sum(run.state_bytes.values())
        print(f"dry run: rank {rank} of {world} ({_coords(run)}): step peak {run.peak_bytes / GiB:.2f} GiB allocated "
              f"(params, grads and optimizer state {state / GiB:.2f} GiB), setup peak {run.setup_peak_bytes / GiB:.2f} GiB"
              + (f"; ran eagerly under compile: {', '.join(run.eager_under_compile)}" if run.eager_under_compile else ""))
    print(f"dry run ok: {world} ranks, {time.time() - start:.1f} s (memory as on a GPU of compute capability 9.0; "
          f"`minititan plan` adds time and device limits)")


def _coords(run) -> str:
    shown = [f"{d} {run.coords[d]}/{n}" for d, n in run.mesh_sizes.items() if n > 1]
    return ", ".join(shown) or "one rank"
