"""Time the routed experts of one MoE layer, forward + backward, as grouped GEMMs and as a loop.

    python benchmarks/moe_micro.py [tokens]     # default: configs/moe_4b.toml's layer, 8192 tokens x top 2
    python benchmarks/moe_micro.py 8192 --experts 64 --top-k 8 --hidden 704   # the fine-grained moe64
    python benchmarks/moe_micro.py --compiled   # also compiled, and with inductor's GEMM autotuning (GPU)

The experts of configs/moe_4b.toml (8 experts, dim 2048, hidden 2816) on 8192 tokens routed top-2,
so 16,384 rows sorted by expert with a realistic spread of loads (Dirichlet shares). Compares
`moe.run_experts_grouped` (three torch._grouped_mm calls, no host sync) with `moe.run_experts_loop`
(one SwiGLU per expert, reads the counts on the host), bf16 on a GPU, fp32 on the CPU.
"""
import argparse
import time

import torch

from minititan.core import moe

cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
parser = argparse.ArgumentParser()
parser.add_argument("tokens", type=int, nargs="?", default=8192 if cuda else 512)
parser.add_argument("--experts", type=int, default=8)
parser.add_argument("--top-k", type=int, default=2)
parser.add_argument("--hidden", type=int, default=2816)
parser.add_argument("--compiled", action="store_true", help="also time the grouped path compiled, and autotuned")
args = parser.parse_args()
tokens, n_experts, top_k, dim, hidden = args.tokens, args.experts, args.top_k, 2048, args.hidden


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn, x, counts, experts, repeats=10) -> float:
    for _ in range(2):
        fn(x, counts, experts).sum().backward()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x, counts, experts).sum().backward()
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    torch.manual_seed(0)
    rows = tokens * top_k
    shares = torch.distributions.Dirichlet(torch.full((n_experts,), 4.0)).sample()
    counts = (shares * rows).floor().long()
    counts[0] += rows - counts.sum()
    x = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
    experts = {name: (torch.randn(n_experts, *shape, device=device, dtype=dtype) * shape[1] ** -0.5).requires_grad_()
               for name, shape in (("w1", (hidden, dim)), ("w3", (hidden, dim)), ("w2", (dim, hidden)))}
    counts = counts.to(device)
    flops = 3 * 2 * rows * 3 * dim * hidden  # three GEMMs, forward + 2x backward
    print(f"{rows} rows over {n_experts} experts (loads {counts.tolist()}), dim {dim}, hidden {hidden}, {dtype}, {device}")
    want = moe.run_experts_loop(x, counts, experts)
    if moe.grouped_mm_ok(x, experts["w1"]):
        err = ((moe.run_experts_grouped(x, counts, experts) - want).norm() / want.norm()).item()
        print(f"  grouped vs loop output: rel. diff {err:.1e}")
        fns = (moe.run_experts_grouped, moe.run_experts_loop)
    else:
        print("  torch._grouped_mm does not run here: loop only")
        fns = (moe.run_experts_loop,)
    for fn in fns:
        ms = timed(fn, x, counts, experts)
        print(f"  {fn.__name__:22s} {ms:8.2f} ms   {flops / ms / 1e9:8.1f} TFLOP/s")
    if cuda and args.compiled:
        compiled_variants(x, counts, experts, flops)


def compiled_variants(x, counts, experts, flops):
    """The grouped path compiled as the trainer compiles a block, and with inductor's GEMM autotuning,
    which also tries its Triton grouped-GEMM templates against the aten kernel (a candidate for the
    MoE blocks: the grouped GEMMs run well below a large GEMM's rate, benchmarks/moe.md)."""
    for name, options in (("compiled", {}), ("compiled, max_autotune_gemm", {"max_autotune_gemm": True})):
        try:
            fn = torch.compile(moe.run_experts_grouped, options=options)
            ms = timed(fn, x, counts, experts)
            print(f"  {name:34s} {ms:8.2f} ms   {flops / ms / 1e9:8.1f} TFLOP/s")
        except Exception as e:  # a torch without the template, or a failed autotune: say so, keep going
            print(f"  {name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")


if __name__ == "__main__":
    main()
