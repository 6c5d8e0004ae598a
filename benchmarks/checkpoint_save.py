"""How long a checkpoint save blocks training, synchronous vs async (checkpoint.async_save), one process.

    python benchmarks/checkpoint_save.py OUT_DIR [--device cpu|cuda] [--repeats 3] [--threads N]

For two models (the debug config's, and dim 1024 x 8 layers) it saves the fp32 params and AdamW's
two moments, as the trainer does, into OUT_DIR and prints, as the median over the repeats: the
time save() blocks (sync: all of it; async: the host copy), the time until the async checkpoint
is on disk, and a forward + backward alone vs while the async writer runs (the writer thread
shares the process, and on the CPU the cores, with training).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import load_config

MODELS = {"debug": [], "dim1024_8layers": ["model.dim=1024", "model.n_layers=8", "model.n_heads=16",
                                             "model.n_kv_heads=8"]}


def checkpoint_tensors(cfg, device) -> dict:
    params = model.init(cfg.model, 0, device)
    tensors = {n: (t, ckpt.full_slice(t.shape)) for n, t in params.items()}
    for kind in ("exp_avg", "exp_avg_sq"):
        tensors |= {f"optim.{kind}.{n}": (torch.rand_like(t), ckpt.full_slice(t.shape)) for n, t in params.items()}
    return tensors


def step_time(params, cfg, tokens, device) -> float:
    start = time.perf_counter()
    model.loss_sum(params, tokens[:, :-1], tokens[:, 1:], cfg.model).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def settle(out: Path) -> None:
    """Every measurement starts with no checkpoint and no dirty pages still being written back."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def measure(name: str, overrides: list[str], out: Path, device: torch.device, repeats: int) -> dict:
    cfg = load_config(None, overrides)
    tensors = checkpoint_tensors(cfg, device)
    size = sum(t.numel() * t.element_size() for t, _ in tensors.values())
    params = {n: t.detach().clone().requires_grad_() for n, t in model.init(cfg.model, 0, device).items()}
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 129), device=device)
    step_time(params, cfg, tokens, device)  # warm up
    times = {k: [] for k in ("sync", "async_blocking", "async_total", "step_alone", "step_during_write")}
    for _ in range(repeats):
        settle(out)
        start = time.perf_counter()
        ckpt.save(out, 1, tensors)
        times["sync"].append(time.perf_counter() - start)
        settle(out)
        times["step_alone"].append(step_time(params, cfg, tokens, device))
        settle(out)
        start = time.perf_counter()
        ckpt.save(out, 2, tensors, async_save=True)
        times["async_blocking"].append(time.perf_counter() - start)
        times["step_during_write"].append(step_time(params, cfg, tokens, device))
        ckpt.wait_for_async_save()
        settle(out)
        start = time.perf_counter()  # again without training alongside: until the checkpoint is on disk
        ckpt.save(out, 3, tensors, async_save=True)
        ckpt.wait_for_async_save()
        times["async_total"].append(time.perf_counter() - start)
    shutil.rmtree(out, ignore_errors=True)
    return {"model": name, "params": model.num_params(cfg.model), "MB": size / 1e6} | \
        {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print("| model | params | checkpoint MB | sync save s | async: blocking s | async: on disk after s "
          "| fwd+bwd alone s | fwd+bwd during async write s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in MODELS.items():
        m = measure(name, overrides, args.out / name, device, args.repeats)
        print(f"| {m['model']} | {m['params']:,} | {m['MB']:.0f} | {m['sync']:.3f} | {m['async_blocking']:.3f} "
              f"| {m['async_total']:.3f} | {m['step_alone']:.3f} | {m['step_during_write']:.3f} |")


if __name__ == "__main__":
    main()
