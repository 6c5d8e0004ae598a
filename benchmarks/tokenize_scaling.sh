#!/usr/bin/env bash
# `minititan tokenize` against a plain `tokenizers` encode_batch loop, 1 to 16 worker processes
# (benchmarks/tokenize_speed.py), on the 16-core GPU machine. Needs the `tokenizers` wheel in .whl/
# (see benchmarks/README.md, "Reproducing on a lent GPU": add tokenizers to the download line).
#   OUT=$OUT bash benchmarks/tokenize_scaling.sh       (about 90 seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
python3 benchmarks/tokenize_speed.py "$OUT/tokenize" --megabytes "${MEGABYTES:-60}" --workers 1,2,4,8,16 --repeat 1
