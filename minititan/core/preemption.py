"""Preemption: a SIGTERM ends a run with a checkpoint of its last finished step, and no rank
outlives its launcher.

Slurm preempts a job by sending SIGTERM and, a grace time later, SIGKILL; torchrun and
`minititan train --nproc` pass a SIGTERM on to the ranks. A rank's SIGTERM (or Ctrl-C's SIGINT)
handler only records the request (`StopRequest`); the ranks agree on it every step through the
step guard's all-reduce (core/guard.py), finish the step, save and exit 0.

The `--nproc` launcher (torch's elastic agent, run in-process by cli.launch) would answer a
SIGTERM by raising inside the agent: a traceback, exit code 1, and SIGKILL for ranks still saving
after 30 s. Instead it leaves SIGTERM and SIGINT to `forward_to_ranks`, which passes the signal on
and lets the agent see the ranks finish normally: exit code 0 when they saved. A second signal
kills the ranks without a checkpoint.

A rank started by a launcher asks Linux to send it SIGTERM when the launcher dies
(`die_with_launcher`: prctl's parent-death signal), so a `kill -9` of the launcher stops the ranks
the same way, with a checkpoint; a rank still alive ORPHAN_GRACE_S after that exits hard.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

ORPHAN_GRACE_S = 30.0  # as long as torchrun waits for its ranks after forwarding a SIGTERM
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_launcher_pid: int | None = None  # the parent this rank watches, once die_with_launcher ran


class StopRequest:
    """Records SIGTERM / SIGINT; the training loop polls it at its own pace. A second Ctrl-C
    interrupts at once (no checkpoint)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        if not self.requested and _launcher_pid is not None and os.getppid() != _launcher_pid:
            _exit_after(ORPHAN_GRACE_S, "the launcher is gone")
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def die_with_launcher() -> None:
    """Ask Linux for a SIGTERM when this process's parent (the launcher) dies. A no-op off Linux."""
    global _launcher_pid
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    _launcher_pid = parent
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_after(seconds: float, why: str) -> None:
    def leave():
        print(f"rank {os.environ.get('RANK', '?')}: {why} and the stop did not finish within {seconds:.0f} s: "
              f"exiting without a checkpoint", file=sys.stderr, flush=True)
        os._exit(1)
    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


# ---------------------------------------------------------------- the launcher's side


def forward_to_ranks() -> None:
    """In the `--nproc` launcher: pass SIGTERM / SIGINT on to the ranks (its child processes), which
    checkpoint and exit; on a second signal kill them."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        first = len(received) == 1
        print(f"minititan: {signal.Signals(signum).name}: " +
              ("the ranks finish their step, save a checkpoint and exit (signal again to kill them without one)"
               if first else "killing the ranks without a checkpoint"), file=sys.stderr, flush=True)
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, signum if first else signal.SIGKILL)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
