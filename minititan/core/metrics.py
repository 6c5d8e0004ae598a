"""The console line and metrics.jsonl: loss, grad norm, lr, throughput, MFU, memory, time.

MFU = achieved model FLOP/s per device / the device's dense bf16 peak (fp8: twice that).
FLOPs per token come from model.flops_per_token (torchtitan's convention, so the two compare).
"""
from __future__ import annotations

import json
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


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_stats(device).get("reserved_bytes.all.peak", 0) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # host memory on the CPU
    return kib / 2**20


class MetricsLogger:
    def __init__(self, dump_folder: str, jsonl: bool, flops_per_token: float, peak: float | None,
                 world_size: int, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(dump_folder) / "metrics.jsonl" if jsonl and enabled else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.total_steps = total_steps

    def log(self, step: int, loss: float, grad_norm: float, lr: float, tokens: int, seconds: float, steps: int,
            device: torch.device, extra: dict | None = None) -> dict:
        """tokens and seconds cover the `steps` steps since the last log (all ranks together)."""
        tps = tokens / seconds / self.world_size
        row = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
               "tokens_per_sec_per_device": tps,
               "mfu": 100 * tps * self.flops_per_token / self.peak if self.peak else None,
               "mem_peak_gib": peak_memory_gib(device), "step_time_s": seconds / steps}
        row |= extra or {}
        if not self.enabled:
            return row
        eta = row["step_time_s"] * (self.total_steps - step)
        mfu = f"{row['mfu']:5.1f}%" if row["mfu"] is not None else "  n/a"
        line = (f"step {step:5d}  loss {loss:7.4f}  gnorm {grad_norm:7.3f}  lr {lr:.2e}  "
                f"tok/s/dev {tps:9,.0f}  mfu {mfu}  mem {row['mem_peak_gib']:6.2f}GiB  "
                f"step {row['step_time_s']:6.3f}s  eta {_hms(eta)}")
        for k, v in (extra or {}).items():
            if isinstance(v, (dict, list)):
                continue  # per-layer tables (MoE loads) go to metrics.jsonl only
            line += f"  {k} {v:.4g}" if isinstance(v, float) else f"  {k} {v}"
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


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
