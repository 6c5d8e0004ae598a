"""The MoE model against its dense twin on one GPU, where one MoE layer's time goes, and what expert
parallel's host sync costs. One command, logs under OUT:

    source benchmarks/gpu_env.sh && python3 benchmarks/moe_speed.py $OUT [--baseline DIR] [--precision bf16,float8]
                                                                        [--parts steps,layer,ep] [--settings ...]
                                                                        [--shapes dense,moe8,moe64]

steps   configs/moe_4b.toml with 8 layers (dim 2048, seq 4096, batch 4, selective AC, compile), trained
        16 steps each; tokens/s per GPU and MFU on active parameters (the median of steps 9-16):
          dense   model.name = llama3: FFN hidden 5632 = 2 x 2816, the MoE's active FLOPs per token
          moe8    8 experts, top 2, hidden 2816 (issue 29's 0.66x)
          moe64   64 experts, top 8, hidden 704: fine-grained, DeepSeek-style, the same active FLOPs
        --precision bf16 (the default), float8 (float8.enable: the experts through
        torch._scaled_grouped_mm where the code has it) or both, comma-separated.
        --settings "KEY=VALUE ...": train overrides for every shape (e.g. the setting `minititan plan`
        ranks first on one H100: "activation_checkpoint.mode=none training.local_batch_size=8").
        --shapes: the steps part's shapes, comma-separated (default all three; dense runs once, never
        with --baseline's tree).
layer   torch.profiler over forward + backward of one MoE layer of each shape (16384 tokens, bf16,
        eager; with float8 in --precision also through the Float8 experts, and their output against
        bf16's): device time by stage (router and top-k, sort and counts, row gathers = permute and
        unpermute, grouped GEMMs, element-wise = SwiGLU, combine, softmax, casts), the device-to-host
        copies per pass (host syncs), and the balance statistics' cost (the layer with and without them).
ep      one moe8 layer through expert parallel on a one-rank NCCL group, forward + backward 20 times
        with the host free to run ahead: the exact exchange (its split sizes read on the host) against
        the capped one (parallelism.ep_capacity_factor, no host read).

--baseline DIR runs every part a second time with the minititan package of DIR (an older tree as a plain
copy, e.g. `mkdir -p .ab/before && git archive REV | tar -x -C .ab/before`, carried to the GPU machine as
benchmarks/ab.sh's trees are): the before/after of one call on one machine. The time on an H100: about 3 minutes for the default
parts, 5 with --baseline; each extra precision of the steps part about 2.5 more.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("BENCH_STEPS", "16")
os.environ.setdefault("BENCH_LOG_FREQ", "1")
os.environ.setdefault("BENCH_AFTER", "8")
os.environ.setdefault("BENCH_TIMEOUT", "300")
import bench  # noqa: E402  (benchmarks/bench.py: reads the BENCH_* settings at import)

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> model overrides on configs/moe_4b.toml
    "dense": ["model.name=llama3"],
    "moe8": [],
    "moe64": ["model.n_experts=64", "model.top_k=8", "model.moe_hidden_dim=704"],
}
STAGES = [  # (stage, aten ops whose self device time it sums); everything else is "element-wise"
    ("grouped GEMMs", ("_grouped_mm", "_scaled_grouped_mm")),
    ("dense GEMMs (router, shared)", ("mm", "addmm", "bmm")),
    ("top-k", ("topk",)),
    ("sort and counts", ("sort", "argsort", "scatter_add_", "scatter_", "scatter", "cumsum", "repeat_interleave",
                         "searchsorted", "bincount")),
    ("row gathers: permute, unpermute", ("index", "index_select", "index_copy_", "index_copy", "index_add_",
                                         "index_put_", "_index_put_impl_", "gather", "_unsafe_index",
                                         "embedding_dense_backward")),
    ("host syncs (device-to-host copies)", ("_local_scalar_dense",)),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--baseline", default=None, help="a folder holding an older minititan package")
    parser.add_argument("--precision", default="bf16", help="bf16, float8, or both comma-separated")
    parser.add_argument("--parts", default="steps,layer,ep")
    parser.add_argument("--settings", default="", help="train overrides for every shape of the steps part")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="the steps part's shapes, comma-separated")
    parser.add_argument("--layer-only", action="store_true", help=argparse.SUPPRESS)  # the baseline's child run
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts, shapes = args.parts.split(","), args.shapes.split(",")
    if unknown := set(shapes) - set(SHAPES):
        parser.error(f"--shapes: unknown {sorted(unknown)}; pick from {', '.join(SHAPES)}")
    results = {"steps": [], "layer": {}, "ep": {}}
    if args.layer_only:  # in the baseline's child: this process imports the baseline's minititan
        print(json.dumps({"layer": layer_part(float8=False), "ep": ep_part() if "ep" in parts else {}}))
        return
    checkouts = [("", REPO)] + ([("before: ", Path(args.baseline).resolve())] if args.baseline else [])
    if "steps" in parts:
        for label, root in checkouts:
            for precision in args.precision.split(","):
                for shape in shapes:
                    if label and shape == "dense":
                        continue  # the dense model did not change
                    results["steps"].append(step_row(out, f"{label}{shape} {precision}", root, shape, precision,
                                                     args.settings.split()))
                    print(json.dumps(results["steps"][-1]), flush=True)
    if "layer" in parts or "ep" in parts:
        results["layer"]["after"] = layer_part("float8" in args.precision) if "layer" in parts else {}
        print(json.dumps({"layer": results["layer"]["after"]}), flush=True)  # kept if a later part fails
        results["ep"]["after"] = ep_part() if "ep" in parts else {}
        if args.baseline:
            child = baseline_child(out, Path(args.baseline).resolve(), parts)
            results["layer"]["before"], results["ep"]["before"] = child.get("layer", {}), child.get("ep", {})
    (out / "moe_speed.json").write_text(json.dumps(results, indent=1))
    report(results)


# ---------------------------------------------------------------- steps: whole training runs


def step_row(out: Path, name: str, root: Path, shape: str, precision: str, settings: list[str]) -> dict:
    """One training run through benchmarks/bench.py, with root's minititan (python -m imports from the cwd)."""
    overrides = [f"--{o}" for o in SHAPES[shape] + ["model.n_layers=8"] + (
        ["float8.enable=true"] if precision == "float8" else []) + settings]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        row = bench.run(out, name.replace(" ", "_").replace(":", ""), ["-c", str(REPO / "configs/moe_4b.toml")]
                        + overrides)
    finally:
        os.chdir(cwd)
    return row | {"name": name}


# ---------------------------------------------------------------- layer: one MoE layer under the profiler


def layer_inputs(shape: str):
    import torch
    from minititan.core import model
    from minititan.core.config import load_config
    cfg = load_config(str(REPO / "configs/moe_4b.toml"), SHAPES[shape] + ["model.n_layers=1"]).model
    names = list(model.feed_forward_shapes(cfg, 0))
    full = model.init(cfg, 0, "cuda", names=names)
    p = {model.local_name(n): t.to(torch.bfloat16).requires_grad_() for n, t in full.items()}
    x = torch.randn(4, 4096, cfg.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return cfg, p, x


def layer_part(float8: bool) -> dict:
    """Per shape (and fp8 variant): ms per forward + backward, device ms by stage, D2H copies per pass,
    ms with the balance statistics off."""
    import torch
    from minititan.core import model, moe
    takes = inspect.signature(moe.moe_feed_forward).parameters
    takes_fp8 = "fp8" in takes
    rows = {}
    for shape in ("moe8", "moe64"):
        for fp8 in [False] + ([True] if float8 and takes_fp8 else []):
            cfg, p, x = layer_inputs(shape)
            ops = model.default_ops(cfg)
            extra = {"fp8": True} if fp8 else {}

            def step(stats: bool):  # the balance log: a device [sum, count] since 80e3984, a list before
                log = (torch.zeros(2, device="cuda") if "balance_log" in takes else []) if stats else None
                logged = {"balance_log" if "balance_log" in takes else "aux_log": log}
                y = moe.moe_feed_forward(p, x, cfg, ops, **logged, **extra)
                y.backward(torch.ones_like(y))

            ms = {stats: cuda_ms(lambda: step(stats)) for stats in (True, False)}
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step(True)
                torch.cuda.synchronize()
            by_stage, d2h = stage_times(prof, passes=3)
            row = rows[shape + (" fp8" if fp8 else "")] = {"ms": ms[True], "ms_without_balance_stats": ms[False],
                                                           "stages_ms": by_stage, "d2h_copies_per_pass": d2h}
            if fp8:  # the Float8 experts' output against bf16's, the same inputs (x + MoE(x): compare MoE(x))
                with torch.no_grad():
                    y8, y16 = (moe.moe_feed_forward(p, x, cfg, ops, fp8=f) - x for f in (True, False))
                row["fp8_rel_diff_vs_bf16"] = ((y8.float() - y16.float()).norm() / y16.float().norm()).item()
            del p, x
            torch.cuda.empty_cache()
    return rows


def cuda_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def stage_times(prof, passes: int) -> tuple[dict[str, float], float]:
    """Self device time per stage (ms per pass) from the aten ops' names; and device-to-host copies."""
    import torch
    stage_of = {op: stage for stage, ops in STAGES for op in ops}
    totals: dict[str, float] = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::") or e.self_device_time_total <= 0:
            continue
        stage = stage_of.get(e.key.removeprefix("aten::"), "element-wise (SwiGLU, combine, softmax, casts)")
        totals[stage] = totals.get(stage, 0.0) + e.self_device_time_total / 1e3 / passes
    d2h = sum(e.count for e in prof.key_averages()
              if e.device_type == torch.autograd.DeviceType.CUDA and "DtoH" in e.key)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])), d2h / passes


# ---------------------------------------------------------------- ep: the host sync of the exchange


def ep_part() -> dict:
    """One moe8 layer, expert parallel over a one-rank NCCL group (ep = 1 rank: the exchange is a local
    copy, the host reads are real): 20 forward + backward passes with no sync between them."""
    import torch
    import torch.distributed as dist
    from minititan.collectives import expert_parallel as ep_lib
    from minititan.core import model, moe
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    capped = "capacity_factor" in inspect.signature(ep_lib.parallel_experts).parameters
    cfg, p, x = layer_inputs("moe8")
    ops = model.default_ops(cfg)
    rows = {}
    for name, factor in [("exact exchange", 0.0)] + ([("capped exchange (factor 1.25)", 1.25)] if capped else []):
        run = ep_lib.parallel_experts(moe.run_experts, dist.group.WORLD, **({"capacity_factor": factor} if capped
                                                                          else {}))

        def step():
            y = moe.moe_feed_forward(p, x, cfg, ops, run_experts=run)
            y.backward(torch.ones_like(y))

        rows[name] = cuda_ms(step, repeats=20)
    return rows


def baseline_child(out: Path, root: Path, parts: list[str]) -> dict:
    """The layer and ep parts with root's minititan, in a child process that imports it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]))
    cmd = [sys.executable, __file__, str(out / "before"), "--layer-only", "--parts", ",".join(parts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    (out / "before_layer.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"rc {done.returncode}, see before_layer.log"}


# ---------------------------------------------------------------- the report


def report(results: dict) -> None:
    steps = results["steps"]
    if steps:
        dense = {r["name"].split()[-1]: r.get("tokens_per_sec") for r in steps if r["name"].startswith("dense")}
        print("\n| run | tokens/s/GPU | MFU (active) | vs dense twin | peak mem GiB | rc |\n|---|---:|---:|---:|---:|---|")
        for r in steps:
            base = dense.get(r["name"].split()[-1])
            ratio = f"{r['tokens_per_sec'] / base:.2f}x" if base and r.get("tokens_per_sec") else "-"
            print(f"| {r['name']} | {r.get('tokens_per_sec', 0):,.0f} | {r.get('mfu', 0):.1f}% | {ratio} | "
                  f"{r.get('mem_gib', 0):.1f} | {r['rc']} |")
    for when, rows in results["layer"].items():
        for shape, row in rows.items():
            fp8 = f", output {row['fp8_rel_diff_vs_bf16']:.3f} rel. from bf16's" if "fp8_rel_diff_vs_bf16" in row else ""
            print(f"\none MoE layer, {shape} ({when}): {row['ms']:.2f} ms forward + backward, "
                  f"{row['ms_without_balance_stats']:.2f} ms without the balance statistics, "
                  f"{row['d2h_copies_per_pass']:.0f} device-to-host copies per pass{fp8}\n| stage | device ms |\n|---|---:|")
            for stage, ms in row["stages_ms"].items():
                print(f"| {stage} | {ms:.2f} |")
    for when, rows in results["ep"].items():
        if rows:
            print(f"\nexpert parallel, one rank, moe8 layer ({when}):\n| exchange | ms per forward + backward |\n|---|---:|")
            for name, ms in rows.items():
                print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
