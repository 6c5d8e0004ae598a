"""Run training configurations one after another and print one table row each.

    python benchmarks/bench.py OUT_DIR "name|-c configs/llama3_8b.toml --model.n_layers=8 ..." ...
    python benchmarks/bench.py OUT_DIR "tt_name|@torchtitan --model.flavor 8B_8L ..."
    python benchmarks/bench.py OUT_DIR "tt_fsdp|@torchtitan:2 --parallelism.data_parallel_shard_degree 2 ..."

A spec is `name|arguments`: minititan's `train` arguments, or, after `@torchtitan`, torchtitan
0.2.2's (benchmarks/tt_bench.py under torchrun on one GPU, or N for `@torchtitan:N`; it needs the
wheels of the torchtitan harness installed). Each run trains 30 steps logging every 5; a row is the
median over the logged windows after step 10 of tokens/s per device and MFU, and the peak memory
(BENCH_STEPS, BENCH_LOG_FREQ and BENCH_AFTER change the 30, 5 and 10; BENCH_TIMEOUT the 600 s a run
may take; BENCH_START_BY = S starts no run later than S seconds after the first, so that a lease's
command ends in time with the rows it finished). minititan rows also show step 1's gradient norm:
the same weights and data in every row, so a row far from the others computed something else (it
caught the Float8 backward of benchmarks/float8.md).
Logs: OUT_DIR/<name>.log.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# BENCH_STEPS / BENCH_LOG_FREQ / BENCH_AFTER shorten runs whose steps take many seconds (long context)
STEPS, LOG_FREQ, AFTER, TIMEOUT, START_BY = (int(os.environ.get(f"BENCH_{k}", d)) for k, d in
                                              (("STEPS", 30), ("LOG_FREQ", 5), ("AFTER", 10), ("TIMEOUT", 600),
                                               ("START_BY", 10**9)))
COMMON = [f"--training.steps={STEPS}", f"--metrics.log_freq={LOG_FREQ}", "--checkpoint.enable=false",
          "--data.dataset=synthetic", "--lr_scheduler.warmup_steps=2"]
TT_COMMON = ["--metrics.log_freq", str(LOG_FREQ), "--training.steps", str(STEPS), "--lr_scheduler.warmup_steps", "2"]
TT_LINE = re.compile(r"step:\s*(\d+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+).*?mfu:\s*([\d.]+)%")


def run_torchtitan(out: Path, name: str, args: list[str], nproc: int = 1, timeout: int = min(TIMEOUT, 420)) -> dict:
    driver = Path(__file__).with_name("tt_bench.py")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", str(nproc), str(driver), *TT_COMMON, *args,
           "--job.dump_folder", str(out / f"run_{name}")]
    start = time.time()
    rc = _run_logged(cmd, out / f"{name}.log", timeout)
    text = re.sub(r"\x1b\[[0-9;]*m", "", (out / f"{name}.log").read_text())
    rows = [(int(s), float(m), float(t.replace(",", "")), float(u)) for s, m, t, u in TT_LINE.findall(text)]
    late = [r for r in rows if r[0] > AFTER]
    row = {"name": name, "rc": rc, "wall_s": round(time.time() - start)}
    if late:
        row |= {"tokens_per_sec": statistics.median(r[2] for r in late), "mfu": statistics.median(r[3] for r in late),
                "mem_gib": max(r[1] for r in rows)}
    return row


def _run_logged(cmd: list[str], log_path: Path, timeout: int):
    """Run cmd in its own session (so that it and all its workers stop together), its output to log_path.
    A SIGTERM to this script (an outer `timeout`) stops the run too: its own session would outlive us
    and hold the GPU through the next run."""
    with open(log_path, "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout"
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
            _stop(proc)
            signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: torch's elastic launcher then stops its workers (which a kill would orphan)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run(out: Path, name: str, args: list[str], timeout: int = TIMEOUT) -> dict:
    if args and args[0].startswith("@torchtitan"):
        return run_torchtitan(out, name, args[1:], nproc=int(args[0].partition(":")[2] or 1))
    folder = out / f"run_{name}"
    cmd = [sys.executable, "-m", "minititan.cli", "train", *COMMON, *args, f"--job.dump_folder={folder}"]
    start = time.time()
    rc = _run_logged(cmd, out / f"{name}.log", timeout)
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if r["step"] > AFTER]
    row = {"name": name, "rc": rc, "wall_s": round(time.time() - start)}
    if late:
        row |= {"tokens_per_sec": statistics.median(r["tokens_per_sec_per_device"] for r in late),
                "mfu": statistics.median(r["mfu"] or 0 for r in late),
                "mem_gib": max(r["mem_peak_gib"] for r in rows), "loss": rows[-1]["loss"],
                "mem_alloc_gib": max((r.get("mem_allocated_peak_gib") or 0) for r in rows),  # what plan predicts
                "gnorm_step1": rows[0]["grad_norm"]}  # same weights and data in every row: a sanity check
    return row


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results, first = [], time.time()
    for spec in sys.argv[2:]:
        name, args = spec.split("|", 1)
        if time.time() - first > START_BY:
            results.append({"name": name, "rc": "not started (BENCH_START_BY)", "wall_s": 0})
        else:
            results.append(run(out, name, shlex.split(args)))
        print(json.dumps(results[-1]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n| run | tokens/s/GPU | MFU | peak mem GiB | allocated GiB | step-1 grad norm | wall s | rc |\n"
          f"|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['name']} | {r.get('tokens_per_sec', 0):,.0f} | {r.get('mfu', 0):.1f}% | "
              f"{r.get('mem_gib', 0):.1f} | {r.get('mem_alloc_gib', 0):.1f} | {r.get('gnorm_step1', float('nan')):.3f} | "
              f"{r['wall_s']} | {r['rc']} |")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
