"""Time one AdamW step with the clip coefficient folded in, per `optimizer.implementation`, on the
parameter shapes of a model (default: the 8B width x 8 layers benchmark shape, 2.8 B fp32 params).

    python benchmarks/optim_micro.py [n_layers]      # a GPU: configs/llama3_8b.toml's shapes; the CPU: the debug model

Each parameter costs the update at least 28 bytes of memory traffic (read p, g, m, v; write p, m,
v); torch's fused kernel, given a clip coefficient, also writes the scaled gradient back (32).
Prints how far the compiled update is from the fused one after 3 steps (on the first layer's
tensors), then ms per step and the bandwidth that makes, against the device's copy bandwidth
measured on a tensor of the same total size, and the memory the first step (the compile's, for
`compiled`) allocates above the parameters, gradients and state.
"""
import sys
import time

import torch

from minititan.core import model
from minititan.core.config import Optimizer, load_config
from minititan.core.optim import AdamW, clip_coefficient, local_sq_norm

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"


def sync():
    if cuda:
        torch.cuda.synchronize()


def shapes() -> dict[str, tuple[int, ...]]:
    if not cuda:
        return model.param_shapes(load_config().model)
    n_layers = sys.argv[1] if len(sys.argv) > 1 else "8"
    return model.param_shapes(load_config("configs/llama3_8b.toml", [f"model.n_layers={n_layers}"]).model)


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def agreement(params: dict[str, torch.Tensor]) -> float:
    """Largest relative difference between the compiled and the fused update after 3 clipped steps,
    over the first layer's tensors (the compiled one is a new kernel: check it on this device)."""
    some = {n: p.clone() for n, p in list(params.items())[:10]}
    out = {}
    for implementation in ("fused", "compiled"):
        mine = {n: p.clone() for n, p in some.items()}
        opt = AdamW(mine, Optimizer(implementation=implementation))
        gen = torch.Generator(device=device).manual_seed(1)
        for _ in range(3):
            for p in mine.values():
                p.grad = torch.randn(p.shape, device=device, generator=gen)
            opt.step(1e-3, grad_scale=torch.tensor(0.3, device=device))
        out[implementation] = mine
    return max(((out["compiled"][n] - out["fused"][n]).norm() / out["fused"][n].norm()).item() for n in some)


def main():
    torch.manual_seed(0)
    params = {n: torch.randn(s, device=device) * 0.02 for n, s in shapes().items()}
    for p in params.values():
        p.grad = torch.randn_like(p)
    numel = sum(p.numel() for p in params.values())
    print(f"{len(params)} tensors, {numel / 1e9:.2f} B fp32 params, {device}, torch {torch.__version__}")
    src, dst = torch.empty(numel, device=device), torch.empty(numel, device=device)
    copy_ms = timed(lambda: dst.copy_(src))
    print(f"  copy bandwidth: {2 * 4 * numel / copy_ms / 1e6:.0f} GB/s ({copy_ms:.2f} ms for 8 B/param)")
    del src, dst
    print(f"  compiled vs fused after 3 steps: max rel. diff {agreement(params):.1e}")
    for implementation in ("fused", "compiled", "foreach"):
        opt = AdamW(params, Optimizer(implementation=implementation))
        grads = [p.grad for p in params.values()]
        step = lambda: opt.step(1e-4, grad_scale=clip_coefficient(local_sq_norm(grads).sqrt(), 1.0))
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        compile_s = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - compile_s
        extra_gib = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
        ms = timed(step)
        norm_ms = timed(lambda: local_sq_norm(grads))
        print(f"  {implementation:9s} {ms:8.2f} ms per step (grad norm included: {norm_ms:.2f} ms of it), "
              f"update {28 * numel / (ms - norm_ms) / 1e6:.0f} GB/s at 28 B/param; first step {compile_s:.1f} s, "
              f"{extra_gib:.2f} GiB above the state")
        del opt


if __name__ == "__main__":
    main()
