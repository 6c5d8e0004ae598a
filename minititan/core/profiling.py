"""Profiling: a torch.profiler trace of chosen steps, and CUDA memory snapshots.

    profiler = StepProfiler(cfg.profiling, cfg.job.dump_folder, rank, device, cfg.training.steps)
    for step in ...:
        profiler.step_begin(step)
        ...                                  # the step
        profiler.step_end(step)

Trace ([profiling] enable): the profiler records steps start_step .. start_step + steps - 1 and
nothing else; each rank writes <folder>/rank{R}_steps{A}-{B}.json, a Chrome trace that Perfetto
(ui.perfetto.dev) or chrome://tracing opens. Each step is a range named ProfilerStep#{step}, the
name that trace tools (Holistic Trace Analysis, TensorBoard) look for.

Memory snapshot ([profiling] memory_snapshot, CUDA only): the caching allocator records every
allocation with its Python stack from the start of training. Whenever a step ends with a higher
peak of allocated memory than any step before it, <folder>/memory_snapshot_rank{R}.pickle is
(re)written, so at the end it shows the peak step; on an out-of-memory error the allocator writes
<folder>/memory_snapshot_oom_rank{R}.pickle before the error is raised. Drop either file on
pytorch.org/memory_viz. Reading the peak is a host-side counter: no device synchronisation.

Both are off by default; off, step_begin / step_end return at once.
"""
from __future__ import annotations

from pathlib import Path

import torch

from minititan.core.config import Profiling
from minititan.core.metrics import say

HISTORY_ENTRIES = 100_000  # allocation events the snapshot keeps (the newest)


class StepProfiler:
    def __init__(self, cfg: Profiling, dump_folder: str, rank: int, device: torch.device, last_step: int):
        self.rank, self.device = rank, device
        self.folder = Path(dump_folder) / cfg.folder
        self.first, self.last = cfg.start_step, min(cfg.start_step + cfg.steps - 1, last_step)
        self.trace = cfg.enable
        self.memory = cfg.memory_snapshot and device.type == "cuda"
        self.profiler = None
        self.step_range = None
        self.peak = 0
        if cfg.memory_snapshot and not self.memory:
            say("profiling.memory_snapshot records the CUDA caching allocator: nothing to record on the CPU", rank)
        if self.memory:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
            torch._C._cuda_attach_out_of_memory_observer(self._on_out_of_memory)

    def step_begin(self, step: int) -> None:
        if self.trace and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        if self.profiler is None:
            return
        self.step_range = torch.profiler.record_function(f"ProfilerStep#{step}")
        self.step_range.__enter__()

    def step_end(self, step: int) -> None:
        if self.profiler is not None:
            self.step_range.__exit__(None, None, None)
            if step == self.last:
                self.profiler.stop()
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"rank{self.rank}_steps{self.first}-{self.last}.json"
                self.profiler.export_chrome_trace(str(path))
                self.profiler = None
                say(f"profiler trace of steps {self.first}-{self.last} written to {path} (one per rank)", self.rank)
        if self.memory:
            peak = torch.cuda.max_memory_allocated(self.device)
            if peak > self.peak:
                self.peak = peak
                torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_snapshot_rank{self.rank}.pickle"))

    @property
    def oom_snapshot_path(self) -> Path:
        return self.folder / f"memory_snapshot_oom_rank{self.rank}.pickle"

    def _on_out_of_memory(self, device, alloc, device_alloc, device_free) -> None:
        torch.cuda.memory._dump_snapshot(str(self.oom_snapshot_path))
