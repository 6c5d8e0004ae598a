"""Peak memory of a step, measured: the live bytes of every tensor storage, as they come and go.

Every op of a dry run passes through `on_op` with its outputs. A storage not seen before is
counted (its bytes rounded up to the CUDA caching allocator's 512-byte blocks) under the
category it is born into, and a weak reference on it takes its bytes off again when the last
tensor using it dies: Python frees it then (reference counting), exactly where the caching
allocator would get the block back on a GPU. So `peak` is the most bytes alive at once, what
`torch.cuda.max_memory_allocated` reports for the same code, without anything allocated.

Categories, for the breakdown at the peak:
  fp32 masters        the layout's params (full tensors, slices, FSDP shards)
  optimizer moments   AdamW's exp_avg and exp_avg_sq
  gradients           the params' .grad (counted from the params when the peak is read)
  gathered weights    FSDP's all-gathered units and the low-precision copies of weights
  communication       other buffers a collective reads or writes (reduce-scatter inputs, buckets, P2P)
  activations         born in a forward and still alive: mostly what autograd keeps for backward
  transient           born in a backward or the optimizer step (input gradients, recompute, ...)
  other               anything else held since setup (RoPE tables, fp8 scales, ...)
"""
from __future__ import annotations

import weakref

import torch

BLOCK = 512  # the caching allocator rounds every allocation up to this
CATEGORIES = ("fp32 masters", "optimizer moments", "gradients", "gathered weights", "communication",
              "activations", "transient", "other")


class MemoryTracker:
    """Live bytes by category and their peak; `on_op` is called with every op's outputs."""

    def __init__(self, block: int = BLOCK):
        self.block = block  # allocations are rounded up to this (1: count exact bytes, as a CPU run)
        self.live = 0
        self.peak = 0
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.at_peak: dict[str, int] = dict(self.by_category)
        self.category_now = "other"  # what storages born now are: set by the dry run's phases
        self._storages: dict[int, tuple[weakref.ref, int, str]] = {}  # id(storage) -> (ref, bytes, category)
        self._grads = lambda: []  # tensors to count as gradients at the peak
        self._snapshot_at = 0

    # ------------------------------------------------------------ counting

    def on_op(self, outputs) -> None:
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self.track(t, self.category_now)

    def track(self, t: torch.Tensor, category: str) -> None:
        """Count t's storage if it is new (under `category`)."""
        st = t.untyped_storage()
        key = id(st)
        if key in self._storages:
            return
        nbytes = -(-st.nbytes() // self.block) * self.block
        self._storages[key] = (weakref.ref(st, lambda _, key=key: self._free(key)), nbytes, category)
        self.live += nbytes
        self.by_category[category] += nbytes
        if self.live > self.peak:
            self.peak = self.live
            if self.peak > self._snapshot_at * 1.002:  # the breakdown is re-read on every 0.2% of growth
                self._snapshot()

    def _free(self, key: int) -> None:
        _, nbytes, category = self._storages.pop(key)
        self.live -= nbytes
        self.by_category[category] -= nbytes

    def relabel(self, t: torch.Tensor, category: str) -> None:
        """Count t's storage under another category from now on."""
        key = id(t.untyped_storage())
        if key not in self._storages:
            return self.track(t, category)
        ref, nbytes, old = self._storages[key]
        if old != category:
            self._storages[key] = (ref, nbytes, category)
            self.by_category[old] -= nbytes
            self.by_category[category] += nbytes

    def category_of(self, t: torch.Tensor) -> str | None:
        entry = self._storages.get(id(t.untyped_storage()))
        return entry[2] if entry else None

    # ------------------------------------------------------------ the peak

    def count_grads(self, grads) -> None:
        """`grads()` lists the tensors to count as gradients when the breakdown is read."""
        self._grads = grads

    def _snapshot(self) -> None:
        self._snapshot_at = self.peak
        at = dict(self.by_category)
        seen = set()
        for g in self._grads():
            st = g.untyped_storage()
            entry = self._storages.get(id(st))
            if entry is None or id(st) in seen:
                continue
            seen.add(id(st))
            at[entry[2]] -= entry[1]
            at["gradients"] += entry[1]
        self.at_peak = at

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now (after setup: the step's peak)."""
        self.peak = self.live
        self._snapshot_at = 0
        self._snapshot()
