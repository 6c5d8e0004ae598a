#!/usr/bin/env bash
# Same-call A/B of source trees: each row of vs_torchtitan.sh run from every tree in turn (row by row,
# so a drift of the machine hits both alike), then one table. On the GPU machine, from the repo root,
# with .whl carried and the trees as plain copies inside the checkout (e.g. `git archive REV | tar -x
# -C .ab/NAME`, .ab ignored and carried):
#   TREES=".ab/before ." ROWS="mt_compile_b1 mt_eager_b1" PARTS="table1a" OUT=$OUT bash benchmarks/ab.sh
# DEADLINE=S starts no run later than S seconds after the first. Logs stay in /tmp/ab; $OUT gets the table.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
mkdir -p /tmp/ab; top=$PWD; start=$(date +%s); : > $OUT/ab.txt
for row in $ROWS; do
  for tree in $TREES; do
    if [ $(( $(date +%s) - start )) -gt ${DEADLINE:-100000} ]; then echo "| $tree | $row | not started (DEADLINE) |" >> $OUT/ab.txt; continue; fi
    name=$(echo "$tree" | tr -c 'a-zA-Z0-9\n' '_')
    (cd "$tree" && ONLY="$row" OUT=/tmp/ab/$name bash "$top/benchmarks/vs_torchtitan.sh" $PARTS > /tmp/ab/$name.$row.txt 2>&1)
    grep "^| $row " /tmp/ab/$name.$row.txt | sed "s#^#| $tree #" | tee -a $OUT/ab.txt
  done
done
echo  # each tree's header as its bench.py printed it (older trees lack the allocated-memory column)
for tree in $TREES; do
  name=$(echo "$tree" | tr -c 'a-zA-Z0-9\n' '_')
  echo "$tree: | tree $(grep -h '^| run |' /tmp/ab/$name.*.txt 2>/dev/null | head -1)"
done
cat $OUT/ab.txt
