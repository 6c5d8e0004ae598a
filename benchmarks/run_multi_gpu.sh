#!/usr/bin/env bash
# The multi-GPU tables of issues 12-14 (nvidia-h200-x8 / -x4), minititan and torchtitan 0.2.2 side by
# side, from the repo root with the wheels of benchmarks/README.md in .whl/:
#   OUT=/path/to/logs bash benchmarks/run_multi_gpu.sh PART
# A table is split in parts so that each fits one 10-minute call:
#   fsdp8b_eager | fsdp8b_compile | fsdp8b_fp8          issue 12: Llama 3.1 8B, dp_shard 8, seq 8192, local batch 2,
#                                                       selective AC; bf16 eager, + compile, + Float8 (fp8 all-gather)
#   longctx_32k | longctx_64k | longctx_128k | longctx_256k | longctx_256k_tt
#                                                       issue 13: 8B, FSDP x CP = 8 x 1 ... 1 x 8, full AC, compile + Float8
#   pp4_1f1b | pp4_interleaved | pp4_zero_bubble        issue 14: 70B width x 16 layers, PP 4 (x4 or x8 machine)
#   3d | 4d                                             issue 14: FSDP 2 x TP 2 x PP 2; CP 2 x TP 2 x PP 2 (FSDP over cp)
# NPROC (default: all visible GPUs) sets the world; DRY=1 prints the rows only. Not yet run: no machine
# of 4 or 8 GPUs has been lent to this project.
set -u
source benchmarks/gpu_env.sh
N=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 8)}
B8="-c configs/llama3_8b.toml --nproc $N"
TT8="@torchtitan:$N --model.flavor 8B"
F8="--parallelism.dp_shard=$N --training.local_batch_size=2 --training.global_batch_size=$((2 * N))"
TF8="$TT8 --training.seq_len 8192 --training.local_batch_size 2 --parallelism.data_parallel_shard_degree $N --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op"
TT_FP8="--model.converters quantize.linear.float8 --quantize.linear.float8.recipe_name tensorwise --quantize.linear.float8.enable_fsdp_float8_all_gather --quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"
MT_FP8="--float8.enable=true --float8.fsdp_all_gather=true --float8.precompute_scale=true"
# long context: FSDP (N / cp) x CP (cp) at seq 32K x cp; steps take seconds to a minute, so fewer of them
ctx() {  # cp
  local cp=$1 seq=$((32768 * $1)) dp=$((N / $1))
  echo "mt_8b_cp${cp}_$((seq / 1024))k|$B8 --parallelism.dp_shard=$dp --parallelism.cp=$cp --training.seq_len=$seq --model.max_seq_len=$seq --training.local_batch_size=1 --training.global_batch_size=$dp --activation_checkpoint.mode=full $MT_FP8"
  echo "tt_8b_cp${cp}_$((seq / 1024))k|$TT8 --training.seq_len $seq --training.local_batch_size 1 --parallelism.data_parallel_shard_degree $dp --parallelism.context_parallel_degree $cp --activation_checkpoint.mode full --compile.enable $TT_FP8"
}
P="-c configs/llama3_70b.toml --nproc $N --model.n_layers=16 --model.rope_scaling=false"
TP="@torchtitan:$N --model.flavor 70B_16L --training.seq_len 8192 --activation_checkpoint.mode selective --activation_checkpoint.selective_ac_option op --compile.enable"
pp4() {  # schedule (ours), schedule (torchtitan's name), extra torchtitan flags, extra minititan flags
  local dp=$((N / 4))
  echo "mt_70bw_pp4_$1|$P --parallelism.pp=4 --parallelism.dp_shard=$dp --parallelism.tp=1 --parallelism.pp_schedule=$1 --training.local_batch_size=8 --training.global_batch_size=$((8 * dp)) --parallelism.pp_microbatches=8 ${4:-}"
  echo "tt_70bw_pp4_$1|$TP --parallelism.pipeline_parallel_degree 4 --parallelism.data_parallel_shard_degree $dp --parallelism.pipeline_parallel_schedule $2 --parallelism.pipeline_parallel_microbatch_size 1 --training.local_batch_size 8 $3"
}
case "${1:-}" in
  fsdp8b_eager) rows=("mt_8b_fsdp_eager|$B8 $F8 --compile.enable=false" "tt_8b_fsdp_eager|$TF8") ;;
  fsdp8b_compile) rows=("mt_8b_fsdp_compile|$B8 $F8" "tt_8b_fsdp_compile|$TF8 --compile.enable") ;;
  fsdp8b_fp8) rows=("mt_8b_fsdp_fp8|$B8 $F8 $MT_FP8" "tt_8b_fsdp_fp8|$TF8 --compile.enable $TT_FP8") ;;
  longctx_32k) export BENCH_STEPS=16 BENCH_LOG_FREQ=2 BENCH_AFTER=6; mapfile -t rows < <(ctx 1) ;;
  longctx_64k) export BENCH_STEPS=16 BENCH_LOG_FREQ=2 BENCH_AFTER=6; mapfile -t rows < <(ctx 2) ;;
  longctx_128k) export BENCH_STEPS=8 BENCH_LOG_FREQ=1 BENCH_AFTER=4; mapfile -t rows < <(ctx 4) ;;
  longctx_256k) export BENCH_STEPS=6 BENCH_LOG_FREQ=1 BENCH_AFTER=3; mapfile -t rows < <(ctx 8 | head -1) ;;
  longctx_256k_tt) export BENCH_STEPS=6 BENCH_LOG_FREQ=1 BENCH_AFTER=3; mapfile -t rows < <(ctx 8 | tail -1) ;;
  pp4_1f1b) mapfile -t rows < <(pp4 1f1b 1F1B "") ;;
  pp4_interleaved) mapfile -t rows < <(pp4 interleaved_1f1b Interleaved1F1B "--parallelism.pipeline_parallel_layers_per_stage 2") ;;
  pp4_zero_bubble) mapfile -t rows < <(pp4 zero_bubble ZBVZeroBubble "" "--activation_checkpoint.mode=full" | head -1) ;;
  3d) rows=("mt_70bw_fsdp2_tp2_pp2|$P --parallelism.dp_shard=2 --parallelism.tp=2 --parallelism.pp=2 --parallelism.sequence_parallel=true --training.local_batch_size=8 --training.global_batch_size=16 --parallelism.pp_microbatches=8"
            "tt_70bw_fsdp2_tp2_pp2|$TP --parallelism.data_parallel_shard_degree 2 --parallelism.tensor_parallel_degree 2 --parallelism.pipeline_parallel_degree 2 --parallelism.pipeline_parallel_microbatch_size 1 --training.local_batch_size 8") ;;
  4d) rows=("mt_70bw_cp2_tp2_pp2|$P --parallelism.cp=2 --parallelism.tp=2 --parallelism.pp=2 --parallelism.sequence_parallel=true --training.seq_len=16384 --training.local_batch_size=8 --training.global_batch_size=8 --parallelism.pp_microbatches=8"
            "tt_70bw_cp2_tp2_pp2|$TP --training.seq_len 16384 --parallelism.context_parallel_degree 2 --parallelism.tensor_parallel_degree 2 --parallelism.pipeline_parallel_degree 2 --parallelism.pipeline_parallel_microbatch_size 1 --training.local_batch_size 8") ;;
  *) echo "usage: $0 fsdp8b_eager|fsdp8b_compile|fsdp8b_fp8|longctx_32k|longctx_64k|longctx_128k|longctx_256k|longctx_256k_tt|pp4_1f1b|pp4_interleaved|pp4_zero_bubble|3d|4d"; exit 2 ;;
esac
if [ "${DRY:-0}" = 1 ]; then printf '%s\n' "${rows[@]}"; exit 0; fi
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
