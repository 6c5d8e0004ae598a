"""Where a profiled step's GPU time goes, from the Chrome trace `[profiling] enable` writes.

    python benchmarks/trace_summary.py outputs/profiling/rank0_steps5-6.json [more traces ...]

Per trace: the GPU span of the profiled steps, how much of it some kernel was running (busy) and
how much nothing was (idle: the GPU waited on the host or on another rank), communication kernel
time (NCCL) and the part of it that no compute kernel overlapped (exposed: the step waits for the
network there), then the kernels that took the most time. Times are per profiled step.
"""
from __future__ import annotations

import collections
import json
import re
import sys

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def exposed(comm: list[tuple[float, float]], compute: list[tuple[float, float]]) -> float:
    """Length of the comm intervals' union minus its overlap with the compute intervals' union."""
    comm, compute = merged(comm), merged(compute)
    overlap, j = 0.0, 0
    for s, e in comm:
        while j < len(compute) and compute[j][1] <= s:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < e:
            overlap += min(e, compute[k][1]) - max(s, compute[k][0])
            k += 1
    return union_length(comm) - overlap


def family(name: str) -> str:
    n = name.lower()
    for fam, pattern in (("comm", r"nccl"), ("attention", r"flash|fmha|attn|sdpa|cudnn"),
                         ("matmul", r"gemm|sm90|cutlass|xmma|matmul|_mm|wgmma|nvjet"),
                         ("optimizer", r"adam|foreach|multi_tensor"), ("copy", r"memcpy|memset|copy")):
        if re.search(pattern, n):
            return fam
    return "elementwise/fused"


def summarize(path: str, top: int = 15) -> str:
    events = json.load(open(path))["traceEvents"]
    # each step's range is in the trace twice (host and GPU annotation): count names
    steps = max(len({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}), 1)
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return f"{path}: no GPU events"
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    comm = [(s, e) for (s, e), ev in zip(spans, gpu) if family(ev["name"]) == "comm"]
    compute = [(s, e) for (s, e), ev in zip(spans, gpu) if family(ev["name"]) != "comm"]
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = union_length(spans)
    ms = lambda us: us / 1000 / steps  # noqa: E731  per step, in ms
    lines = [f"{path}: {steps} step(s); per step: span {ms(span):.1f} ms, busy {ms(busy):.1f} ms, "
             f"idle {ms(span - busy):.1f} ms ({100 * (span - busy) / span:.1f}%), compute {ms(union_length(compute)):.1f} ms, "
             f"comm {ms(union_length(comm)):.1f} ms, exposed comm {ms(exposed(comm, compute)):.1f} ms "
             f"({100 * exposed(comm, compute) / span:.1f}% of the span)"]
    by_family, by_name = collections.Counter(), collections.Counter()
    for ev in gpu:
        by_family[family(ev["name"])] += ev["dur"]
        by_name[ev["name"][:110]] += ev["dur"]
    lines.append("  by family: " + ", ".join(f"{f} {ms(t):.1f} ms" for f, t in by_family.most_common()))
    lines += [f"  {ms(t):8.2f} ms  {name}" for name, t in by_name.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for trace in sys.argv[1:]:
        print(summarize(trace))
