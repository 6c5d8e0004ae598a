"""Faults end a run cleanly and never lose a good checkpoint: SIGTERM (one rank, and through the
`--nproc` launcher with steps slow enough that agreeing only on logging steps would miss the grace
time) checkpoints the last finished step and exits 0; a kill -9 of the launcher leaves no rank
behind; a killed rank ends the job and a rerun resumes; a diverging job stops every rank with one
line naming the step; a rank failing alone ends the job with its own line. What a diverging run
saves and out of memory are tested in one process, in tests/test_reliability.py."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minititan.core import checkpoint as ckpt
from minititan.core.preemption import child_pids
from tests.harness import TINY

CLI = [sys.executable, "-m", "minititan.cli", "train"]
SLOW_STEPS = str(Path(__file__).parent / "slow_steps")  # its sitecustomize.py slows every step down


def _args(folder, *extra):
    return [f"--{o}" for o in TINY] + [f"--job.dump_folder={folder}", "--training.steps=100000", *extra]


def _wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _slow_steps_env(**variables):
    """The environment of a launcher whose ranks import slow_steps/sitecustomize.py (see there)."""
    return dict(os.environ, **variables,
                PYTHONPATH=os.pathsep.join([SLOW_STEPS, os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def _start(args, step_sleep_s=0.0):
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_slow_steps_env(MINITITAN_TEST_STEP_SLEEP_S=str(step_sleep_s)), start_new_session=True)


def _read_until_first_step(proc) -> str:
    out = ""
    while not re.search(r"^step +\d", out, re.M):  # the first logged step: training is under way
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the run ended before its first step:\n" + out
        out += line
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    proc = _start(_args(tmp_path, "--checkpoint.interval=100000"))
    _read_until_first_step(proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    assert ckpt.latest(tmp_path / "checkpoints") is not None


GRACE_S = 30.0  # Slurm's default KillWait and torchrun's wait: from SIGTERM to SIGKILL
STEP_S = 1.0  # each step sleeps this long: the 1000 steps between logging steps would take 17 minutes


@pytest.mark.parametrize("world", [2, 4])
def test_sigterm_through_the_launcher_saves_the_last_step_within_the_grace_time(tmp_path, world):
    """The ranks agree to stop every step (not every metrics.log_freq steps, which here take far
    longer than the grace time): the launcher exits 0 within the grace time with a checkpoint of
    the last finished step, and prints no traceback."""
    args = _args(tmp_path, "--training.local_batch_size=2", "--training.global_batch_size=0",  # the default layout
                 "--metrics.log_freq=1000", "--checkpoint.interval=1000")  # (FSDP over every rank), batch derived
    proc = _start(["--nproc", str(world)] + args, step_sleep_s=STEP_S)
    out = _read_until_first_step(proc)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # what Slurm does at the end of the grace time
        rest, _ = proc.communicate()
        pytest.fail(f"still running {GRACE_S} s after SIGTERM:\n{out + rest}")
    out += rest
    assert proc.returncode == 0 and "Traceback" not in out, out
    stopped = re.search(r"stopped by signal after step (\d+); checkpoint saved", out)
    assert stopped, out
    saved = ckpt.latest(tmp_path / "checkpoints")
    assert saved is not None and ckpt.Checkpoint(saved).step == int(stopped.group(1))  # the last finished step
    assert time.time() - start < GRACE_S


def test_kill_9_of_the_launcher_leaves_no_rank_alive(tmp_path):
    """The ranks get SIGTERM when their launcher dies (parent-death signal): they checkpoint and exit."""
    args = _args(tmp_path, "--parallelism.dp_replicate=2", "--training.local_batch_size=2", "--metrics.log_freq=1000",
                 "--checkpoint.interval=1000")
    proc = _start(["--nproc", "2"] + args, step_sleep_s=0.5)
    _read_until_first_step(proc)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2, ranks
    proc.kill()
    proc.wait()
    # how soon they go is not the point (a loaded 2-core machine is slow to save and exit): that they go
    assert _wait_for(lambda: not any(_alive(r) for r in ranks), timeout=60), "a rank outlived its launcher"
    assert ckpt.latest(tmp_path / "checkpoints") is not None  # they stopped the way a SIGTERM stops them


def test_killed_rank_ends_the_job_and_rerun_resumes(tmp_path):
    args = _args(tmp_path, "--checkpoint.interval=3", "--parallelism.dp_replicate=2", "--training.local_batch_size=4")
    proc = subprocess.Popen(CLI + ["--nproc", "2"] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / "checkpoints"
    assert _wait_for(lambda: ckpt.latest(folder) is not None and ckpt.latest(folder).name >= "step-00000006")
    workers = child_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - start < 120
    assert "rank 1 was killed by SIGKILL and the job stopped: rerun the same command" in out, out
    saved = ckpt.latest(folder)
    done = ckpt.Checkpoint(saved).step  # complete and loadable: the manifest checks every file
    rerun = subprocess.run(CLI + ["--nproc", "2"] + args[:-3] + ["--training.steps", str(done + 2),
                           "--checkpoint.interval=3", "--parallelism.dp_replicate=2", "--training.local_batch_size=4"],
                           capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {saved}" in rerun.stdout


def test_a_diverging_job_says_so_in_one_line(tmp_path):
    """Every rank stops at the same step (the guard's agreed norm); rank 0 alone prints, the launcher adds nothing."""
    r = subprocess.run(CLI + ["--nproc", "2"] + _args(tmp_path, "--training.steps=3", "--parallelism.dp_replicate=2",
                                                      "--optimizer.lr=1e25", "--optimizer.weight_decay=0",
                                                      "--training.max_norm=0", "--lr_scheduler.warmup_steps=0"),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not finite" in r.stderr, r.stderr
    assert re.search(r"step \d+: the loss or gradient norm is", r.stderr), r.stderr  # the step, named


@pytest.mark.parametrize("fail", ["1:3", "0:2"])
def test_a_rank_failing_alone_ends_the_job_with_its_one_line(tmp_path, fail):
    """A UserError of one rank (as a bad file read by it alone would raise): its line, code 2. The
    other rank, left inside a collective, adds at most one line of its own (unless the launcher ends it
    first); no traceback, no SIGABRT at exit."""
    r = subprocess.run(CLI + ["--nproc", "2"] + _args(tmp_path, "--training.steps=6", "--parallelism.dp_shard=2"),
                       capture_output=True, text=True, timeout=180, env=_slow_steps_env(MINITITAN_TEST_FAIL=fail))
    rank, step = fail.split(":")
    assert r.returncode == 2, r.stderr
    assert f"error: rank {rank} alone failed at step {step} (a test)" in r.stderr.splitlines(), r.stderr
    assert "Traceback" not in r.stderr and "SIGABRT" not in r.stderr and r.stderr.count("\n") <= 2, r.stderr


def test_a_peer_leaving_is_recognised_in_gloo_and_nccl_words():
    """The one line for a rank whose collective lost its peer: gloo's errors (the test above meets
    them) and NCCL's ncclRemoteError in the words torch's DistBackendError gives it."""
    from minititan.cli import peer_gone
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: "
                        "Connection reset by peer")
    nccl = RuntimeError("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3763, remote "
                        "process exited or there was a network error, NCCL version 2.28.8\nncclRemoteError: A call "
                        "failed possibly due to a network error or a remote process exiting prematurely.")
    assert peer_gone(gloo) and peer_gone(nccl) and not peer_gone(RuntimeError("CUDA out of memory"))
