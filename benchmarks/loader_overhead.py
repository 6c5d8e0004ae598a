"""The data loader at the 8B shape on one GPU: host time per step, and that the step never waits for it.

    OUT=... bash benchmarks/loader_overhead.sh        (sources gpu_env.sh, then runs this)

1. Tokenizes a corpus (the shipped Shakespeare, one paragraph per jsonl document, repeated to
   --megabytes) into shards with every core: `minititan tokenize` throughput on this machine.
2. Host time to read one step's batch (seq 8192, batch 2, with and without document masking)
   and copy it into pinned memory: what the prefetch thread does each step.
3. Trains Llama 3 8B width x 8 layers on those shards for 12 steps (configs/llama3_8b.toml's
   compile and selective AC, batch 2; plain, then with data.document_masking) with the profiler on
   steps 9-10: exposed loader time = the "data.wait" ranges of the trace per step; hidden = the
   run's own summary line (reading time per step on the prefetch thread, which torch's profiler
   does not record).
Without CUDA it stops after 2 (reads without pinning): `python benchmarks/loader_overhead.py OUT 10`.
Prints JSON lines and writes them to OUT/loader_overhead.jsonl.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minititan.core.data import TokenSource, rank_slice  # noqa: E402

SEQ, BATCH = 8192, 2


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "bench_out"))
    megabytes = float(sys.argv[2]) if len(sys.argv) > 2 else 100
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    from benchmarks.tokenize_speed import make_corpus, run_tokenize
    corpus = make_corpus(out, megabytes)
    tokens, seconds = run_tokenize(corpus, out / "shards", "--shard-tokens", "32000000")
    rows.append({"what": "tokenize (byte)", "cores": len(os.sched_getaffinity(0)), "tokens": tokens,
                 "seconds": seconds, "tokens_per_s": tokens / seconds, "MB_per_s": megabytes / seconds})
    corpus.unlink()

    data = TokenSource(str(out / "shards"), 128256)
    pin = torch.cuda.is_available()  # pinning needs a GPU
    for documents in (False, True):
        times = []
        for step in range(1, 51):
            t0 = time.perf_counter()
            batch = data.read(0, step, BATCH, SEQ, rows=rank_slice(0, 1, BATCH), documents=documents)
            if pin:
                [t.pin_memory() for t in batch if t is not None]
            times.append(time.perf_counter() - t0)
        rows.append({"what": "host read + pin per step" if pin else "host read per step (no GPU: no pinning)",
                     "document_masking": documents, "ms_median": 1e3 * sorted(times)[len(times) // 2],
                     "ms_max": 1e3 * max(times)})

    for masking in ("false", "true") if pin else ():
        run = out / f"run_masking_{masking}"
        cmd = [sys.executable, "-m", "minititan.cli", "train", "-c", "configs/llama3_8b.toml", "--model.n_layers=8",
               f"--training.seq_len={SEQ}", f"--training.global_batch_size={BATCH}", f"--training.local_batch_size={BATCH}",
               "--training.steps=12", "--metrics.log_freq=1", "--checkpoint.enable=false",
               f"--data.dataset={out / 'shards'}", f"--data.document_masking={masking}", f"--job.dump_folder={run}",
               "--profiling.enable=true", "--profiling.start_step=9", "--profiling.steps=2"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (run / "log.txt").write_text(proc.stdout + proc.stderr) if run.exists() else None
        row = {"what": "train 8B width x 8 layers, batch 2 (the config's compile + selective AC)",
               "document_masking": masking, "rc": proc.returncode,
               "summary": next((line for line in proc.stdout.splitlines() if line.startswith("data: reading")), None)}
        metrics = [json.loads(line) for line in open(run / "metrics.jsonl")] if (run / "metrics.jsonl").exists() else []
        if metrics:
            row["step_time_s_last"] = metrics[-1].get("step_time_s")
            row["tokens_per_sec_per_device_last"] = metrics[-1].get("tokens_per_sec_per_device")
        for trace in glob.glob(str(run / "profiling" / "*.json")):
            events = json.load(open(trace)).get("traceEvents", [])
            for name in ("data.wait",):
                spans = [e for e in events if e.get("name") == name and e.get("ph") == "X"]
                row[f"{name}_ms_per_step_in_trace"] = sum(e["dur"] for e in spans) / 1e3 / 2
                row[f"{name}_threads"] = sorted({e["tid"] for e in spans}, key=str)
        if proc.returncode:
            row["stderr_tail"] = proc.stderr[-800:]
        rows.append(row)
    with open(out / "loader_overhead.jsonl", "w") as f:
        for r in rows:
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
