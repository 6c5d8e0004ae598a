"""300 steps of the tiny model on tiny Shakespeare, bf16 vs Float8: tensorwise, tensorwise with the output projection
in fp8 too (float8.filter = []), rowwise (on the CPU the fp8 GEMMs are emulated).

Run from the repo root: PYTHONPATH=. python benchmarks/float8_shakespeare.py
"""
import time, sys, json
from minititan.core.config import load_config
from minititan.train import train
from tests.harness import TINY
res = {}
RUNS = [("bf16", []), ("fp8_tensorwise", ["float8.enable=true"]),
        ("fp8_tensorwise_output_too", ["float8.enable=true", "float8.filter=[]"]),
        ("fp8_rowwise", ["float8.enable=true", "float8.recipe=rowwise"])]
for name, extra in RUNS:
    ov = TINY + ["training.param_dtype=bfloat16", "training.steps=300", "metrics.log_freq=50", "training.local_batch_size=8",
                 "checkpoint.enable=false", f"job.dump_folder=/tmp/f8long_{name}", "lr_scheduler.warmup_steps=20"] + extra
    t = time.time(); rows = train(load_config(None, ov)); res[name] = [(r["step"], r["loss"]) for r in rows]
    print(name, time.time() - t, res[name], flush=True)
print(json.dumps(res))
