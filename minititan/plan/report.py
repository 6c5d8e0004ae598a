"""What `minititan plan` prints: the ranked table, one layout's breakdown, or JSON."""
from __future__ import annotations

from minititan.plan.compiled import EAGER_FOR_REAL
from minititan.plan.estimate import GiB, Estimate
from minititan.plan.layouts import Candidate, Search
from minititan.plan.memory import CATEGORIES
from minititan.plan.timing import COMM_KINDS

SHORT = {"fsdp all-gather": "fsdp-ag", "fsdp reduce-scatter": "fsdp-rs", "dp all-reduce": "dp-ar", "tp": "tp",
         "cp": "cp", "ep all-to-all": "ep-a2a", "pp send/recv": "pp", "other": "other"}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}"


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f} GiB" if nbytes >= GiB / 100 else f"{nbytes / 2**20:8.2f} MiB"


def knobs(c: Candidate) -> tuple[str, str]:
    ac = c.cfg.activation_checkpoint  # selective: "op", or every N-th block (a --layout run keeps the config's)
    return (f"sel-{ac.selective}" if ac.mode == "selective" else ac.mode), str(c.cfg.training.local_batch_size)


def exposed(e: Estimate) -> str:
    parts = [f"{SHORT[k]} {ms(v)}" for k, v in sorted(e.step.exposed.items(), key=lambda kv: -kv[1])
             if v * 1e3 >= 0.5]
    return ", ".join(parts) or "-"


def table(search: Search, top: int, header: str) -> str:
    lines = [header, f"{len(search.ranked)} layouts fit; {search.dry_runs} dry runs in {search.seconds:.0f} s.", ""]
    if search.ranked:
        rows = [("#", "layout", "AC", "batch", "mem GiB", "tok/s/GPU", "MFU %", "step ms", "compute", "optim",
                 "bubble", "exposed comm ms")]
        for i, c in enumerate(search.ranked[:top], 1):
            e = c.estimate
            compute = sum(v for k, v in e.step.compute.items() if k != "optimizer")
            rows.append((str(i), c.label(), *knobs(c), f"{e.reserved_bytes / GiB:.1f}",
                         f"{e.tokens_per_s:,.0f}" + ("*" if e.eager_under_compile else ""),
                         f"{e.mfu:.1f}", ms(e.step.total), ms(compute), ms(e.step.compute.get("optimizer", 0.0)),
                         ms(e.step.bubble), exposed(e)))
        lines += _columns(rows)
        lines.append("(mem: the worst rank's reserved peak, allocated x the allocator's fragmentation; compute, "
                     "optim, bubble and exposed communication add up to the step with the host's waits)")
        whys = [why for c in search.ranked[:top] for why in c.estimate.eager_under_compile]
        if any(EAGER_FOR_REAL not in why for why in whys):
            lines.append("(*: part of the step priced as eager, which the dry run could not trace under compile: "
                         "the real step is faster)")
        if any(EAGER_FOR_REAL in why for why in whys):
            lines.append("(*: part of the step runs eagerly under compile and is priced so: a graph break inside a "
                         "block checkpointed by a selective policy, where dynamo runs the whole block eagerly, e.g. "
                         "expert parallel's exact exchange, which parallelism.ep_capacity_factor > 0 or "
                         "activation_checkpoint.mode = \"full\" makes compile)")
        best = search.ranked[0].estimate.step
        if best.bubble > 0.3 * best.total:
            lines.append(f"(the best spends {100 * best.bubble / best.total:.0f}% of its step in the pipeline bubble: "
                         "more micro-batches per pipeline, from a larger training.global_batch_size, would hide it)")
    if search.unfit:
        lines += ["", "Did not fit even at their lightest (full activation checkpointing, the smallest local batch):"]
        for c in search.unfit[:top]:
            lines.append(f"  {c.label():40s} {c.estimate.over_gib:6.1f} GiB over")
        if len(search.unfit) > top:
            lines.append(f"  ... and {len(search.unfit) - top} more")
    if search.refused:
        lines += ["", "Refused by train (as it would say):"]
        for why, n in sorted(search.refused.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {n:4d} x {why}")
    return "\n".join(lines)


def breakdown(c: Candidate, header: str) -> str:
    e = c.estimate
    worst = e.worst
    where = (f"rank {worst.rank}, pipeline stage {worst.pp_rank}" if c.settings["parallelism.pp"] > 1
             else f"rank {worst.rank}; every rank holds the same")
    lines = [header, f"layout {c.label()}, activation checkpointing {knobs(c)[0]}, local batch {knobs(c)[1]}", ""]
    fit = f"fits, {-e.over_gib:.1f} GiB to spare" if e.fits else f"does NOT fit: {e.over_gib:.1f} GiB over"
    lines.append(f"memory of the worst rank ({where}): allocated peak {e.peak_bytes / GiB:.2f} GiB, reserved "
                 f"~{e.reserved_bytes / GiB:.2f} GiB ({fit})")
    for category in CATEGORIES:
        v = worst.at_peak.get(category, 0.0)
        if v >= 1024:
            lines.append(f"  {category:22s} {size(v)}")
    lines.append(f"  {'(setup peak: init)':22s} {size(worst.setup_peak_bytes)}")
    for r in e.ranks:
        if r is not worst:
            lines.append(f"  other rank {r.rank} (stage {r.pp_rank}): peak {r.peak_bytes / GiB:.2f} GiB")
    s = e.step
    compute = {k: v for k, v in s.compute.items() if k != "optimizer"}
    lines += ["", f"step {ms(s.total)} ms: {e.tokens_per_s:,.0f} tokens/s per GPU, MFU {e.mfu:.1f}%",
              f"  compute           {ms(sum(compute.values())):>8s} ms  "
              + ", ".join(f"{k} {ms(v)}" for k, v in sorted(compute.items(), key=lambda kv: -kv[1])),
              f"  optimizer         {ms(s.compute.get('optimizer', 0.0)):>8s} ms",
              f"  pipeline bubble   {ms(s.bubble):>8s} ms",
              f"  host (eager ops)  {ms(s.host_wait):>8s} ms",
              "  communication, exposed / on the wire:"]
    for kind in COMM_KINDS:
        if s.comm.get(kind, 0.0) > 0 or s.exposed.get(kind, 0.0) > 0:
            lines.append(f"    {kind:20s} {ms(s.exposed.get(kind, 0.0)):>8s} / {ms(s.comm.get(kind, 0.0))} ms")
    untraced = sorted({why.split(" (")[0] for why in e.eager_under_compile if EAGER_FOR_REAL not in why})
    if untraced:  # the real step compiles them (whole, or in pieces around a graph break)
        lines += ["", f"priced as eager (the dry run could not trace them; compiled, they run faster): {', '.join(untraced)}"]
    for why in sorted({why for why in e.eager_under_compile if EAGER_FOR_REAL in why}):
        lines += ["", f"priced as eager, as it runs: {why}"]
    return "\n".join(lines)


def as_dict(c: Candidate) -> dict:
    e = c.estimate
    out = {"layout": c.label(), "settings": dict(c.settings)}
    if c.refusal:
        return out | {"refused": c.refusal}
    s = e.step
    return out | {
        "fits": e.fits, "over_gib": round(e.over_gib, 3),
        "memory_gib": {"allocated_peak": round(e.peak_bytes / GiB, 3), "reserved_peak": round(e.reserved_bytes / GiB, 3),
                       "worst_rank": e.worst.rank, "setup_peak": round(e.worst.setup_peak_bytes / GiB, 3),
                       "at_peak": {k: round(v / GiB, 3) for k, v in e.worst.at_peak.items()}},
        "tokens_per_sec_per_device": round(e.tokens_per_s, 1), "mfu": round(e.mfu, 2),
        "step_ms": {"total": round(s.total * 1e3, 2), "compute": {k: round(v * 1e3, 2) for k, v in s.compute.items()},
                    "exposed_comm": {k: round(v * 1e3, 2) for k, v in s.exposed.items()},
                    "comm": {k: round(v * 1e3, 2) for k, v in s.comm.items()},
                    "bubble": round(s.bubble * 1e3, 2), "host": round(s.host_wait * 1e3, 2)},
        "priced_as_eager": e.eager_under_compile}


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 3, 4, 5, 6, 7, 8, 9, 10}
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
