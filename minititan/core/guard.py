"""The step guard: what every rank must agree on after each step, carried by the one all-reduce
the step makes anyway, and read by the host without waiting for the device.

Clipping needs the gradient norm over all ranks, so every step already sums each rank's squared
norm with one all-reduce. Two more facts ride in it:

  * Is the step finite? A non-finite loss makes the gradients, and so their global norm,
    non-finite; the rank's loss share is folded in as `loss * 0` (0, unless the loss is inf or NaN)
    for the rare loss that overflows while its gradients do not. The norm is the same number on
    every rank, so `skip = norm is not finite` is too, and the optimizer drops such an update on
    the device (AdamW.step's skip flag): the parameters never become non-finite, whatever the host
    knows yet.
  * Was any rank asked to stop (preemption.StopRequest: SIGTERM, Ctrl-C)? A second element, 0 or 1.

The host reads both one step late. After the all-reduce the two numbers (the squared norm and the
votes) are copied, non-blocking, into a pinned host buffer; the loop reads step k's buffer once it
has queued step k+1, by when the device has finished step k (the wait is on an event of step k,
so the host stays at most one step ahead and the device never runs dry). Where the host waits for
the device anyway (logging steps, saves) it reads the current step. Every rank reads the same
numbers at the same step, so all ranks decide alike: skip and count, stop with an error once more
than training.skip_nonfinite_steps steps were not finite, or stop to checkpoint.

Before a save, `nonfinite_tensors` checks what is about to be written (a host sync there is fine),
so nothing non-finite is ever saved even if it came from somewhere the norm does not see.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from minititan.core.checkpoint import gather_objects
from minititan.core.config import AgreedError
from minititan.core.metrics import say


class StepGuard:
    def __init__(self, device: torch.device, skip_budget: int, stop_requested: Callable[[], bool],
                 diverged_advice: Callable[[], str], rank: int = 0):
        self.skip_budget = skip_budget
        self.stop_requested = stop_requested
        self.diverged_advice = diverged_advice  # what the error says is kept and how to go on
        self.rank = rank
        self.skipped: list[int] = []  # steps whose update was dropped
        on_cuda = device.type == "cuda"
        # two host buffers: step k+1's copy is queued while step k's is still to be read
        self._buffers = [torch.zeros(2, pin_memory=on_cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if on_cuda else None for _ in range(2)]
        self._pending: list[tuple[int, int]] = []  # (step, buffer index), oldest first
        self._flags = {flag: torch.tensor(float(flag), device=device) for flag in (False, True)}

    def reduce(self, step: int, sq_norm: torch.Tensor, loss_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum this rank's squared gradient norm and stop request over all ranks (one all-reduce);
        returns the global gradient norm and the skip flag (1.0 where it is not finite), both on the device."""
        both = torch.stack([sq_norm.float() + loss_share.float() * 0, self._flags[self.stop_requested()]])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(both)
        norm = both[0].sqrt()
        skip = (~torch.isfinite(norm)).float()
        i = step % 2
        self._buffers[i].copy_(both, non_blocking=True)  # the host takes the square root itself
        if self._events[i] is not None:
            self._events[i].record()
        self._pending.append((step, i))
        return norm, skip

    def settle(self, upto: int) -> bool:
        """Act on every step up to `upto` not read yet: count and report skipped steps, raise once
        more than skip_budget were skipped. Returns whether the ranks agreed to stop."""
        stop = False
        while self._pending and self._pending[0][0] <= upto:
            step, i = self._pending.pop(0)
            if self._events[i] is not None:
                self._events[i].synchronize()
            sq_norm, stop_votes = self._buffers[i].tolist()
            if not math.isfinite(sq_norm):
                self._skipped(step, math.sqrt(sq_norm))
            stop |= stop_votes > 0
        return stop

    def _skipped(self, step: int, norm: float) -> None:
        self.skipped.append(step)
        if len(self.skipped) > self.skip_budget:
            allowed = (f"more than training.skip_nonfinite_steps = {self.skip_budget} were not finite; skipped so "
                       f"far: {self.skipped[:-1]}" if self.skip_budget else "training.skip_nonfinite_steps = 0")
            raise AgreedError(f"step {step}: the loss or gradient norm is {norm} (not finite); its update was not "
                            f"applied and training stopped ({allowed}). {self.diverged_advice()}")
        say(f"step {step}: the loss or gradient norm is {norm} (not finite): update skipped "
            f"({len(self.skipped)} of training.skip_nonfinite_steps = {self.skip_budget})", self.rank)


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding an inf or NaN, over all ranks (every rank gets the same list).
    One foreach max-norm over this rank's tensors and one host read: for saves, not per step."""
    names = [n for n, t in tensors.items() if t.numel()]
    bad = []
    if names:
        norms = torch._foreach_norm([tensors[n].detach() for n in names], math.inf)
        finite = torch.isfinite(torch.stack([x.float() for x in norms])).tolist()
        bad = [n for n, ok in zip(names, finite) if not ok]
    return sorted({n for names in gather_objects(bad) for n in names})
