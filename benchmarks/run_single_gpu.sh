#!/usr/bin/env bash
# The single-GPU table of benchmarks/single_gpu.md in one command, on a lent GPU, from the repo root:
#   OUT=/path/to/logs bash benchmarks/run_single_gpu.sh
# Needs msgspec (carry its wheel in .whl/, as the device README explains). About 8 minutes on an H100.
set -u
source benchmarks/gpu_env.sh
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$1"; }
rows=()
for ac in none full selective; do
  for compile in false true; do
    rows+=("8x8_${ac}_compile-${compile}_b1|$M8 $(b 1) --activation_checkpoint.mode=$ac --compile.enable=$compile")
  done
done
rows+=("8x8_selective2_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective --activation_checkpoint.selective=2")
rows+=("8x8_selective_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective")
rows+=("8x8_none_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none")
rows+=("1B_selective_compile_b4|-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 --model.multiple_of=256 $(b 4)")
rows+=("3B_selective_compile_b2|-c configs/llama3_8b.toml --model.dim=3072 --model.n_layers=28 --model.n_heads=24 --model.ffn_dim_multiplier=1.0 --model.multiple_of=256 $(b 2)")
python3 benchmarks/attention_micro.py | tee "$OUT/attention.txt"
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
