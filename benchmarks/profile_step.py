"""Profile a few training steps on one GPU and print where the device time goes.

    python benchmarks/profile_step.py OUT_DIR -c configs/llama3_8b.toml --model.n_layers=8 ...

Runs 8 warm-up steps, then profiles 3 steps with torch.profiler; prints the top kernels by
device time grouped into families (matmul, attention, elementwise/fused, optimizer, other) and
writes the Chrome trace to OUT_DIR/trace.json.
"""
import os
import sys
from pathlib import Path

import torch

from minititan.cli import split_overrides
from minititan.core import model
from minititan.core.config import load_config
from minititan.core.data import TokenSource, rank_slice
from minititan.core.guard import StepGuard
from minititan.core.optim import AdamW
from minititan.layout.parallelize import with_global_batch
from minititan.train import setup, train_step


def main():
    out = Path(sys.argv[1])
    args = sys.argv[2:]
    path = args[args.index("-c") + 1] if "-c" in args else None
    rest = [a for i, a in enumerate(args) if a != "-c" and (i == 0 or args[i - 1] != "-c")]
    cfg = load_config(path, split_overrides(tuple(rest)) + ["data.dataset=synthetic", "checkpoint.enable=false"])
    cfg = with_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device, mesh, layout = setup(cfg)
    guard = StepGuard(device, 0, lambda: False, lambda: "", mesh.rank)  # the norm's all-reduce, as train.py
    t = cfg.training
    opt = AdamW(layout.params, cfg.optimizer, model_compiled=cfg.compile.enable)  # as train.py picks it
    data = TokenSource("synthetic", cfg.model.vocab_size)

    rows = rank_slice(layout.facts.data_rank, layout.facts.data_size, t.global_batch_size)

    def step(i):
        batch = data.read(t.seed, i, t.global_batch_size, t.seq_len, rows=rows)
        train_step(cfg, layout, opt, batch, i, layout.facts.n_micro, device, guard)
        guard.settle(i - 1)  # as train.py: the host reads the step guard's flags one step late

    for i in range(8):
        step(i + 1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(3):
            step(9 + i)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / "trace.json"))
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    families = {}
    for e in events:
        n = e.key.lower()
        fam = ("attention" if any(k in n for k in ("cudnn", "flash", "fmha", "attention")) else  # cuDNN's names hold "sm90" too
               "matmul" if any(k in n for k in ("gemm", "sm90", "cutlass", "nvjet", "xmma")) else
               "optimizer" if "adam" in n or "foreach" in n else
               "triton" if "triton" in n else "other")
        families[fam] = families.get(fam, 0) + e.device_time_total
    print(f"device time per step: {total / 3 / 1e3:.1f} ms")
    for fam, us in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:10s} {us / 3 / 1e3:8.1f} ms  {100 * us / total:5.1f}%")
    print("\ntop kernels:")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:30]:
        print(f"  {e.device_time_total / 3 / 1e3:8.2f} ms  x{e.count // 3:<4d} {e.key[:110]}")
    flops = model.flops_per_token(cfg.model, t.seq_len) * t.global_batch_size * t.seq_len
    print(f"\nmodel FLOPs/step {flops:.3e}; at the profiled device time: {flops / (total / 3 / 1e6) / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
