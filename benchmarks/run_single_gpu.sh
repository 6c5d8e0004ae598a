#!/usr/bin/env bash
# The single-GPU table of benchmarks/single_gpu.md in one command, on a lent GPU, from the repo root:
#   OUT=/path/to/logs bash benchmarks/run_single_gpu.sh        # 8B width x 8 layers grid, 1B and 3B rows
#   OUT=/path/to/logs bash benchmarks/run_single_gpu.sh 1b     # the 1B model's AC mode x compile grid
# Needs msgspec (carry its wheel in .whl/, as the device README explains). About 8 minutes on an H100.
set -u
source benchmarks/gpu_env.sh
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$1"; }
M1B="-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 --model.multiple_of=256"
rows=()
if [ "${1:-8b}" = 1b ]; then  # `run_single_gpu.sh 1b`: the 1B model's grid, batch 2 (about 6 minutes)
  for ac in none full selective; do
    for compile in false true; do
      rows+=("1B_${ac}_compile-${compile}_b2|$M1B $(b 2) --activation_checkpoint.mode=$ac --compile.enable=$compile")
    done
  done
  python3 benchmarks/bench.py "$OUT" "${rows[@]}"
  exit
fi
for ac in none full selective; do
  for compile in false true; do
    rows+=("8x8_${ac}_compile-${compile}_b1|$M8 $(b 1) --activation_checkpoint.mode=$ac --compile.enable=$compile")
  done
done
rows+=("8x8_selective2_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective --activation_checkpoint.selective=2")
rows+=("8x8_selective_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective")
rows+=("8x8_none_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none")
rows+=("1B_selective_compile_b4|$M1B $(b 4)")
rows+=("3B_selective_compile_b2|-c configs/llama3_8b.toml --model.dim=3072 --model.n_layers=28 --model.n_heads=24 --model.ffn_dim_multiplier=1.0 --model.multiple_of=256 $(b 2)")
python3 benchmarks/attention_micro.py | tee "$OUT/attention.txt"
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
