"""The console line and metrics.jsonl: loss, grad norm, lr, throughput, MFU, memory, time.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak (fp8: twice that).
FLOPs per token come from model.flops_per_token (torchtitan's convention, so the two compare).

metrics.jsonl describes one run: a run that resumes from step N first drops the rows of steps
after N (a crashed run logged them, and they are about to be logged again), so a resumed run's
file reads as if it had never stopped. A loss or grad norm that is not finite (a skipped step) is
written as null. The ETA is the remaining steps times the mean step time since the first log (whose
interval holds the warm-up), shown once ETA_AFTER_STEPS steps are timed.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "B200": 2250e12,
             "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device, fp8: bool) -> float | None:
    """None where we do not know the peak (the CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if key in name.split() or f" {key}" in name:
            return peak * (2 if fp8 else 1)
    return None


def allocated_peak_gib(device: torch.device) -> float | None:
    """The most bytes tensors held at once (the caching allocator reserves more): what
    `minititan plan` predicts. None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_stats(device).get("reserved_bytes.all.peak", 0) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # host memory on the CPU
    return kib / 2**20


ETA_AFTER_STEPS = 5


class MetricsLogger:
    def __init__(self, dump_folder: str, jsonl: bool, flops_per_token: float, peak: float | None,
                 world_size: int, total_steps: int, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self.path = Path(dump_folder) / "metrics.jsonl" if jsonl and enabled else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_rows_after(self.path, resumed_step)
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.total_steps = total_steps
        self.timed_steps, self.timed_seconds, self.first_logged = 0, 0.0, False

    def log(self, step: int, loss: float, grad_norm: float, lr: float, tokens: int, seconds: float, steps: int,
            device: torch.device, extra: dict | None = None) -> dict:
        """tokens and seconds cover the `steps` steps since the last log (all ranks together)."""
        tps = tokens / seconds / self.world_size
        row = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
               "tokens_per_sec_per_device": tps,
               "mfu": 100 * tps * self.flops_per_token / self.peak if self.peak else None,
               "mem_peak_gib": peak_memory_gib(device), "mem_allocated_peak_gib": allocated_peak_gib(device),
               "step_time_s": seconds / steps}
        row |= extra or {}
        if not self.enabled:
            return row
        if self.first_logged:  # the first interval holds the warm-up: not a rate to go by
            self.timed_steps, self.timed_seconds = self.timed_steps + steps, self.timed_seconds + seconds
        self.first_logged = True
        eta = ("eta " + _hms(self.timed_seconds / self.timed_steps * (self.total_steps - step))
               if self.timed_steps >= ETA_AFTER_STEPS else "")
        mfu = f"{row['mfu']:5.1f}%" if row["mfu"] is not None else "  n/a"
        line = (f"step {step:5d}  loss {loss:7.4f}  gnorm {grad_norm:7.3f}  lr {lr:.2e}  "
                f"tok/s/dev {tps:9,.0f}  mfu {mfu}  mem {row['mem_peak_gib']:6.2f}GiB  "
                f"step {row['step_time_s']:6.3f}s  {eta}").rstrip()
        for k, v in (extra or {}).items():
            if isinstance(v, (dict, list)):
                continue  # per-layer tables (MoE loads) go to metrics.jsonl only
            line += f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        return row


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the rows of steps <= step (rewritten atomically: a crash leaves one file or the other)."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    part = path.with_suffix(".jsonl.part")
    part.write_text("".join(kept))
    os.replace(part, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Timer:
    """Wall time between log steps; synchronizes the device only when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def say(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, file=sys.stdout, flush=True)
