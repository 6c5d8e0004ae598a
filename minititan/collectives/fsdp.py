"""Fully sharded data parallel (ZeRO-3), and HSDP when a replicate group is given.

Each *unit* of parameters (an attention or feed-forward block, the embedding, the output head)
lives on every rank as ONE flat fp32 shard: the unit's parameters are flattened, laid end to end
(each starting 16-element aligned) and padded so the buffer splits evenly over the shard group;
rank r keeps piece r. The optimizer only ever sees these shards, so params, grads and optimizer
state all cost total / dp_shard (+ a little padding) per rank.

    fsdp = shard_params(full_params, model.units(cfg), shard_group, param_dtype=torch.bfloat16)
    with fsdp.resharding():             # params saved for backward are kept as references
        loss = forward(...)             # calls fsdp.gather(unit) right before each unit runs
    loss.backward()                     # each unit's grads are reduce-scattered as soon as done
    fsdp.finish_grad_sync()             # wait for the last reductions; shard.grad is complete
    optimizer.step()                    # over fsdp.shards.values()

The moving parts, all in this file:
  * gather(unit)   all-gathers the unit's shard into a full flat buffer (through the gather
                   codec, below) and returns views of it, one per parameter. It also starts the
                   all-gather of the next unit, so that communication overlaps this unit's compute.
  * GatherUnit     the autograd Function behind those views. Its backward gets the gradient of
                   every parameter of the unit, packs them into one flat buffer and reduce-scatters
                   it (SUM) into the shard's .grad; with HSDP the result is then all-reduced over
                   the replicate group. The collectives run asynchronously and are finished while
                   the backward of earlier units runs.
  * resharding()   saved-tensor hooks: a tensor saved for backward that is a view of a unit's
                   gathered buffer is stored as (unit, size, stride, offset) instead of the tensor,
                   so the buffer is freed once the model moves on to the next unit. Backward
                   unpacks it by gathering the unit again, and prefetches the unit before it.

What travels is the codec's choice (`fsdp.codec`): `CastToParamDtype`, the default, casts each
rank's piece to param_dtype and hands out views of the gathered buffer. A codec has three methods:
start(unit, shard, layout, group) -> (work, buffer, inputs to keep alive until work.wait()),
unit_params(unit, buffer, layout) -> the unit's tensors, and shards_changed() (the optimizer is
about to update the shards). fsdp_float8.py's codec gathers the weights that run in fp8 as fp8
bytes with their scales; the saved-tensor hooks below handle any view of any codec's buffer.

Communication is asynchronous (`async_op=True`). On NCCL each collective runs on the process
group's own CUDA stream, which waits (by an event) for the work queued before it, and
`work.wait()` makes the compute stream wait for its end: no host synchronisation. Every buffer a
collective reads or writes stays referenced here until after its `wait()`, so the caching
allocator never hands its memory to someone else early. On gloo the same calls run on a
background thread and `wait()` blocks: the same code path, exact results.

Only torch and the sibling mesh.py are needed, so this file can be copied.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .mesh import all_gather_single, reduce_scatter_single

ALIGN = 16  # every parameter starts at a multiple of 16 elements: >= 16-byte aligned views for any dtype


# ---------------------------------------------------------------- the layout of a unit


@dataclasses.dataclass(frozen=True)
class UnitLayout:
    """Where each parameter of a unit sits in its flat buffer, and which piece this rank keeps."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # start of each parameter in the unit's flat buffer
    padded_numel: int  # length of the flat buffer: divisible by the shard group size
    shard_numel: int  # padded_numel / shard group size
    shard_start: int  # this rank's first element of the flat buffer

    @property
    def numel(self) -> int:
        """Real parameter elements (without alignment gaps and padding)."""
        return sum(math.prod(s) for s in self.shapes)


def plan_unit(names: list[str], shapes: Mapping[str, tuple[int, ...]], world: int, rank: int) -> UnitLayout:
    offsets, end = [], 0
    for name in names:
        offsets.append(end)
        end = round_up(end + math.prod(shapes[name]), ALIGN)
    shard_numel = max(1, math.ceil(end / world))
    return UnitLayout(tuple(names), tuple(tuple(shapes[n]) for n in names), tuple(offsets),
                      shard_numel * world, shard_numel, shard_numel * rank)


def shard_ranges(layout: UnitLayout) -> dict[str, tuple[int, int, int]]:
    """The parameters this rank holds a part of: name -> (flat_start, flat_stop, shard_offset),
    meaning full[name].flatten()[flat_start:flat_stop] == shard[shard_offset:shard_offset + stop - start].
    A parameter's part is always one contiguous range of its flattened tensor."""
    lo, hi = layout.shard_start, layout.shard_start + layout.shard_numel
    out = {}
    for name, shape, offset in zip(layout.names, layout.shapes, layout.offsets):
        start, stop = max(lo, offset), min(hi, offset + math.prod(shape))
        if start < stop:
            out[name] = (start - offset, stop - offset, start - lo)
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------- what the all-gather moves


class CastToParamDtype:
    """The default gather codec: each rank's piece cast to param_dtype, all-gathered into one flat
    buffer; the unit's parameters are views of it."""

    def __init__(self, param_dtype: torch.dtype):
        self.param_dtype = param_dtype

    def start(self, unit: str, shard: Tensor, layout: UnitLayout, group: dist.ProcessGroup):
        full = torch.empty(layout.padded_numel, dtype=self.param_dtype, device=shard.device)
        with torch.no_grad():
            piece = shard.detach().to(self.param_dtype)
        return all_gather_single(full, piece, group=group, async_op=True), full, piece

    def unit_params(self, unit: str, full: Tensor, layout: UnitLayout) -> tuple[Tensor, ...]:
        return tuple(full[o:o + math.prod(s)].view(s) for o, s in zip(layout.offsets, layout.shapes))

    def shards_changed(self) -> None:
        pass


# ---------------------------------------------------------------- the autograd seam


class GatherUnit(torch.autograd.Function):
    """shard -> the unit's parameters as views of the gathered buffer; backward reduces their grads."""

    @staticmethod
    def forward(ctx, shard: Tensor, full: Tensor, fsdp: "FSDP", unit: str):
        ctx.fsdp, ctx.unit = fsdp, unit
        return fsdp.codec.unit_params(unit, full, fsdp.layouts[unit])

    @staticmethod
    def backward(ctx, *grads):
        ctx.fsdp._unit_backward_done(ctx.unit, grads)
        return None, None, None, None  # the shard's grad is written by the reduction, not by autograd


@dataclasses.dataclass
class _SavedRef:
    """A tensor saved for backward that was a view of a unit's gathered buffer."""
    unit: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype  # a codec's buffer may hold several dtypes (fp8 all-gather: uint8 holding fp8 and param_dtype)


@dataclasses.dataclass
class _SavedSubclass:
    """A tensor subclass saved for backward (fsdp_float8.Float8Weight) whose inner tensors are views
    of a gathered buffer: saved as its inner tensors, each a _SavedRef or a tensor."""
    cls: type
    inner: dict
    meta: object
    size: tuple[int, ...]
    stride: tuple[int, ...]


_DONE = object()
_PLAIN_TENSORS = (Tensor, FakeTensor)  # not a subclass such as Float8Weight; FakeTensor: a dry run (minititan plan)
_resharding_now: list["FSDP"] = []  # the FSDP objects inside resharding(), outermost first


def _pack_for_first(fsdps: tuple["FSDP", ...], t: Tensor):
    """The saved-tensor pack hook: the first FSDP object whose gathered buffer t views saves it."""
    for fsdp in fsdps:
        saved = fsdp._pack(t)
        if saved is not t:
            return fsdp, saved
    return None, t


def _unpack_by_packer(packed):
    fsdp, saved = packed
    return saved if fsdp is None else fsdp._unpack(saved)


# ---------------------------------------------------------------- FSDP


class FSDP:
    """The shards of every unit, and the gathers and reductions that serve the forward and backward.

    shards[unit] is a 1-D fp32 leaf tensor (requires_grad) of layouts[unit].shard_numel elements:
    give these to the optimizer. Their .grad is filled by the backward + finish_grad_sync()."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], units: Mapping[str, list[str]],
                 shard_group: dist.ProcessGroup, replicate_group: dist.ProcessGroup | None = None, *,
                 device: str | torch.device = "cpu", param_dtype: torch.dtype = torch.float32,
                 reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True,
                 reduce_every_microbatch: bool = True):
        _check_units(shapes, units)
        for what, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ValueError(f"FSDP {what} must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
        self.shard_group, self.replicate_group = shard_group, replicate_group
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward
        # reduce_grads False: backward keeps full grads locally; the next reducing backward sends the sum.
        # reduce_every_microbatch False: so until reduce_next_backward(), and again after finish_grad_sync()
        self.reduce_every_microbatch = self.reduce_grads = reduce_every_microbatch
        world, rank = dist.get_world_size(shard_group), dist.get_rank(shard_group)
        self.order = list(units)  # forward order: prefetch goes down it in forward, up it in backward
        self._position = {u: i for i, u in enumerate(self.order)}
        self.layouts = {u: plan_unit(list(names), shapes, world, rank) for u, names in units.items()}
        self.shards = {u: torch.zeros(lay.shard_numel, device=device, requires_grad=True)
                       for u, lay in self.layouts.items()}
        self._unit_of_param = {n: u for u, lay in self.layouts.items() for n in lay.names}
        self._in_flight: dict[str, tuple] = {}  # unit -> (work, full buffer, input, shard version)
        self._gathered: dict[str, Tensor] = {}  # unit -> full buffer that saved refs may point into
        self._awaiting_backward: set[str] = set()  # units with saved refs: backward will gather them again
        self._unreduced: dict[str, Tensor] = {}  # unit -> full grad kept locally while reduce_grads is False
        self._reductions: list[Iterator] = []  # reductions in flight, oldest first
        self._resharding = False
        self.codec = CastToParamDtype(param_dtype)  # what the all-gathers move (fsdp_float8.py replaces it)

    # ------------------------------------------------------------ loading and checkpoints

    @torch.no_grad()
    def load_full(self, params: Mapping[str, Tensor]) -> None:
        """Copy this rank's part of each given full tensor into the shards (any subset of names,
        so a rank can build and load one unit at a time)."""
        for name, full in params.items():
            layout = self.layouts[self._unit(name)]
            shape = layout.shapes[layout.names.index(name)]
            if tuple(full.shape) != shape:
                raise ValueError(f"FSDP load_full: {name} has shape {tuple(full.shape)}, expected {shape}")
            start, stop, _ = shard_ranges(layout).get(name, (0, 0, 0))
            self.param_slice(name).copy_(full.reshape(-1)[start:stop])

    def shard_ranges(self, unit: str) -> dict[str, tuple[int, int, int]]:
        """name -> (flat_start, flat_stop, shard_offset) for the params of `unit` this rank holds a part of."""
        return shard_ranges(self.layouts[self._check_unit(unit)])

    def param_slice(self, name: str, shard_like: Tensor | None = None) -> Tensor:
        """This rank's part of parameter `name`: a 1-D view (no autograd) into its unit's shard, or
        into `shard_like` (a tensor shaped like that shard: its grad, an optimizer moment). Holds
        full[name].flatten()[flat_start:flat_stop]; empty if this rank holds none of it.
        Read it to save a checkpoint; copy_ into it to load one."""
        unit = self._unit(name)
        shard = (self.shards[unit] if shard_like is None else shard_like).detach()
        start, stop, offset = self.shard_ranges(unit).get(name, (0, 0, 0))
        return shard[offset:offset + stop - start]

    @torch.no_grad()
    def unshard(self, shard_tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """All-gather tensors shaped like the shards (params, grads, moments), keyed by unit,
        into full tensors keyed by parameter name. Synchronous: for export and tests, not steps."""
        out = {}
        for unit, shard in shard_tensors.items():
            layout = self.layouts[self._check_unit(unit)]
            full = torch.empty(layout.padded_numel, dtype=shard.dtype, device=shard.device)
            all_gather_single(full, shard.detach().contiguous(), group=self.shard_group)
            for name, o, s in zip(layout.names, layout.offsets, layout.shapes):
                out[name] = full[o:o + math.prod(s)].view(s).clone()
        return out

    # ------------------------------------------------------------ forward

    def gather(self, unit: str) -> dict[str, Tensor]:
        """The unit's full parameters (param_dtype), as name -> tensor; call right before the unit runs."""
        layout = self.layouts[self._check_unit(unit)]
        grad = torch.is_grad_enabled()
        if grad and self.reshard_after_forward and not self._resharding:
            raise ValueError("FSDP with reshard_after_forward=True: run the forward inside `with fsdp.resharding():` "
                             "(or build FSDP with reshard_after_forward=False)")
        full = self._take_prefetched(unit)
        if full is None:
            self._start_all_gather(unit)
            full = self._finish_all_gather(unit)
        self._drop_in_flight()  # anything else in flight is a leftover of an interrupted forward
        if grad and self.reshard_after_forward:
            # forget the previous unit: its buffer is freed once the model lets go of its views
            self._gathered = {unit: full}
        i = self._position[unit]
        if i + 1 < len(self.order):
            self._start_all_gather(self.order[i + 1])  # overlaps this unit's compute
        return dict(zip(layout.names, GatherUnit.apply(self.shards[unit], full, self, unit)))

    @contextlib.contextmanager
    def resharding(self):
        """Run a forward in here: a tensor saved for backward that is a view of a unit's gathered
        params is stored as a reference, and backward gathers the unit again to read it. So each
        unit's full params live only while the unit runs, in forward and in backward.
        Does nothing when reshard_after_forward is False.

        Several FSDP objects (over different groups: the dense layers and the experts, say) nest:
        inside `with a.resharding(), b.resharding():` views of either's buffers are saved as
        references. Saved-tensor hooks do not nest (only the innermost pair runs), so the pair
        installed here asks every FSDP object whose resharding() is open."""
        if not self.reshard_after_forward:
            yield
            return
        was, self._resharding = self._resharding, True
        _resharding_now.append(self)
        try:
            pack = functools.partial(_pack_for_first, tuple(_resharding_now))
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack_by_packer):
                yield
        finally:
            _resharding_now.remove(self)
            self._resharding = was

    def _pack(self, t: Tensor):
        if self._gathered and hasattr(t, "__tensor_flatten__"):  # a Float8Weight (activation checkpointing saves it)
            names, meta = t.__tensor_flatten__()
            inner = {name: self._pack(getattr(t, name)) for name in names}
            if any(isinstance(v, _SavedRef) for v in inner.values()):
                return _SavedSubclass(type(t), inner, meta, tuple(t.shape), tuple(t.stride()))
        if self._gathered and type(t) in _PLAIN_TENSORS and t.layout == torch.strided:
            storage = t.untyped_storage()._cdata  # the allocation (not data_ptr: a dry run's fake tensors have none)
            for unit, full in self._gathered.items():
                if full.untyped_storage()._cdata == storage:
                    self._awaiting_backward.add(unit)
                    return _SavedRef(unit, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)
        return t  # activations (and anything else) are saved as usual

    def _unpack(self, saved):
        if isinstance(saved, _SavedSubclass):
            inner = {name: self._unpack(v) for name, v in saved.inner.items()}
            return saved.cls.__tensor_unflatten__(inner, saved.meta, saved.size, saved.stride)
        if not isinstance(saved, _SavedRef):
            return saved
        unit = saved.unit
        full = self._gathered.get(unit)
        if full is None:
            full = self._take_prefetched(unit)
            if full is None:
                self._start_all_gather(unit)
                full = self._finish_all_gather(unit)
            self._gathered[unit] = full
        self._prefetch_before(unit)  # overlaps this unit's backward (a no-op once it is in flight)
        return full.view(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)

    def _prefetch_before(self, unit: str) -> None:
        """Start gathering the nearest earlier unit that backward will need again."""
        for earlier in reversed(self.order[:self._position[unit]]):
            if earlier in self._awaiting_backward:
                if earlier not in self._gathered and earlier not in self._in_flight:
                    self._start_all_gather(earlier)
                return

    # ------------------------------------------------------------ all-gathers

    def _start_all_gather(self, unit: str) -> None:
        shard = self.shards[unit]
        work, full, inputs = self.codec.start(unit, shard, self.layouts[unit], self.shard_group)
        self._in_flight[unit] = (work, full, inputs, shard._version)

    def _finish_all_gather(self, unit: str) -> Tensor:
        work, full, _piece, _version = self._in_flight.pop(unit)
        work.wait()  # on NCCL: the compute stream waits for the gather, the host does not
        return full

    def _take_prefetched(self, unit: str) -> Tensor | None:
        """The unit's buffer if its all-gather is in flight and the shard did not change since it started."""
        if unit not in self._in_flight:
            return None
        version = self._in_flight[unit][3]
        full = self._finish_all_gather(unit)
        return full if version == self.shards[unit]._version else None

    def _drop_in_flight(self) -> None:
        for unit in list(self._in_flight):
            self._finish_all_gather(unit)  # wait before letting go: the collective still uses the buffers

    # ------------------------------------------------------------ backward: gradient reduction

    def _unit_backward_done(self, unit: str, grads: tuple[Tensor, ...]) -> None:
        """All of the unit's parameter grads for this backward are here: free its buffer, reduce."""
        self._gathered.pop(unit, None)
        self._awaiting_backward.discard(unit)
        layout = self.layouts[unit]
        flat = torch.zeros(layout.padded_numel, dtype=self.reduce_dtype, device=grads[0].device)
        for g, o, s in zip(grads, layout.offsets, layout.shapes):
            flat[o:o + math.prod(s)].view(s).copy_(g)
        if unit in self._unreduced:
            flat += self._unreduced.pop(unit)
        if not self.reduce_grads:
            self._unreduced[unit] = flat
            return
        self._advance_reductions()  # the previous units' reductions move on while this one starts
        reduction = self._reduce(unit, flat)
        next(reduction)
        self._reductions.append(reduction)

    def _reduce(self, unit: str, flat: Tensor) -> Iterator[None]:
        """Reduce one unit's full gradient into its shard's .grad. Each `yield` leaves a collective
        in flight; the caller resumes it later (at the next unit's backward, or in finish_grad_sync)."""
        out = torch.empty(self.layouts[unit].shard_numel, dtype=self.reduce_dtype, device=flat.device)
        work = reduce_scatter_single(out, flat, op=dist.ReduceOp.SUM, group=self.shard_group, async_op=True)
        yield
        work.wait()
        del flat
        if self.replicate_group is not None:  # HSDP: replicas hold the same shard, sum their grads
            work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.replicate_group, async_op=True)
            yield
            work.wait()
        shard = self.shards[unit]
        if shard.grad is None:
            shard.grad = out.to(shard.dtype)
        else:
            shard.grad += out

    def _advance_reductions(self) -> None:
        self._reductions = [r for r in self._reductions if next(r, _DONE) is not _DONE]

    def reduce_next_backward(self) -> None:
        """Reduce in the coming backward (the step's last micro-batch) whatever reduce_every_microbatch says."""
        self.reduce_grads = True

    def finish_grad_sync(self) -> None:
        """Complete every gradient reduction: call after the step's last backward, before reading
        .grad (norm, clipping, optimizer). Full grads kept by reduce_grads=False are reduced here."""
        for unit in [u for u in self.order if u in self._unreduced]:
            reduction = self._reduce(unit, self._unreduced.pop(unit))
            next(reduction)
            self._reductions.append(reduction)
        while self._reductions:
            self._advance_reductions()
        self._drop_in_flight()
        self._gathered.clear()
        self._awaiting_backward.clear()
        self.reduce_grads = self.reduce_every_microbatch
        self.codec.shards_changed()  # the optimizer step changes the shards next

    def grad_norm_sq(self) -> Tensor:
        """Squared L2 norm of the full gradient (fp32 scalar tensor, no host sync): the local shards'
        sum of squares summed over the shard group. Padding grads are zero; HSDP replicas hold the
        same shards, so the replicate group is not summed. With TP/PP, sum it over those groups too."""
        grads = [s.grad for s in self.shards.values() if s.grad is not None]
        total = torch.zeros((), dtype=torch.float32, device=next(iter(self.shards.values())).device)
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2.0)).float().pow(2).sum()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.shard_group)
        return total

    # ------------------------------------------------------------ checks

    def _check_unit(self, unit: str) -> str:
        if unit not in self.layouts:
            raise ValueError(f"FSDP: unknown unit {unit!r}; units are {', '.join(self.order)}")
        return unit

    def _unit(self, name: str) -> str:
        if name not in self._unit_of_param:
            raise ValueError(f"FSDP: parameter {name!r} is in no unit; pass it in `units` when building FSDP")
        return self._unit_of_param[name]


def shard_params(params: Mapping[str, Tensor], units: Mapping[str, list[str]], shard_group: dist.ProcessGroup,
                 replicate_group: dist.ProcessGroup | None = None, **options) -> FSDP:
    """FSDP over these full tensors (the same on every rank), placed on their device."""
    missing = [n for names in units.values() for n in names if n not in params]
    if missing:
        raise ValueError(f"FSDP: units name parameters that are not in params: {missing[:5]}")
    device = next(iter(params.values())).device
    fsdp = FSDP({n: tuple(t.shape) for n, t in params.items()}, units, shard_group, replicate_group,
                device=device, **options)
    fsdp.load_full({n: params[n] for names in units.values() for n in names})
    return fsdp


def _check_units(shapes: Mapping[str, tuple[int, ...]], units: Mapping[str, list[str]]) -> None:
    if not units:
        raise ValueError("FSDP needs at least one unit: pass units = model.units(cfg)")
    seen: dict[str, str] = {}
    for unit, names in units.items():
        if not names:
            raise ValueError(f"FSDP unit {unit!r} has no parameters; drop it from units")
        for name in names:
            if name not in shapes:
                raise ValueError(f"FSDP unit {unit!r} names {name!r}, which has no shape in shapes")
            if name in seen:
                raise ValueError(f"FSDP: {name!r} is in units {seen[name]!r} and {unit!r}; "
                                 "put each parameter in one unit")
            seen[name] = unit
