#!/usr/bin/env bash
# The GPU side of benchmarks/plan.md: the rows whose current figures (tokens/s, reserved and now
# allocated peak: metrics.jsonl's mem_allocated_peak_gib) the predictions need, and the device's
# calibrated profile. Each part fits one 3-minute call on one H100/H200 (fsdp2: two GPUs).
#   OUT=$OUT bash benchmarks/plan_measure.sh calibrate   # minititan plan --calibrate -> $OUT/profile.toml
#   OUT=$OUT bash benchmarks/plan_measure.sh 8b_a        # 8B x 8 layers: eager b1, compile b1, selective-op b2
#   OUT=$OUT bash benchmarks/plan_measure.sh 8b_b        # compile b2, full AC b2, Float8 tensorwise b2
#   OUT=$OUT bash benchmarks/plan_measure.sh 1b          # the 1B shape, batch 2: no AC, selective, full (compile)
#   OUT=$OUT bash benchmarks/plan_measure.sh fsdp2       # Llama 3.1 8B, dp_shard 2 (nvidia-h200-x2)
# Then put the numbers in benchmarks/plan_check.py's OURS and run it on the CPU: the table of plan.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export BENCH_STEPS=${BENCH_STEPS:-20}
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
M1B="-c configs/llama3_8b.toml --model.dim=2048 --model.n_layers=16 --model.ffn_dim_multiplier=1.5 --model.multiple_of=256 --model.rope_scaling=false"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$1"; }
case "${1:?part: calibrate 8b_a 8b_b 1b fsdp2}" in
  calibrate) python3 -m minititan.cli plan --calibrate "$OUT/profile.toml" && cat "$OUT/profile.toml"; exit 0 ;;
  8b_a) rows=("mt_eager_b1|$M8 $(b 1) --activation_checkpoint.mode=none --compile.enable=false"
              "mt_compile_b1|$M8 $(b 1) --activation_checkpoint.mode=none"
              "mt_selop_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=selective") ;;
  8b_b) rows=("mt_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none"
              "mt_full_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=full"
              "mt_fp8tw_compile_b2|$M8 $(b 2) --activation_checkpoint.mode=none --float8.enable=true") ;;
  1b) rows=("1B_none_compile_b2|$M1B $(b 2) --activation_checkpoint.mode=none"
            "1B_selective_compile_b2|$M1B $(b 2) --activation_checkpoint.mode=selective"
            "1B_full_compile_b2|$M1B $(b 2) --activation_checkpoint.mode=full") ;;
  fsdp2) rows=("mt_fsdp2_compile|-c configs/llama3_8b.toml --nproc 2 --parallelism.dp_shard=2 --training.local_batch_size=2 --training.global_batch_size=4 --activation_checkpoint.mode=selective") ;;
  *) echo "unknown part $1"; exit 2 ;;
esac
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
