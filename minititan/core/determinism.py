"""Deterministic mode (training.deterministic): the same config twice gives the same bits on a GPU.

Sampling, init and data order are already pure functions of the seed, and CPU runs repeat
exactly (for a fixed thread count), so on the CPU this only says so: torch's deterministic mode
there swaps the threaded matmul for a much slower one and buys nothing. GPU runs differ from run
to run because some kernels add floating-point numbers in an order that depends on thread
scheduling (atomic adds) or pick algorithms by timing. This turns those off:

  torch.use_deterministic_algorithms(True)   every op uses a deterministic kernel, or raises a
                                             RuntimeError naming itself if it has none; flash and
                                             memory-efficient attention run their deterministic
                                             backward, cuDNN attention (which has none) is skipped
  cudnn.deterministic, not cudnn.benchmark   no algorithm choice by timing
  CUBLAS_WORKSPACE_CONFIG=:4096:8            cuBLAS uses fixed workspaces (must be set before the
                                             first matmul: call this before any CUDA work)
  fill_uninitialized_memory = False          torch would otherwise fill every torch.empty with
                                             NaN under deterministic mode; nothing here reads
                                             memory before writing it, so that cost buys nothing

What it costs: cuDNN attention was the fastest kernel on an H100 (benchmarks/single_gpu.md) and
is replaced by flash attention, whose deterministic backward also gives up some parallelism;
scatter-style ops (MoE routing) use slower sorted kernels. Collectives stay as they are: NCCL
sums in a fixed order for a fixed world size, message size and NCCL_ALGO, so the same job on the
same machines repeats. docs/debugging.md has more.
"""
from __future__ import annotations

import os

import torch

from minititan.core.metrics import say


def make_deterministic(device: torch.device, rank: int) -> None:
    if device.type != "cuda":
        say("training.deterministic: CPU runs already repeat exactly (same thread count); nothing to change", rank)
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    say("training.deterministic: deterministic kernels only (flash attention instead of cuDNN's, sorted "
        "scatters); expect slower steps on GPU, and an op without a deterministic kernel raises", rank)
