#!/usr/bin/env bash
# minititan's own two-GPU tables (nvidia-h200-x2) for issues 4-7, one part per 10-minute call, from the
# repo root with msgspec's wheel in .whl/ (torchtitan's rows beside them: benchmarks/vs_torchtitan.sh):
#   OUT=/path/to/logs bash benchmarks/run_two_gpu.sh PART
#   tp          issue 4: 8B width x 8 layers at dp_shard 2 vs tp 2, tp 2 + SP, tp 2 + async TP (seq 8192)
#   pp          issue 5: 8B width x 16 layers, pp 2 zero-bubble (1F1B and interleaved: vs_torchtitan.sh pp2_*),
#               and the single-GPU 8B x 8 layers step that PP's bubble is measured against
#   cp_64k      issue 6: 8B width x 16 layers, full AC: cp 1 at 32K vs cp 2 at 64K
#   cp_128k     issue 6: cp 1 at 64K vs cp 2 at 128K
#   moe         issue 7: configs/moe_4b.toml at dp_shard 2 with ep 1 and ep 2; grouped GEMM vs loop on one GPU
# DRY=1 prints the rows only. Not yet run: no two-GPU machine was lent in these sessions.
set -u
source benchmarks/gpu_env.sh
M8="-c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false"
M16="-c configs/llama3_8b.toml --model.n_layers=16 --model.rope_scaling=false"
b() { echo "--training.global_batch_size=$1 --training.local_batch_size=$2"; }
cp_row() {  # cp, seq
  echo "cp$1_$(($2 / 1024))k|$M16 --nproc $1 --parallelism.cp=$1 --training.seq_len=$2 $(b 1 1) --activation_checkpoint.mode=full"
}
case "${1:-}" in
  tp) rows=(
    "dp_shard2|$M8 --nproc 2 --parallelism.dp_shard=2 $(b 4 2)"
    "tp2|$M8 --nproc 2 --parallelism.tp=2 $(b 2 2)"
    "tp2_sp|$M8 --nproc 2 --parallelism.tp=2 --parallelism.sequence_parallel=true $(b 2 2)"
    "tp2_async|$M8 --nproc 2 --parallelism.tp=2 --parallelism.sequence_parallel=true --parallelism.async_tp=true $(b 2 2)") ;;
  pp) rows=(
    "pp2_zero_bubble|$M16 --nproc 2 --parallelism.pp=2 --parallelism.pp_schedule=zero_bubble $(b 8 8) --parallelism.pp_microbatches=8 --activation_checkpoint.mode=full"
    "one_gpu_8x8_b1|$M8 $(b 1 1)") ;;
  cp_64k) export BENCH_STEPS=16 BENCH_LOG_FREQ=2 BENCH_AFTER=6; rows=("$(cp_row 1 32768)" "$(cp_row 2 65536)") ;;
  cp_128k) export BENCH_STEPS=12 BENCH_LOG_FREQ=2 BENCH_AFTER=4; rows=("$(cp_row 1 65536)" "$(cp_row 2 131072)") ;;
  moe) [ "${DRY:-0}" = 1 ] || python3 benchmarks/moe_micro.py | tee "$OUT/moe_micro.txt"
    rows=("moe4b_dp2_ep1|-c configs/moe_4b.toml --nproc 2 --parallelism.dp_shard=2 $(b 4 2)"
          "moe4b_dp2_ep2|-c configs/moe_4b.toml --nproc 2 --parallelism.dp_shard=2 --parallelism.ep=2 $(b 4 2)"
          # the capped exchange (no host read: the MoE block compiles under selective AC), and the exact one
          # under full AC (checkpointed outside its compiled pieces)
          "moe4b_dp2_ep2_capped|-c configs/moe_4b.toml --nproc 2 --parallelism.dp_shard=2 --parallelism.ep=2 --parallelism.ep_capacity_factor=1.25 $(b 4 2)"
          "moe4b_dp2_ep2_full|-c configs/moe_4b.toml --nproc 2 --parallelism.dp_shard=2 --parallelism.ep=2 --activation_checkpoint.mode=full $(b 4 2)") ;;
  *) echo "usage: $0 tp|pp|cp_64k|cp_128k|moe"; exit 2 ;;
esac
if [ "${DRY:-0}" = 1 ]; then printf '%s\n' "${rows[@]}"; exit 0; fi
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
