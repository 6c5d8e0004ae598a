#!/usr/bin/env bash
# minititan and torchtitan 0.2.2 side by side on one GPU, same shapes and settings, in one command.
# On the GPU machine, from the repo root, with the wheels in .whl/ (msgspec for minititan;
# torchtitan==0.2.2 torchdata dill multiprocess tomli tyro docstring-parser typeguard shtab
# torchao==0.17.0 for torchtitan; see benchmarks/README.md) and OUT set to a log folder:
#   bash benchmarks/vs_torchtitan.sh table1a     # bf16 rows: eager, compile, selective AC + compile
#   bash benchmarks/vs_torchtitan.sh table1b     # Float8 rows and the 1B / 3B shapes
# A table is split in parts so that each part fits one 10-minute command on a lent GPU.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 1; }
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-./bench_out}
# 8B width x 8 layers, seq 8192: ours through configs/llama3_8b.toml, theirs through the 8B_8L flavor
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
T8="@torchtitan --model.flavor 8B_8L --training.seq_len 8192"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$1"; }
case "${1:-table1a}" in
  table1a) rows=(
    "mt_eager_b1|$M8 $(b 1) --activation_checkpoint.mode=none --compile.enable=false"
    "tt_eager_b1|$T8 --training.local_batch_size 1 --activation_checkpoint.mode none"
    "mt_compile_b1|$M8 $(b 1) --activation_checkpoint.mode=none"
    "tt_compile_b1|$T8 --training.local_batch_size 1 --activation_checkpoint.mode none --compile.enable"
    "mt_selop_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective"
    "tt_selop_compile_b2|$T8 --training.local_batch_size 2 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable"
    "mt_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none") ;;
  table1b) rows=(
    "mt_fp8tw_compile_b1|$M8 $(b 1) --activation_checkpoint.mode=none --float8.enable=true --float8.recipe=tensorwise"
    "tt_fp8tw_compile_b1|$T8 --training.local_batch_size 1 --activation_checkpoint.mode none --compile.enable --model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise"
    "mt_fp8rw_compile_b1|$M8 $(b 1) --activation_checkpoint.mode=none --float8.enable=true --float8.recipe=rowwise"
    "mt_fp8tw_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none --float8.enable=true --float8.recipe=tensorwise"
    "mt_1B_selop_compile_b4|-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 --model.multiple_of=256 --model.rope_scaling=false $(b 4)"
    "tt_1B_selop_compile_b4|@torchtitan --model.flavor 1B --training.seq_len 8192 --training.local_batch_size 4 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable") ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
