"""A dry run: one rank of an N-rank job runs its real setup and one real training step, on fake
tensors and a fake process group (plan/fake.py), while its memory (plan/memory.py) and its ops
and collectives (plan/trace.py) are recorded.

    run = dry_run(cfg, world_size=512, rank=0)
    run.peak_bytes, run.at_peak, run.trace

This is the one place that knows how the trainer sets a rank up and steps it (the layout, the
optimizer, `train.train_step`), so it is what follows the trainer when that moves.

What differs from a real run, and why:
  * torch.compile cannot run without a device: with compile.enable, plan/compiled.py stands in
    for it (the graphs and saved tensors compile makes, run op by op), and the time model
    (plan/timing.py) counts the element-wise work as fused.
  * the data is synthetic: values do not change shapes.
  * the optimizer update is the fused kernel's (the compiled one holds the same memory).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import sys

import torch
from torch._C._distributed_c10d import FakeWork
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minititan.collectives import expert_parallel
from minititan.collectives.mesh import DIMS, Mesh
from minititan.core.config import Config
from minititan.core.data import TokenSource, rank_slice
from minititan.core.guard import StepGuard
from minititan.core.optim import AdamW
from minititan.layout import parallelize
from minititan.plan.compiled import run_as_c10d, stand_in_for_compile
from minititan.plan.fake import DEVICE_QUERY, device_query, fake_tensors, fake_world, tensors_of
from minititan.plan.memory import MemoryTracker
from minititan.plan.trace import StepTrace

DEVICE = torch.device("cuda", 0)  # what the layout is told; the tensors are fake CPU ones posing as CUDA


@dataclasses.dataclass
class RankRun:
    """What one rank's dry run measured."""
    rank: int
    mesh_sizes: dict[str, int]
    coords: dict[str, int]
    peak_bytes: int  # the step's peak of live bytes
    start_bytes: int  # live bytes when the step starts (params, optimizer moments, anything the layout keeps)
    setup_peak_bytes: int  # the peak while the layout was built (init fills one unit at a time)
    at_peak: dict[str, int]  # bytes by category at the step's peak
    state_bytes: dict[str, int]  # fp32 masters, gradients, optimizer moments after the step's backward
    n_micro: int  # optimizer micro-batches per step
    events: list[tuple]  # the step's ops and collectives (plan/trace.py)
    eager_under_compile: list[str]  # functions the compile stand-in could not trace (they ran eagerly)


def dry_run(cfg: Config, world_size: int, rank: int, capability: tuple[int, int] | None = (9, 0)) -> RankRun:
    """Build rank `rank`'s layout of a `world_size`-rank job and run one training step, faked, as
    on a GPU of this compute capability (None: as on the CPU, whose code paths differ in places)."""
    from minititan import train  # the trainer imports the layout code; imported here, as late as it can be
    device = DEVICE if capability is not None else torch.device("cpu")
    memory, trace = MemoryTracker(block=512 if capability is not None else 1), StepTrace()
    recorder = Recorder(memory, trace)
    fallbacks: list[str] = []
    compile_stand_in = (stand_in_for_compile(recorder.paused, recorder.in_graph, fallbacks) if cfg.compile.enable
                        else contextlib.nullcontext())
    with fake_world(world_size, rank), _fresh_caches(), fake_tensors(capability) as gpu, recorder, \
            _waits_recorded(trace), compile_stand_in, _quiet():
        gpu.topk_experts = cfg.model.n_experts if cfg.model.name == "moe" else None
        mesh = Mesh(parallelize.mesh_sizes(cfg, world_size), rank)
        layout = parallelize.build(cfg, mesh, device)
        optimizer = AdamW(layout.params, cfg.optimizer)
        for p in layout.params.values():
            memory.relabel(p, "fp32 masters")
        for t in itertools.chain(optimizer.exp_avg.values(), optimizer.exp_avg_sq.values()):
            memory.relabel(t, "optimizer moments")
        memory.count_grads(lambda: [p.grad for p in layout.params.values() if p.grad is not None])
        trace.name_groups(group_names(cfg, mesh))
        n_micro = layout.facts.n_micro
        setup_peak, start = memory.peak, memory.live
        memory.reset_peak()
        trace.start()
        recorder.stepping = True
        state = {}

        def gradients_complete():  # the last of finish_grads: what follows is the "step" phase
            trace.phase = "step"
            state.update(count_state(layout, optimizer))

        layout.finish_grads.append(gradients_complete)
        t = cfg.training
        batch = TokenSource("synthetic", cfg.model.vocab_size).read(
            t.seed, 1, t.global_batch_size, t.seq_len, rows=rank_slice(layout.facts.data_rank, layout.facts.data_size,
                                                                       t.global_batch_size),
            documents=cfg.data.document_masking)
        # the guard's host buffers and CUDA events are outside the step's memory: a CPU one (its one
        # all-reduce of the norm and the stop flag is the same)
        guard = StepGuard(torch.device("cpu"), t.skip_nonfinite_steps, lambda: False, str, rank)
        train.train_step(cfg, layout, optimizer, batch, 1, n_micro, device, guard)
        return RankRun(rank, dict(mesh.sizes), dict(mesh.coords), memory.peak, start, setup_peak, dict(memory.at_peak),
                       state, n_micro, trace.events, sorted(set(fallbacks)))


def count_state(layout, optimizer: AdamW) -> dict[str, int]:
    """Bytes of the params, their grads and the optimizer moments this rank holds."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return {"fp32 masters": size(layout.params.values()),
            "gradients": size(p.grad for p in layout.params.values()),
            "optimizer moments": size(itertools.chain(optimizer.exp_avg.values(), optimizer.exp_avg_sq.values()))}


def group_names(cfg: Config, mesh: Mesh) -> dict[tuple[int, ...], str]:
    """The ranks of each group this rank may talk to -> the mesh dims (or ep group) it spans."""
    names: dict[tuple[int, ...], str] = {}
    spread = [d for d in DIMS if mesh.sizes[d] > 1]  # a dim of size 1 adds no rank to a group, nor to its name
    for n in range(len(spread), 0, -1):  # wider combinations first, so the narrowest name wins a tie
        for dims in itertools.combinations(spread, n):
            names[tuple(mesh.ranks(*dims))] = "+".join(dims)
    if cfg.model.name == "moe" and cfg.parallelism.ep > 1:
        ep_lists, expert_dp_lists = expert_parallel.ep_layout(mesh, cfg.parallelism.ep)
        for lists, name in ((expert_dp_lists, "expert_dp"), (ep_lists, "ep")):
            for ranks in lists:
                if mesh.rank in ranks and len(ranks) > 1:
                    names[tuple(ranks)] = name
    return names


class Recorder(TorchDispatchMode):
    """Every op of the dry run, to the memory tracker and the trace; and every wait on a collective."""

    def __init__(self, memory: MemoryTracker, trace: StepTrace):
        super().__init__()
        self.memory, self.trace = memory, trace
        self.stepping = False  # setup until the dry run says the step starts
        self._paused = self._fusing = self._in_graph = False

    @contextlib.contextmanager
    def paused(self):
        """Ops that are not the step's (compile's tracing) go by unrecorded."""
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    @contextlib.contextmanager
    def in_graph(self, fused: bool):
        """Ops of a compiled graph run here; fused: their outputs are not written (a fusing
        compiler keeps them in registers), so they are not counted."""
        was = self._in_graph, self._fusing
        self._in_graph, self._fusing = True, fused
        try:
            yield
        finally:
            self._in_graph, self._fusing = was

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is DEVICE_QUERY:  # most ops of a step: nothing to record (and the quickest way through)
            device = device_query(args)
            return device if device is not None else func(*args, **kwargs)
        if not self._paused and func.namespace == "_c10d_functional":  # a traced graph's collective
            return run_as_c10d(func, args, self)
        if not self._paused and func.namespace not in ("aten", "prims", "c10d"):
            body = _custom_op_body(func)
            if body is not None:  # a torch.library op of ours: record the ops it runs, not one opaque call
                with self:
                    return body(*args, **kwargs)
        out = func(*args, **kwargs)
        if self._paused:
            return out
        memory = self.memory
        phase = self.trace.current_phase()
        memory.category_now = ("other" if not self.stepping else "activations" if phase == "forward" else "transient")
        outputs = tensors_of(out)
        if not self._fusing:
            memory.on_op(outputs)
        self.trace.on_op(func, args, kwargs, out, "fused" if self._fusing else "graph" if self._in_graph else "eager")
        if func.namespace == "c10d":
            self._label_communication(func, args)
        elif func is torch.ops.aten._to_copy.default and memory.category_of(args[0]) == "fp32 masters":
            memory.relabel(outputs[0], "gathered weights")  # a weight cast to the compute dtype
        return out

    def _label_communication(self, func, args) -> None:
        """FSDP's gathered units (the only 1-D all-gathers outside tensor parallel) are gathered
        weights; flat gradient buffers being reduced and pipeline messages are communication.
        Activations gathered or exchanged by tensor, context or expert parallel stay activations."""
        last = self.trace.events[-1][1] if self.trace.events and self.trace.events[-1][0] == "issue" else None
        if last is None:
            return
        tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        if last.kind == "all_gather" and last.flat and last.dims != "tp":
            category = "gathered weights"
        elif (last.kind in ("reduce_scatter", "all_reduce") and last.flat) or last.kind in ("send", "recv"):
            category = "communication"
        else:
            return
        for t in tensors:
            if self.memory.category_of(t) not in ("fp32 masters", "gradients", "optimizer moments"):
                self.memory.relabel(t, category)


@contextlib.contextmanager
def _waits_recorded(trace: StepTrace):
    """Every wait() on a collective's handle reaches the trace (where the compute stream waits)."""
    real_wait = FakeWork.wait

    def wait(work, *args, **kwargs):
        trace.on_wait(work)
        return real_wait(work, *args, **kwargs)

    FakeWork.wait = wait
    try:
        yield
    finally:
        FakeWork.wait = real_wait


def _custom_op_body(func):
    """The Python function behind a torch.library.custom_op (minititan::master_linear), or None."""
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get(func._schema.name)
    return opdef._init_fn if opdef is not None else None


@contextlib.contextmanager
def _fresh_caches():
    """minititan's function caches (functools.cache) emptied on the way in and out: what a dry run
    computes and caches (RoPE frequencies, kernel probes) is fake, and a real run must not reuse it."""
    def clear():
        for name, module in list(sys.modules.items()):
            if name.startswith("minititan.") and module is not None:
                for value in list(vars(module).values()):
                    if callable(getattr(value, "cache_clear", None)) and _is_ours(value):
                        value.cache_clear()
    clear()
    try:
        yield
    finally:
        clear()


def _is_ours(value) -> bool:
    """A function of minititan's own (not one imported from torch: FakeTensorMode has a
    cache_clear too, and its cache of op outputs by input metadata holds nothing of a dry run's)."""
    return getattr(value, "__module__", "").startswith("minititan.")


@contextlib.contextmanager
def _quiet():
    """The layout says what it built (pipeline: ...) on rank 0; a dry run keeps that to itself."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
