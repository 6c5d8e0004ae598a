"""benchmarks/bench.py runs each training in its own session (so that it and its workers stop
together); a SIGTERM to the script (an outer `timeout`, as the GPU scripts use) must stop that
run too, or it keeps the GPU through the next run (it did: a Float8 row ran out of memory beside
such an orphan)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minititan.core.preemption import child_pids

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_a_sigterm_to_the_bench_script_stops_its_run(tmp_path):
    marker = tmp_path / "alive"
    run = f"import time; open({str(marker)!r}, 'w').close(); time.sleep(60)"  # stands for a training run
    script = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import bench; from pathlib import Path; "
              f"bench._run_logged([sys.executable, '-c', {run!r}], Path({str(tmp_path / 'run.log')!r}), 120)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the run never started"
    children = child_pids(parent.pid)
    assert children, "no run under the script"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=40) != 0
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "the run outlived the script"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return state not in ("Z", "X")  # a zombie has exited
