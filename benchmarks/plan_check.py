"""minititan plan's predictions against the runs measured in benchmarks/, and the published ones.

    python benchmarks/plan_check.py            # the tables of benchmarks/plan.md (CPU, a few minutes)
    python benchmarks/plan_check.py --only fsdp2_compile,h200_b1_compile
    python benchmarks/plan_check.py --only h100_moe4b_8L_moe8 --eager moe_layer   # as if that block broke the graph
    python benchmarks/plan_check.py --profile h100=benchmarks/profiles/h100_calibrated_2026-12-07.toml
        # the rows of a GPU kind with another profile (e.g. one `minititan plan --calibrate` wrote)

Each row: a measured run (its command's train arguments, where it was measured and what it gave)
and minititan plan's estimate of the same layout on the same GPU kind, with the relative error.
Memory: the measured figure is the caching allocator's reserved peak (what bench.py and
metrics.jsonl report) unless an allocated peak was measured too; the plan predicts the allocated
peak and reserved = allocated x the profile's fragmentation.
"""
from __future__ import annotations

import argparse
import shlex

M8 = "-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
M1B = ("-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 "
       "--model.multiple_of=256 --model.rope_scaling=false")
F2 = ("-c configs/llama3_8b.toml --nproc 2 --parallelism.dp_shard=2 --training.local_batch_size=2 "
      "--training.global_batch_size=4 --activation_checkpoint.mode=selective")


def b(n: int) -> str:
    return f"--training.global_batch_size={n} --training.local_batch_size={n}"


S13 = "single_gpu.md, 2026-12-07 thirteenth session (c1bf8de)"  # the rows re-measured then, on one warm H100
# name, gpu, train arguments, measured tokens/s/GPU, reserved GiB, allocated GiB (None: not measured), where
OURS = [
    ("h100_b1_eager", "h100", f"{M8} {b(1)} --activation_checkpoint.mode=none --compile.enable=false",
     30093, 52.8, 52.77, f"{S13}, mt_eager_b1"),
    ("h100_b1_compile", "h100", f"{M8} {b(1)} --activation_checkpoint.mode=none",
     33813, 48.2, 47.17, f"{S13}, mt_compile_b1"),
    ("h100_s32k_full_compile", "h100", f"{M8} {b(1)} --training.seq_len=32768 --activation_checkpoint.mode=full",
     21882, 47.0, 45.86, "single_gpu.md, 2026-12-07 (80a19ea), mt_s32k_full"),
    ("h100_s32k_selective_compile", "h100", f"{M8} {b(1)} --training.seq_len=32768 "
     "--activation_checkpoint.mode=selective", 26756, 64.4, 62.89, f"{S13}, mt_s32k_selop"),
    ("h100_s65k_full_compile", "h100", f"{M8} {b(1)} --training.seq_len=65536 --activation_checkpoint.mode=full",
     16027, 59.9, 58.45, "single_gpu.md, 2026-12-07 (80a19ea), mt_s65k_full"),
    ("h100_s98k_full_compile", "h100", f"{M8} {b(1)} --training.seq_len=98304 --activation_checkpoint.mode=full",
     12677, 72.8, 71.05, "single_gpu.md, 2026-12-07 (defe0cc), mt_s98k_full"),
    *[(f"h100_moe4b_8L_{name}", "h100", f"-c configs/moe_4b.toml --model.n_layers=8 {extra}", tps, reserved, alloc,
       "moe.md, 2026-12-07 eleventh session (c0a3320: StepCasts)")
      for name, extra, tps, reserved, alloc in (
          ("dense_twin", "--model.name=llama3", 118101, 25.0, 23.86),
          ("moe8", "", 107579, 40.0, 39.31),
          ("moe64", "--model.n_experts=64 --model.top_k=8 --model.moe_hidden_dim=704", 89388, 62.2, 60.94))],
    ("h100_b2_selective_compile", "h100", f"{M8} {b(2)} --activation_checkpoint.mode=selective",
     35299, 49.3, 48.1, f"{S13}, the q-recompute A/B's mt_selop_compile_b2"),
    ("h100_1B_b4_selective_compile", "h100", f"{M1B} {b(4)} --activation_checkpoint.mode=selective",
     54105, 49.6, 49.06, f"{S13}, mt_1B_selop_compile_b4"),
    ("h100_b2_compile", "h100", f"{M8} {b(2)} --activation_checkpoint.mode=none",
     36683, 58.8, 57.82, f"{S13}, mt_compile_b2 (call 1)"),
    ("h100_fp8tw_b2", "h100", f"{M8} {b(2)} --activation_checkpoint.mode=none --float8.enable=true",
     45422, 51.9, 50.70, f"{S13}, mt_fp8tw_compile_b2"),
    ("h100_fp8tw_out_b2", "h100", f"{M8} {b(2)} --activation_checkpoint.mode=none --float8.enable=true "
     "--float8.filter=[]", 49734, 53.8, 52.97, f"{S13}, mt_fp8tw_out_compile_b2 (call 1)"),
    ("h100_fp8rw_b2", "h100", f"{M8} {b(2)} --activation_checkpoint.mode=none --float8.enable=true "
     "--float8.recipe=rowwise", 41431, 52.0, 50.70, f"{S13}, mt_fp8rw_compile_b2"),
    ("h100_s2048_b4_compile", "h100", f"{M8} --training.seq_len=2048 {b(4)} --activation_checkpoint.mode=none",
     37311, 48.2, 47.17, f"{S13}, mt_s2048_compile_b4"),
    ("h100_s4096_b2_compile", "h100", f"{M8} --training.seq_len=4096 {b(2)} --activation_checkpoint.mode=none",
     36189, 48.2, 47.17, f"{S13}, mt_s4096_compile_b2"),
    ("h200_b1_eager", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=none --compile.enable=false",
     31522, 52.8, None, "single_gpu.md, 2026-12-03 (4b3eb82), mt_eager_b1"),
    ("h200_b1_eager_selective", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=selective --compile.enable=false",
     30831, 46.7, None, "single_gpu.md, 2026-12-03 (4b3eb82)"),
    ("h200_b1_eager_full", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=full --compile.enable=false",
     25937, 44.2, None, "single_gpu.md, 2026-12-03 (4b3eb82)"),
    ("h200_b1_compile", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=none",
     35452, 50.1, 47.17, "single_gpu.md, 2026-12-04, mt_compile_b1 (allocated: same machine, same call)"),
    ("h200_b2_selective_compile", "h200", f"{M8} {b(2)} --activation_checkpoint.mode=selective",
     36568, 50.3, None, "single_gpu.md, 2026-12-04, mt_selop_compile_b2"),
    ("h200_b2_compile", "h200", f"{M8} {b(2)} --activation_checkpoint.mode=none",
     36970, 58.8, None, "single_gpu.md, 2026-12-03 call 4, mt_compile_b2"),
    ("h200_b2_full_compile", "h200", f"{M8} {b(2)} --activation_checkpoint.mode=full",
     30735, 44.7, None, "single_gpu.md, 1x H200 table (32385d1 + RMSNorm/RoPE): older code"),
    ("h200_fp8tw_b1", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=none --float8.enable=true",
     42412, 46.0, None, "single_gpu.md, 2026-12-03 call 4, mt_fp8tw_compile_b1"),
    ("h200_fp8tw_b2", "h200", f"{M8} {b(2)} --activation_checkpoint.mode=none --float8.enable=true",
     46780, 51.9, None, "single_gpu.md, 2026-12-03 call 4, mt_fp8tw_compile_b2"),
    ("h200_fp8rw_b2", "h200", f"{M8} {b(2)} --activation_checkpoint.mode=none --float8.enable=true "
     "--float8.recipe=rowwise", 42838, 51.9, None, "float8.md, 2026-12-03 (4b3eb82)"),
    ("h200_fp8rw_b1", "h200", f"{M8} {b(1)} --activation_checkpoint.mode=none --float8.enable=true "
     "--float8.recipe=rowwise", 38144, 45.9, None, "float8.md, 2026-12-03 (4b3eb82)"),
    ("h200_1B_b4_selective_compile", "h200", f"{M1B} {b(4)} --activation_checkpoint.mode=selective",
     56094, 51.6, None, "single_gpu.md, 2026-12-04, mt_1B_selop_compile_b4"),
    *[(f"h200_1B_b2_{ac}_{'compile' if c else 'eager'}", "h200",
       f"{M1B} {b(2)} --activation_checkpoint.mode={ac} --compile.enable={'true' if c else 'false'}", tps, mem, None,
       "single_gpu.md, 1B grid, 2026-12-03 call 3")
      for ac, c, tps, mem in (("none", False, 48188, 52.6), ("full", False, 38881, 30.4),
                              ("selective", False, 46486, 42.9), ("none", True, 54566, 42.7),
                              ("full", True, 49275, 35.7), ("selective", True, 52510, 35.0))],
    ("h200_3B_b2_selective_compile", "h200", "-c configs/llama3_8b.toml --model.dim=3072 --model.n_layers=28 "
     f"--model.n_heads=24 --model.ffn_dim_multiplier=1.0 --model.multiple_of=256 {b(2)} "
     "--activation_checkpoint.mode=selective", 21783, 77.5, None, "single_gpu.md, 1x H200 table: older code"),
    ("fsdp2_compile", "h200", F2, 9994, 98.3, None, "fsdp.md, 2026-11-23 (acd750e): older code"),
    ("fsdp2_fp8", "h200", f"{F2} --float8.enable=true --float8.fsdp_all_gather=true --float8.precompute_scale=true",
     11348, 99.0, None, "fsdp.md, 2026-11-23 (acd750e): older code"),
]

# torchtitan's published runs (their docs, H100 95 GiB lower-TDP parts): name, world, train args, their tokens/s/GPU, GiB
TT8B = ("-c configs/llama3_8b.toml --activation_checkpoint.mode=selective --training.local_batch_size=2 "
        "--parallelism.dp_shard=-1")
PUBLISHED = [
    *[(f"tt_8b_fsdp_{w}_{what}", w, f"{TT8B} --training.global_batch_size={2 * w} {args}", tps, gib)
      for w, runs in ((8, ((5762, 82.4), (6667, 77.0), (8532, 76.8))), (128, ((5605, 67.0), (6514, 62.0), (8380, 61.8))))
      for (what, args), (tps, gib) in zip((("eager", "--compile.enable=false"), ("compile", "--compile.enable=true"),
                                           ("compile_fp8", "--compile.enable=true --float8.enable=true")), runs)],
    *[(f"tt_8b_cp{cp}_s{seq}", 8, f"-c configs/llama3_8b.toml --activation_checkpoint.mode=full --training.local_batch_size=1 "
       f"--training.global_batch_size={8 // cp} --parallelism.cp={cp} --parallelism.dp_shard={8 // cp} "
       f"--training.seq_len={seq} --model.max_seq_len={max(seq, 131072)} --compile.enable=true --float8.enable=true",
       tps, gib)
      for cp, seq, tps, gib in ((1, 32768, 3890, 83.9), (2, 65536, 2540, 84.2), (4, 131072, 1071, 84.0),
                                (8, 262144, 548, 84.5))],
]


def parse(args: str) -> tuple[str | None, int, list[str]]:
    """train arguments -> (config path, world, overrides)."""
    words, path, world, overrides = shlex.split(args), None, 1, []
    while words:
        w = words.pop(0)
        if w == "-c":
            path = words.pop(0)
        elif w == "--nproc":
            world = int(words.pop(0))
        else:
            overrides.append(w[2:])
    return path, world, overrides


def predict(args: str, gpu: str, world: int | None = None, profiles: dict[str, str] | None = None):
    from minititan.core.config import load_config
    from minititan.plan import devices
    from minititan.plan.estimate import estimate
    path, nproc, overrides = parse(args)
    return estimate(load_config(path, overrides), world or nproc, devices.load((profiles or {}).get(gpu, gpu)), 8)


def pct(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def run_eagerly(names: set[str]) -> None:
    """What the plan predicts when dynamo leaves these compiled blocks out of its graphs (by function
    name, e.g. moe_layer: the MoE block under activation checkpointing before 80e3984)."""
    from minititan.plan import compiled
    trace = compiled.AotFunction._trace

    def refuse(self, key, *rest):
        if compiled._name(self.fn) in names:
            compiled._FAILED[key] = f"{compiled._name(self.fn)} (plan_check --eager)"
            return None
        return trace(self, key, *rest)
    compiled.AotFunction._trace = refuse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated row names")
    parser.add_argument("--eager", default="", help="comma-separated names of compiled blocks to run eagerly")
    parser.add_argument("--profile", action="append", default=[], help="KIND=PATH: that kind's rows with this profile")
    args = parser.parse_args()
    profiles = dict(item.split("=", 1) for item in args.profile)  # GPU kind -> the profile file to use instead
    only = set(filter(None, args.only.split(",")))
    if args.eager:
        run_eagerly(set(args.eager.split(",")))
    G = 2**30
    print("| row | GPU | measured tok/s | predicted | error | measured GiB | predicted alloc / reserved GiB | "
          "error (reserved) | measured at |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, gpu, args, tps, reserved, alloc, where in OURS:
        if only and name not in only:
            continue
        e = predict(args, gpu, profiles=profiles)
        alloc_note = f" (allocated {alloc}: {pct(e.peak_bytes / G, alloc)})" if alloc else ""
        print(f"| {name} | {gpu} | {tps:,} | {e.tokens_per_s:,.0f} | {pct(e.tokens_per_s, tps)} | {reserved} | "
              f"{e.peak_bytes / G:.1f} / {e.reserved_bytes / G:.1f} | {pct(e.reserved_bytes / G, reserved)}"
              f"{alloc_note} | {where} |", flush=True)
    print("\n| torchtitan's published run | GPUs | their tok/s/GPU | ours, predicted (H100 SXM profile) | their GiB | "
          "ours, predicted reserved GiB |\n|---|---:|---:|---:|---:|---:|")
    for name, world, args, tps, gib in PUBLISHED:
        if only and name not in only:
            continue
        e = predict(args, "h100", world, profiles)
        print(f"| {name} | {world} | {tps:,} | {e.tokens_per_s:,.0f} | {gib} | {e.reserved_bytes / G:.1f} |", flush=True)


if __name__ == "__main__":
    main()
