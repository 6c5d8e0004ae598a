#!/usr/bin/env bash
# The multi-GPU tables of issues 12-14 (nvidia-h200-x8 / -x4), one table per call, from the repo root:
#   OUT=/path/to/logs bash benchmarks/run_multi_gpu.sh fsdp8b     # issue 12: Llama 3.1 8B, dp_shard 8
#   OUT=... bash benchmarks/run_multi_gpu.sh longctx              # issue 13: FSDP x CP up to 262,144 tokens
#   OUT=... bash benchmarks/run_multi_gpu.sh pipeline             # issue 14: 70B width, PP 4 schedules, 3D/4D
# NPROC (default: all visible GPUs) sets the world; DRY=1 prints the commands only.
# Not yet run: no machine of 4 or 8 GPUs has been lent to this project. minititan rows only; the
# two-GPU side-by-side parts are in benchmarks/vs_torchtitan.sh (fsdp2_*, cp2, pp2_*).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-./bench_out}
N=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
B8="-c configs/llama3_8b.toml --nproc $N"
case "${1:-}" in
  fsdp8b) rows=(
    "8b_fsdp_bf16|$B8 --parallelism.dp_shard=$N --training.local_batch_size=2 --training.global_batch_size=$((2 * N)) --compile.enable=false"
    "8b_fsdp_compile|$B8 --parallelism.dp_shard=$N --training.local_batch_size=2 --training.global_batch_size=$((2 * N))"
    "8b_fsdp_compile_fp8|$B8 --parallelism.dp_shard=$N --training.local_batch_size=2 --training.global_batch_size=$((2 * N)) --float8.enable=true --float8.fsdp_all_gather=true --float8.precompute_scale=true") ;;
  longctx) rows=(
    "8b_cp1_32k|$B8 --parallelism.dp_shard=$N --parallelism.cp=1 --training.seq_len=32768 --training.local_batch_size=1 --training.global_batch_size=$N --activation_checkpoint.mode=full --float8.enable=true"
    "8b_cp2_64k|$B8 --parallelism.dp_shard=$((N / 2)) --parallelism.cp=2 --training.seq_len=65536 --training.local_batch_size=1 --training.global_batch_size=$((N / 2)) --activation_checkpoint.mode=full --float8.enable=true"
    "8b_cp4_128k|$B8 --parallelism.dp_shard=$((N / 4)) --parallelism.cp=4 --training.seq_len=131072 --training.local_batch_size=1 --training.global_batch_size=$((N / 4)) --activation_checkpoint.mode=full --float8.enable=true") ;;
  pipeline) P="-c configs/llama3_70b.toml --nproc $N --model.n_layers=16 --parallelism.tp=1 --training.local_batch_size=8 --training.global_batch_size=$((8 * N / 4))"
    rows=(
    "70bw_pp4_1f1b|$P --parallelism.pp=4 --parallelism.dp_shard=$((N / 4)) --parallelism.pp_schedule=1f1b"
    "70bw_pp4_interleaved|$P --parallelism.pp=4 --parallelism.dp_shard=$((N / 4)) --parallelism.pp_schedule=interleaved_1f1b"
    "70bw_pp4_zero_bubble|$P --parallelism.pp=4 --parallelism.dp_shard=$((N / 4)) --parallelism.pp_schedule=zero_bubble --activation_checkpoint.mode=full") ;;
  *) echo "usage: $0 fsdp8b|longctx|pipeline"; exit 2 ;;
esac
if [ "${DRY:-0}" = 1 ]; then printf '%s\n' "${rows[@]}"; exit 0; fi
python3 benchmarks/bench.py "$OUT" "${rows[@]}"
