"""Faults end a run cleanly: SIGTERM checkpoints and exits 0; a killed rank ends the job (no hang)
and a rerun resumes from the last complete checkpoint; a diverged loss stops with the step number."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minititan.core import checkpoint as ckpt
from tests.harness import TINY

CLI = [sys.executable, "-m", "minititan.cli", "train"]


def _args(folder, *extra):
    return [f"--{o}" for o in TINY] + [f"--job.dump_folder={folder}", "--training.steps=100000", *extra]


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    proc = subprocess.Popen(CLI + _args(tmp_path, "--checkpoint.interval=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = ""
    while not first.startswith("step"):  # the first logged step: training is under way
        first = proc.stdout.readline()
        assert first or proc.poll() is None, "the run ended before its first step"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    assert ckpt.latest(tmp_path / "checkpoints") is not None


def test_killed_rank_ends_the_job_and_rerun_resumes(tmp_path):
    args = _args(tmp_path, "--checkpoint.interval=3", "--parallelism.dp_replicate=2", "--training.local_batch_size=4")
    proc = subprocess.Popen(CLI + ["--nproc", "2"] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / "checkpoints"
    assert _wait_for(lambda: ckpt.latest(folder) is not None and ckpt.latest(folder).name >= "step-00000006")
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 120
    saved = ckpt.latest(folder)
    done = ckpt.Checkpoint(saved).step  # complete and loadable: the manifest checks every file
    rerun = subprocess.run(CLI + ["--nproc", "2"] + args[:-3] + ["--training.steps", str(done + 2),
                           "--checkpoint.interval=3", "--parallelism.dp_replicate=2", "--training.local_batch_size=4"],
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {saved}" in rerun.stdout


def test_diverged_loss_stops_with_the_step(tmp_path):
    r = subprocess.run(CLI + _args(tmp_path, "--training.steps=5", "--optimizer.lr=1e30", "--training.max_norm=0",
                                   "--lr_scheduler.warmup_steps=0"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "diverged" in r.stderr and "at step" in r.stderr


def test_out_of_memory_names_the_fixes(monkeypatch, tmp_path):
    """An out-of-memory error in a step becomes one UserError with the step and what to change."""
    import pytest
    import torch

    from minititan import train as trainer
    from minititan.core.config import UserError, load_config

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.62 GiB")
    monkeypatch.setattr(trainer, "forward_backward", no_memory)
    cfg = load_config(None, TINY + [f"job.dump_folder={tmp_path}", "activation_checkpoint.mode=none"])
    with pytest.raises(UserError) as e:
        trainer.train(cfg)
    for words in ("out of memory", "step 1", "training.local_batch_size (now 2", "activation_checkpoint.mode = selective",
                  "profiling.memory_snapshot = true"):
        assert words in str(e.value)
