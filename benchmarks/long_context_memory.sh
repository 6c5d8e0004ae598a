#!/usr/bin/env bash
# Issue 28's long-context memory gap: 8B width x 8 layers, seq 32,768, batch 1, full AC + compile,
# minititan and torchtitan 0.2.2 each with a CUDA memory snapshot, then what is alive at each peak
# (benchmarks/memory_peak.py). On the GPU machine, with .whl carried (see benchmarks/README.md):
#   OUT=$OUT bash benchmarks/long_context_memory.sh [SEQ]
set -u
source benchmarks/gpu_env.sh
SEQ=${1:-32768}
python3 -m minititan.cli train -c configs/llama3_8b.toml --model.n_layers=8 --model.rope_scaling=false \
  --training.seq_len=$SEQ --training.global_batch_size=1 --training.local_batch_size=1 \
  --activation_checkpoint.mode=full --training.steps=6 --metrics.log_freq=1 --checkpoint.enable=false \
  --data.dataset=synthetic --lr_scheduler.warmup_steps=2 --profiling.memory_snapshot=true \
  --job.dump_folder=/tmp/mt_mem > $OUT/mt_mem_$SEQ.log 2>&1
tail -4 $OUT/mt_mem_$SEQ.log
python3 benchmarks/memory_peak.py /tmp/mt_mem/profiling/memory_snapshot_rank0.pickle > $OUT/mt_peak_$SEQ.txt 2>&1
head -30 $OUT/mt_peak_$SEQ.txt
timeout 420 torchrun --standalone --nproc_per_node 1 benchmarks/tt_bench.py --metrics.log_freq 1 --training.steps 6 \
  --lr_scheduler.warmup_steps 2 --model.flavor 8B_8L --training.seq_len $SEQ --training.local_batch_size 1 \
  --activation_checkpoint.mode full --compile.enable --profiling.enable_memory_snapshot --profiling.profile_freq 5 \
  --job.dump_folder /tmp/tt_mem > $OUT/tt_mem_$SEQ.log 2>&1
sed 's/\x1b\[[0-9;]*m//g' $OUT/tt_mem_$SEQ.log | grep -E "step: *[0-9]" | tail -3
python3 benchmarks/memory_peak.py /tmp/tt_mem/memory_snapshot/iteration_5/rank0_memory_snapshot.pickle > $OUT/tt_peak_$SEQ.txt 2>&1
head -30 $OUT/tt_peak_$SEQ.txt
