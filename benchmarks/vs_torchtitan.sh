#!/usr/bin/env bash
# minititan and torchtitan 0.2.2 side by side on one GPU, same shapes and settings, in one command.
# On the GPU machine, from the repo root, with the wheels in .whl/ (msgspec for minititan;
# torchtitan==0.2.2 torchdata dill multiprocess tomli tyro docstring-parser typeguard shtab
# torchao==0.17.0 for torchtitan; see benchmarks/README.md) and OUT set to a log folder:
#   bash benchmarks/vs_torchtitan.sh table1a     # bf16 rows: eager, compile, selective AC + compile
#   bash benchmarks/vs_torchtitan.sh table1b     # Float8 rows (and our bf16 batch 2, for the ratio)
#   bash benchmarks/vs_torchtitan.sh table1c     # the 1B shape
#   bash benchmarks/vs_torchtitan.sh table1d     # seq 2048 and 4096 (8192 tokens a step), compile
#   bash benchmarks/vs_torchtitan.sh long1       # seq 32,768 and 65,536, full AC + compile
#   bash benchmarks/vs_torchtitan.sh long2       # seq 32,768 with selective-op AC; ours at 98,304 with full AC
#   bash benchmarks/vs_torchtitan.sh table1a optim
#       with the rows of table1a (whose compiled runs take the compiled optimizer step, the default
#       there) the same runs on the fused kernel, and validation's cost at 3 batches (issue 15)
# and on two GPUs (nvidia-h200-x2), issue 11's tables 2 and 3:
#   fsdp2_eager | fsdp2_compile | fsdp2_fp8      Llama 3.1 8B, dp_shard 2, seq 8192, local batch 2, selective AC
#   cp2                                          8B width x 16 layers, cp 2, seq 65,536, full AC + compile
#   pp2_1f1b | pp2_interleaved                   8B width x 16 layers, pp 2, batch 8 in micro-batches of 1
# A table is split in parts so that each part fits one 10-minute command on a lent GPU.
set -u
source benchmarks/gpu_env.sh
# 8B width x 8 layers, seq 8192: ours through configs/llama3_8b.toml, theirs through the 8B_8L flavor
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
T8="@torchtitan --model.flavor 8B_8L --training.seq_len 8192"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$1"; }
# two GPUs: Llama 3.1 8B (full depth, its RoPE scaling) under FSDP; 8B width x 16 layers for CP and PP
F2="-c configs/llama3_8b.toml --nproc 2 --parallelism.dp_shard=2 --training.local_batch_size=2 --training.global_batch_size=4 --activation_checkpoint.mode=selective"
TF2="@torchtitan:2 --model.flavor 8B --training.seq_len 8192 --training.local_batch_size 2 --parallelism.data_parallel_shard_degree 2 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op"
M16="-c configs/llama3_8b.toml --model.n_layers=16 --model.rope_scaling=false"
P2="$M16 --nproc 2 --parallelism.pp=2 --training.global_batch_size=8 --training.local_batch_size=8 --parallelism.pp_microbatches=8 --activation_checkpoint.mode=selective"
TP2="@torchtitan:2 --model.flavor 8B_16L --training.seq_len 8192 --training.local_batch_size 8 --parallelism.pipeline_parallel_degree 2 --parallelism.pipeline_parallel_microbatch_size 1 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable"
rows_of() {
case "$1" in
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
    "mt_fp8rw_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none --float8.enable=true --float8.recipe=rowwise"
    "mt_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none") ;;  # bf16 in the same call, for the Float8 ratio
  optim) rows=(  # with table1a's rows beside them
    "mt_compile_b1_fused|$M8 $(b 1) --activation_checkpoint.mode=none --optimizer.implementation=fused"
    "mt_selop_compile_b2_fused|$M8 $(b 2) --activation_checkpoint.mode=selective --optimizer.implementation=fused"
    "mt_val10_b1|$M8 $(b 1) --activation_checkpoint.mode=none --validation.enable=true --validation.freq=10") ;;
  table1c) rows=(
    "mt_1B_selop_compile_b4|-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 --model.multiple_of=256 --model.rope_scaling=false $(b 4)"
    "tt_1B_selop_compile_b4|@torchtitan --model.flavor 1B --training.seq_len 8192 --training.local_batch_size 4 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable") ;;
  table1d) rows=(  # short sequences, where the per-step overheads weigh most: 8192 tokens a step as batch 1 at 8192
    "mt_s2048_compile_b4|$M8 --training.seq_len=2048 $(b 4) --activation_checkpoint.mode=none"
    "tt_s2048_compile_b4|$T8 --training.seq_len 2048 --training.local_batch_size 4 --activation_checkpoint.mode none --compile.enable"
    "mt_s4096_compile_b2|$M8 --training.seq_len=4096 $(b 2) --activation_checkpoint.mode=none"
    "tt_s4096_compile_b2|$T8 --training.seq_len 4096 --training.local_batch_size 2 --activation_checkpoint.mode none --compile.enable") ;;
  long1) rows=(  # long context on one GPU, full AC + compile (BENCH_STEPS=12 BENCH_AFTER=6 BENCH_LOG_FREQ=2)
    "mt_s32k_full|$M8 --training.seq_len=32768 $(b 1) --activation_checkpoint.mode=full"
    "tt_s32k_full|$T8 --training.seq_len 32768 --training.local_batch_size 1 --activation_checkpoint.mode full --compile.enable"
    "mt_s65k_full|$M8 --training.seq_len=65536 $(b 1) --activation_checkpoint.mode=full"
    "tt_s65k_full|$T8 --training.seq_len 65536 --training.local_batch_size 1 --activation_checkpoint.mode full --compile.enable"
    # full AC keeping the attention's results (activation_checkpoint.selective = "attention")
    "mt_s32k_selattn|$M8 --training.seq_len=32768 $(b 1) --activation_checkpoint.mode=selective --activation_checkpoint.selective=attention"
    "mt_s65k_selattn|$M8 --training.seq_len=65536 $(b 1) --activation_checkpoint.mode=selective --activation_checkpoint.selective=attention") ;;
  long2) rows=(  # what the memory buys at long context: selective-op AC at 32K (where it fits), our longest with full AC
    "mt_s32k_selop|$M8 --training.seq_len=32768 $(b 1) --activation_checkpoint.mode=selective"
    "tt_s32k_selop|$T8 --training.seq_len 32768 --training.local_batch_size 1 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable"
    "mt_s98k_full|$M8 --training.seq_len=98304 $(b 1) --activation_checkpoint.mode=full") ;;
  fsdp2_eager) rows=("mt_fsdp2_eager|$F2 --compile.enable=false" "tt_fsdp2_eager|$TF2") ;;
  fsdp2_compile) rows=("mt_fsdp2_compile|$F2" "tt_fsdp2_compile|$TF2 --compile.enable") ;;
  fsdp2_fp8) rows=(
    "mt_fsdp2_fp8|$F2 --float8.enable=true --float8.fsdp_all_gather=true --float8.precompute_scale=true"
    "tt_fsdp2_fp8|$TF2 --compile.enable --model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise --quantize.linear.float8.enable_fsdp_float8_all_gather --quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp") ;;
  cp2) rows=(
    "mt_cp2_64k|$M16 --nproc 2 --parallelism.cp=2 --training.seq_len=65536 $(b 1) --activation_checkpoint.mode=full"
    "tt_cp2_64k|@torchtitan:2 --model.flavor 8B_16L --training.seq_len 65536 --training.local_batch_size 1 --parallelism.context_parallel_degree 2 --activation_checkpoint.mode full --compile.enable") ;;
  pp2_1f1b) rows=("mt_pp2_1f1b|$P2 --parallelism.pp_schedule=1f1b" "tt_pp2_1f1b|$TP2 --parallelism.pipeline_parallel_schedule 1F1B") ;;
  pp2_interleaved) rows=(
    "mt_pp2_interleaved|$P2 --parallelism.pp_schedule=interleaved_1f1b"
    "tt_pp2_interleaved|$TP2 --parallelism.pipeline_parallel_schedule Interleaved1F1B --parallelism.pipeline_parallel_layers_per_stage 4") ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
}
# several parts run in one call: `vs_torchtitan.sh table1a table1b`; ONLY="name name ..." keeps those rows
# (in the order given), e.g. the rows one lease has time for
all=()
for part in "${@:-table1a}"; do rows_of "$part" || exit 2; all+=("${rows[@]}"); done
if [ -n "${ONLY:-}" ]; then
  rows=(); for name in $ONLY; do for r in "${all[@]}"; do [ "${r%%|*}" = "$name" ] && rows+=("$r") && break; done; done
else
  rows=("${all[@]}")
fi
if [ "${DRY:-0}" = 1 ]; then printf '%s\n' "${rows[@]}"; exit 0; fi  # DRY=1: print the rows only
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
