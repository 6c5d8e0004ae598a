#!/usr/bin/env bash
# The loader at the 8B shape on one GPU (benchmarks/loader_overhead.py): tokenize throughput on the
# machine's cores, host time per step, and the data.read / data.wait ranges of a profiled 8B run.
#   OUT=$OUT bash benchmarks/loader_overhead.sh        (about 2-3 minutes on one H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
python3 benchmarks/loader_overhead.py "$OUT/loader" "${MEGABYTES:-100}"
python3 benchmarks/document_attention_micro.py "$OUT/loader"
