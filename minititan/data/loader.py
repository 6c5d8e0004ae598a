"""Batches prepared ahead on a background thread, so reading tokens never shows in the step time.

    loader = Prefetcher(lambda step: data.read(...), first_step=start + 1, last_step=steps, depth=2, pin=True)
    batch = loader.get(step)   # this step's batch, read while earlier steps trained

The thread runs the read function for the next `depth` steps in order (reading is numpy slicing of
memory-mapped shards, which releases the GIL for the copies) and, for a CUDA run, copies each batch
into pinned (page-locked) host memory, so that the training loop's `.to(device, non_blocking=True)`
is an asynchronous DMA that overlaps the previous step's kernels. The batch of a step is a pure
function of the step, so the thread keeps no state that a checkpoint would need: a resumed run
starts a new prefetcher at its first step. An error in the thread (a bad token id) reaches the
training loop at the step it concerns.

In a profiler trace what the training loop waits for shows as "data.wait" ranges. The reading
itself is a "data.read" range only with depth 0 (in the loop): torch's profiler records the thread
that started it, not this one. `summary()` gives both per step.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch


class Prefetcher:
    def __init__(self, read: Callable[[int], tuple], first_step: int, last_step: int, depth: int, pin: bool):
        self.read, self.pin, self.next_step = read, pin, first_step
        self.depth = depth
        self.read_s, self.wait_s, self.steps = 0.0, 0.0, 0  # reading (thread), waiting after the first step (loop)
        if depth == 0:
            return
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(first_step, last_step), daemon=True,
                                       name="minititan-prefetch")
        self.thread.start()

    def prepare(self, step: int):
        start = time.perf_counter()
        with torch.profiler.record_function("data.read"):
            batch = self.read(step)
            if self.pin:
                batch = type(batch)(*(None if t is None else t.pin_memory() for t in batch))
        self.read_s += time.perf_counter() - start
        return batch

    def run(self, first: int, last: int) -> None:
        for step in range(first, last + 1):
            try:
                item = (step, self.prepare(step), None)
            except BaseException as e:  # handed to the training loop, raised there
                item = (step, None, e)
            while not self.stopped.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stopped.is_set() or item[2] is not None:
                return

    def get(self, step: int):
        """The batch of `step`; steps are asked for in order."""
        start = time.perf_counter()
        self.steps += 1
        with torch.profiler.record_function("data.wait"):
            if self.depth == 0:
                batch, error = self.prepare(step), None
            else:
                assert step == self.next_step, f"prefetcher asked for step {step}, expected {self.next_step}"
                _, batch, error = self.queue.get()
                self.next_step += 1
        if self.steps > 1:  # nothing can be read ahead of the first step
            self.wait_s += time.perf_counter() - start
        if error is not None:
            raise error
        return batch

    def summary(self) -> str:
        where = "on the prefetch thread" if self.depth else "in the step (data.prefetch = 0)"
        return (f"reading a batch took {1e3 * self.read_s / max(self.steps, 1):.2f} ms per step {where}; after the "
                f"first step, the loop waited {1e3 * self.wait_s / max(self.steps - 1, 1):.2f} ms per step for it")

    def close(self) -> None:
        if self.depth:
            self.stopped.set()
            self.thread.join(timeout=5)


def to_device(batch, device: torch.device):
    """Every tensor of a batch on the device, copied asynchronously (from pinned memory on CUDA)."""
    return type(batch)(*(None if t is None else t.to(device, non_blocking=True) for t in batch))
