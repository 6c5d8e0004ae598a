"""Communication trace: every collective and point-to-point call, with its group, bytes and time.

    tracer = CommTracer(group_names(mesh.groups, mesh.sizes), device)  # from here on calls are recorded
    for step in ...:
        ...                                                      # the step, unchanged
        tracer.end_step()                                        # no host sync
    print(tracer.table())                                        # per step: group, op, calls, bytes, time
    tracer.close()                                               # torch.distributed as it was

While a tracer is open, the torch.distributed functions below are replaced by thin wrappers that
note the call and pass it on. The collectives files bind some of them to module-level aliases
at import (`_all_gather = dist.all_gather_single`), so the tracer replaces every reference to an
original function it finds in torch.distributed and in the loaded modules of the calling package,
and puts each back on close.

What a record holds:
  op      all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, barrier, send, recv,
          batch_isend_irecv (one record for the whole batch)
  group   the name the caller gave the process group ("world" for the default group)
  bytes   the size of the tensor the collective is about: the buffer all-reduced or broadcast,
          the whole gathered output of an all-gather, the whole input of a reduce-scatter or
          all-to-all, the tensor sent or received (a batch: all of them). Not wire bytes: a ring
          all-reduce of B bytes over n ranks sends 2 (n-1)/n B from every rank.
  time    synchronous call: from launch until the caller may use the result.
          async_op=True: from launch until the caller's work.wait(), so it includes whatever ran
          in between (the overlap): it is when the result was needed, not how long NCCL took.
On CUDA the times come from CUDA events recorded on the current stream around the call (and at
wait()); they are read only once they have completed (`event.query()`), so the trace adds no host
synchronisation to a step. On the CPU (gloo) they are wall-clock times.

Calls made while torch.compile traces a graph are not recorded (the wrapper steps aside).
Only torch and the stdlib are needed, so this file can be copied on its own.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

# torch.distributed name -> (the op it is recorded as, position of the tensor whose size is counted)
TRACED = {
    "all_reduce": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "all_gather_into_tensor": ("all_gather", 0),  # (output, input): the gathered output
    "all_gather_single": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),  # (output, input): the input being reduced
    "reduce_scatter_single": ("reduce_scatter", 1),
    "all_to_all_single": ("all_to_all", 1),
    "send": ("send", 0),
    "recv": ("recv", 0),
    "isend": ("send", 0),
    "irecv": ("recv", 0),
    "barrier": ("barrier", None),
}


@dataclasses.dataclass
class Record:
    step: int
    op: str
    group: str
    bytes: int
    dtype: str
    start: object  # float (perf_counter) or torch.cuda.Event
    end: object = None  # set when the result is ready for the caller; None until an async op is waited for
    seconds: float | None = None  # filled in once start and end are both known and complete

    def as_dict(self) -> dict:
        return {"step": self.step, "op": self.op, "group": self.group, "bytes": self.bytes, "dtype": self.dtype,
                "seconds": self.seconds}


def group_names(groups_by_dims: Mapping[tuple[str, ...], dist.ProcessGroup],
                sizes: Mapping[str, int]) -> dict[dist.ProcessGroup, str]:
    """Name each group by the mesh dims it spans, leaving out dims of size 1: a mesh's
    {("dp_replicate", "cp"): group} with cp = 1 names that group "dp_replicate". Names that are
    not mesh dims (a group kept under ("ep",)) are kept as they are."""
    return {group: "+".join(d for d in dims if sizes.get(d) != 1) or "single rank"
            for dims, group in groups_by_dims.items()}


class CommTracer:
    """Records the torch.distributed calls made between construction and close()."""

    def __init__(self, group_names: Mapping[dist.ProcessGroup, str], device: torch.device | str = "cpu",
                 packages: tuple[str, ...] | None = None):
        self.group_names = dict(group_names)
        self.on_cuda = torch.device(device).type == "cuda"
        self.step = 0  # steps closed by end_step()
        self.current: list[Record] = []  # this step's calls (appended from any thread, e.g. autograd's)
        self.last_step: list[Record] = []  # the previous step's calls, for a close look
        self.pending: list[Record] = []  # calls whose time is not known yet
        self.totals: dict[tuple[str, str, str], list] = {}  # (group, op, dtype) -> [calls, bytes, seconds, timed]
        self._undo: list[tuple[object, str, object]] = []
        self._patch(packages or (__name__.split(".")[0],))

    # ------------------------------------------------------------ the step

    def end_step(self) -> None:
        """Close the step: its calls move to the totals. Times that are not ready yet stay pending."""
        self.step += 1
        self.last_step, self.current = self.current, []
        self.pending += self.last_step
        self._resolve(wait=False)

    def close(self) -> None:
        """Wait for the outstanding times and give torch.distributed its functions back."""
        if self.current:
            self.end_step()
        self._resolve(wait=True)
        for module, attr, original in reversed(self._undo):
            setattr(module, attr, original)
        self._undo.clear()

    # ------------------------------------------------------------ reports

    def summary(self) -> list[dict]:
        """Per traced step: for each (group, op, dtype) the calls, bytes and seconds (mean over steps)."""
        steps = max(1, self.step)
        rows = []
        for (group, op, dtype), (calls, nbytes, seconds, timed) in sorted(self.totals.items()):
            rows.append({"group": group, "op": op, "dtype": dtype, "calls": calls / steps, "bytes": nbytes / steps,
                         "seconds": seconds / steps if timed else None})
        return rows

    def table(self) -> str:
        rows = self.summary()
        lines = [f"communication per step (mean over {self.step} steps; async ops count launch to wait)",
                 f"{'group':<24}{'op':<18}{'dtype':<10}{'calls':>8}{'MiB':>12}{'ms':>10}"]
        if not rows:
            lines.append("(no collectives: a single rank)")
        for r in rows:
            ms = f"{r['seconds'] * 1e3:10.3f}" if r["seconds"] is not None else f"{'n/a':>10}"
            lines.append(f"{r['group']:<24}{r['op']:<18}{r['dtype']:<10}{r['calls']:8.1f}"
                         f"{r['bytes'] / 2**20:12.3f}{ms}")
        by_group: dict[str, list[float]] = {}
        for r in rows:
            total = by_group.setdefault(r["group"], [0.0, 0.0])
            total[0] += r["bytes"]
            total[1] += r["seconds"] or 0.0
        for group, (nbytes, seconds) in by_group.items():
            lines.append(f"{'total ' + group:<60}{nbytes / 2**20:12.3f}{seconds * 1e3:10.3f}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> None:
        """The per-step summary and every call of the last step, as JSON (one file per rank)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"steps": self.step, "per_step": self.summary(),
                                          "last_step": [r.as_dict() for r in self.last_step]}, indent=1))

    # ------------------------------------------------------------ recording

    def _now(self):
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _name(self, group) -> str:
        if group is None or group is dist.GroupMember.WORLD:
            return "world"
        name = self.group_names.get(group)
        return name if name is not None else f"unnamed group of {dist.get_world_size(group)}"

    def _record(self, op: str, group, nbytes: int, dtype) -> Record:
        record = Record(self.step + 1, op, self._name(group), nbytes, str(dtype).removeprefix("torch."), self._now())
        self.current.append(record)
        return record

    def _finish(self, record: Record, result, is_async: bool):
        """A synchronous call is done when it returns; an async one when the caller waits for it."""
        if not is_async:
            record.end = self._now()
            return result
        if isinstance(result, list):
            return [_TracedWork(w, self, record) for w in result]
        return _TracedWork(result, self, record) if result is not None else result

    def _resolve(self, wait: bool) -> None:
        if wait and self.on_cuda:
            torch.cuda.synchronize()  # only at close
        still = []
        for r in self.pending:
            if r.end is None and not wait and r.step >= self.step:
                still.append(r)  # an async op the caller has not waited for yet
                continue
            if r.end is not None and self.on_cuda:
                if not (r.start.query() and r.end.query()):
                    still.append(r)
                    continue
                r.seconds = r.start.elapsed_time(r.end) / 1e3
            elif r.end is not None:
                r.seconds = r.end - r.start
            total = self.totals.setdefault((r.group, r.op, r.dtype), [0, 0, 0.0, 0])
            total[0] += 1
            total[1] += r.bytes
            if r.seconds is not None:
                total[2] += r.seconds
                total[3] += 1
        self.pending = still

    # ------------------------------------------------------------ patching torch.distributed

    def _patch(self, packages: tuple[str, ...]) -> None:
        replacements = {}
        for name, (op, position) in TRACED.items():
            original = getattr(dist, name, None)
            if original is not None:
                replacements[id(original)] = self._wrap(original, op, position)
        replacements[id(dist.batch_isend_irecv)] = self._wrap_batch(dist.batch_isend_irecv)
        replacements[id(dist.P2POp)] = _p2p_op_class()
        modules = [dist] + [m for name, m in list(sys.modules.items())
                            if m is not None and any(name == p or name.startswith(p + ".") for p in packages)]
        for module in modules:
            for attr, value in list(vars(module).items()):
                if id(value) in replacements:
                    self._undo.append((module, attr, value))
                    setattr(module, attr, replacements[id(value)])

    def _wrap(self, original: Callable, op: str, position: int | None) -> Callable:
        params = list(inspect.signature(original).parameters)
        always_async = original.__name__ in ("isend", "irecv")

        def traced(*args, **kwargs):
            if torch.compiler.is_compiling():
                return original(*args, **kwargs)
            arguments = dict(zip(params, args)) | kwargs
            tensor = arguments.get(params[position]) if position is not None else None
            nbytes = tensor.numel() * tensor.element_size() if isinstance(tensor, Tensor) else 0
            record = self._record(op, arguments.get("group"), nbytes, tensor.dtype if tensor is not None else "-")
            result = original(*args, **kwargs)
            return self._finish(record, result, always_async or bool(arguments.get("async_op", False)))

        traced.__name__ = original.__name__
        traced.traced_original = original
        return traced

    def _wrap_batch(self, original: Callable) -> Callable:
        def traced(p2p_op_list, *args, **kwargs):
            if torch.compiler.is_compiling() or not p2p_op_list:
                return original(p2p_op_list, *args, **kwargs)
            nbytes = sum(p.tensor.numel() * p.tensor.element_size() for p in p2p_op_list)
            record = self._record("batch_isend_irecv", p2p_op_list[0].group, nbytes, p2p_op_list[0].tensor.dtype)
            return self._finish(record, original(p2p_op_list, *args, **kwargs), is_async=True)

        traced.__name__ = original.__name__
        return traced


class _TracedWork:
    """The Work of an async call: wait() also marks when the caller got the result."""

    def __init__(self, work, tracer: CommTracer, record: Record):
        self._work, self._tracer, self._record = work, tracer, record

    def wait(self, *args, **kwargs):
        out = self._work.wait(*args, **kwargs)
        if not torch.compiler.is_compiling():
            self._record.end = self._tracer._now()  # the last wait of a batch wins
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


def _p2p_op_class() -> type:
    """P2POp insists on the real isend / irecv (batch_isend_irecv compares them by identity), so
    while tracing P2POp(dist.isend, ...) is handed the traced wrapper and swaps the original back."""

    def unwrap(op):
        return getattr(op, "traced_original", op)

    class TracedP2POp(dist.P2POp):
        def __new__(cls, op, *args, **kwargs):
            return super().__new__(cls, unwrap(op), *args, **kwargs)

        def __init__(self, op, *args, **kwargs):
            super().__init__(unwrap(op), *args, **kwargs)

    return TracedP2POp
