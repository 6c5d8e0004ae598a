"""Float8 gradients against bf16 on the device, eager and compiled: one step's per-weight grad norms.

    python benchmarks/float8_grad_check.py [extra train overrides ...]

Llama 3 8B width with 2 layers, seq 2048, one sequence. For each of bf16, Float8 tensorwise and
rowwise, eager and compiled, runs one forward/backward and prints each block weight's gradient norm
relative to bf16 eager. fp8 grads sit within a few percent of bf16; a weight far off (or at zero)
fails the check (exit code 1). This guards the GPU path, which the CPU tests cannot reach: the CPU
runs the emulation, the GPU torch._scaled_mm under the GPU's torch version.
"""
import sys

import torch

from minititan.core.config import load_config
from minititan.core.data import TokenSource
from minititan.layout.microbatches import forward_backward
from minititan.train import setup

SHAPE = ["model.dim=4096", "model.n_layers=2", "model.n_heads=32", "model.n_kv_heads=8", "model.ffn_dim_multiplier=1.3",
         "model.multiple_of=1024", "model.vocab_size=128256", "model.max_seq_len=2048", "training.seq_len=2048",
         "training.param_dtype=bfloat16", "training.global_batch_size=1", "training.local_batch_size=1",
         "data.dataset=synthetic", "checkpoint.enable=false", "activation_checkpoint.mode=none"]
RUNS = {f"{recipe} {mode}": [f"float8.enable={recipe != 'bf16'}", f"compile.enable={mode == 'compile'}"]
        + ([f"float8.recipe={recipe}"] if recipe != "bf16" else [])
        for recipe in ("bf16", "tensorwise", "rowwise") for mode in ("eager", "compile")}
TOLERANCE = 0.25


def grad_norms(overrides: list[str]) -> dict[str, float]:
    cfg = load_config(None, SHAPE + overrides + sys.argv[1:])
    device, _, layout = setup(cfg)
    t = cfg.training
    inputs, labels = TokenSource(cfg.data.dataset, cfg.model.vocab_size).batch(t.seed, 1, 1, t.seq_len)
    forward_backward(layout, inputs.to(device), labels.to(device), 1, 1.0 / t.seq_len)
    return {n: (p.grad.norm().item() if p.grad is not None else 0.0) for n, p in layout.params.items()}


def main() -> int:
    norms = {name: grad_norms(o) for name, o in RUNS.items()}
    ref = norms["bf16 eager"]
    print(f"{'weight':34s}" + "".join(f"{n:>19s}" for n in RUNS))
    worst = 0.0
    for w, r in ref.items():
        rel = {n: abs(norms[n][w] - r) / max(r, 1e-30) for n in RUNS}
        if w.count(".") >= 2:  # block weights: the ones fp8 runs
            worst = max(worst, *rel.values())
        print(f"{w:34s}" + "".join(f"  {norms[n][w]:10.3e} ({rel[n]:4.0%})" for n in RUNS))
    print(f"worst block-weight deviation from bf16 eager: {worst:.1%} (bar {TOLERANCE:.0%})")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
