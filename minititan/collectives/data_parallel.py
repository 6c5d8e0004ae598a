"""Plain data parallel: every rank holds all parameters; gradients are summed across ranks.

Gradients are packed into buckets of about `bucket_mb` in the order backward produces them
(reverse of the forward), and each bucket's all-reduce starts as soon as its last gradient is
ready, so on NCCL the communication of late layers overlaps the backward of early ones. Only the
last micro-batch of a step communicates; earlier ones just accumulate locally.

Sum, not mean: the trainer already divides the loss by the global token count. Only torch is
needed, so this file can be copied on its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class GradAllReducer:
    """Hooks on each parameter that all-reduce gradients in buckets during the backward. They are
    post-accumulate-grad hooks: autograd runs them once it has added a backward's gradient into
    p.grad, and so must any code that writes p.grad in autograd's place."""

    def __init__(self, params: dict[str, Tensor], group: dist.ProcessGroup, reduce_dtype: torch.dtype,
                 bucket_mb: float = 25.0):
        self.group = group
        self.reduce_dtype = reduce_dtype
        self.enabled = False  # True for the backward of the last micro-batch of a step
        self.buckets = _make_buckets(list(params.values())[::-1], int(bucket_mb * 2**20))
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._ready = [0] * len(self.buckets)
        self._pending: list[tuple[dist.Work, Tensor, list[Tensor]]] = []
        for p in params.values():
            p.register_post_accumulate_grad_hook(self._on_grad)

    def reduce_next_backward(self) -> None:
        """All-reduce during the coming backward (the step's last micro-batch); earlier ones only accumulate."""
        self.enabled = True

    def _on_grad(self, p: Tensor) -> None:
        if not self.enabled:
            return
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._launch(i)

    def _launch(self, i: int) -> None:
        params = self.buckets[i]
        flat = torch.cat([p.grad.reshape(-1).to(self.reduce_dtype) for p in params])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self._pending.append((work, flat, params))

    def finish(self) -> None:
        """Wait for every bucket (launching any whose hooks did not fire) and write the sums back."""
        for i, bucket in enumerate(self.buckets):
            if self._ready[i] != len(bucket) and any(p.grad is not None for p in bucket):
                for p in bucket:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._launch(i)
        for work, flat, params in self._pending:
            work.wait()
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self._pending.clear()
        self._ready = [0] * len(self.buckets)
        self.enabled = False


def _make_buckets(params: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    buckets, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * 4
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets
