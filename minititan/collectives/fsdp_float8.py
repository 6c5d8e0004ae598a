"""FSDP all-gather in float8: weights travel as fp8 bytes, half the traffic of bf16.

A weight that is going to be cast to fp8 (tensorwise, e4m3) for its matmul anyway can be cast
*before* the all-gather instead of after it: every rank casts its piece of the weight, the pieces
are all-gathered (1 byte per element), and the matmul takes the gathered fp8 weight as is. For
that the pieces must share one scale, the one the whole weight would get:

    amax  = all_reduce(MAX, amax of this rank's piece)     over the shard group
    scale = 448 / max(amax, 1e-12)                           the same on every rank
    piece = e4m3(clamp(piece * scale, ±448))                  per rank, before the all-gather

which is exactly what the linear computes from the whole weight without FSDP, element for
element: the gathered bytes equal its fp8 copy, bit for bit.

Per unit (an attention or feed-forward block), in the unit's flat FSDP layout:

  * fp8 weights (the names given: 2-D, fed to ops.linear, dims multiples of 16): this rank's
    piece of the flat buffer cast to e4m3 with each weight's scale, all-gathered as uint8 (gloo
    cannot move float8 dtypes; NCCL moves the same bytes). Positions of the unit's other params
    in that buffer are zeros nobody reads.
  * the unit's other params (the norms): a second, small all-gather in param_dtype of just their
    elements (each rank's part, padded to the largest part), copied into one compact buffer.
  * scales: one fp32 per fp8 weight. Without precompute, the first gather of a unit after
    finish_grad_sync() all-reduces (MAX) the unit's amaxes; the scales are kept until the next
    finish_grad_sync() (the shards only change in the optimizer step after it; FSDP tells the
    codec by shards_changed()), so backward re-gathers and later micro-batches reuse them.
    `precompute_scales()` right after the optimizer step does all units in one all-reduce.

Both all-gathers land in one uint8 buffer per unit ([fp8 weights | pad | other params]), which is
what FSDP keeps, frees and re-gathers as the unit's gathered buffer. The unit's parameters handed
to the forward are views of it; each fp8 weight is a `Float8Weight`: to autograd a tensor of
param_dtype and the weight's shape (its gradient is a plain param_dtype tensor, reduce-scattered
like any other), holding `fp8_data` (the e4m3 view of the buffer) and `fp8_scale`. A linear that
knows it (minititan.core.float8.float8_linear) multiplies fp8_data directly; the weight gradient
it returns is the gradient with respect to the dequantized weight (straight-through, as in
torchao). Any other op on a Float8Weight sees the dequantized weight.

    fsdp = FSDP(shapes, units, shard_group, param_dtype=torch.bfloat16)
    fp8 = enable_float8_all_gather(fsdp, fp8_names)   # fsdp.codec: units with fp8 weights gather in fp8
    ...
    optimizer.step(); fp8.precompute_scales(fsdp.shards)   # optional

`Float8AllGather` is FSDP's gather codec (see fsdp.py); units without fp8 weights go through the
default one. Only torch, the stdlib and the siblings fsdp.py and mesh.py are needed.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Collection, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_map_only

from .fsdp import FSDP, CastToParamDtype, UnitLayout, round_up, shard_ranges
from .mesh import all_gather_single

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_EPS = 1e-12  # an all-zero weight gets a large finite scale instead of inf (as minititan.core.float8)


# ---------------------------------------------------------------- the cast (the same math as minititan.core.float8)


def scale_from_amax(amax: Tensor) -> Tensor:
    """The fp32 scale that maps amax to 448, the largest e4m3 value."""
    return E4M3_MAX / amax.float().clamp(min=AMAX_EPS)


def cast_to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    """e4m3(t * scale), saturating: e4m3fn has no infinity, an overflow would become NaN."""
    return (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


# ---------------------------------------------------------------- what the forward receives


class Float8Weight(torch.Tensor):
    """A gathered weight held in fp8: autograd sees a [N, K] tensor of `dtype`, float8_linear reads
    `fp8_data` (e4m3 [N, K]) and `fp8_scale` (fp32, 0-d: weight ~= fp8_data / fp8_scale).
    A subclass rather than attributes on a plain tensor because activation checkpointing detaches
    its inputs, which keeps a subclass and its payload but drops attributes."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of torch ops are plain tensors

    @staticmethod
    def __new__(cls, fp8_data: Tensor, fp8_scale: Tensor, dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(cls, fp8_data.shape, dtype=dtype, device=fp8_data.device)
        t.fp8_data, t.fp8_scale = fp8_data, fp8_scale
        return t

    def __repr__(self):
        return f"Float8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, scale={self.fp8_scale})"

    def dequantize(self) -> Tensor:
        return (self.fp8_data.float() / self.fp8_scale).to(self.dtype)

    # torch.compile and FSDP's saved-tensor hooks take it apart and put it back together by these
    def __tensor_flatten__(self):
        return ["fp8_data", "fp8_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict, dtype, outer_size, outer_stride):
        return Float8Weight(inner["fp8_data"], inner["fp8_scale"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            w = args[0]
            return Float8Weight(w.fp8_data, w.fp8_scale, w.dtype)
        # anything else (F.linear of a shape fp8 GEMMs cannot take, a print): the dequantized weight
        args, kwargs = tree_map_only(Float8Weight, Float8Weight.dequantize, (args, kwargs or {}))
        return func(*args, **kwargs)


# ---------------------------------------------------------------- the plan of one unit


@dataclasses.dataclass(frozen=True)
class Float8UnitPlan:
    """Which params of a unit go in fp8, where this rank's parts of them are, and how the other
    params' elements travel. Offsets into this rank's shard unless said otherwise."""
    fp8_index: dict[int, int]  # position in layout.names -> index of that weight's scale
    fp8_parts: tuple[tuple[int, int, int], ...]  # (scale index, shard offset, count) held here
    hp_parts: tuple[tuple[int, int], ...]  # (shard offset, count): this rank's elements of the other params
    hp_piece: int  # elements every rank sends for the other params (the largest rank's count)
    hp_take: tuple[tuple[int, int], ...]  # (start, count) in the gathered [world * hp_piece]: in order, the params
    hp_offsets: dict[int, int]  # position in layout.names -> offset in the compact buffer of other params
    hp_start: int  # byte where the compact buffer of other params starts in the unit's uint8 buffer
    nbytes: int  # size of the unit's uint8 buffer


def plan_float8_unit(layout: UnitLayout, fp8_names: Collection[str], world: int,
                     param_dtype: torch.dtype) -> Float8UnitPlan:
    """The plan of one unit for this rank (the one `layout` was planned for) in a shard group of `world`."""
    names = layout.names
    fp8_index = {i: j for j, i in enumerate(i for i, n in enumerate(names) if n in fp8_names)}
    hp = [i for i in range(len(names)) if i not in fp8_index]
    mine = shard_ranges(layout)
    fp8_parts = tuple((fp8_index[i], mine[n][2], mine[n][1] - mine[n][0])
                      for i, n in enumerate(names) if i in fp8_index and n in mine)
    # rank r's elements of the other params: its piece of the flat buffer cut to those params.
    # Concatenated in rank order they are the params end to end, in layout order.
    hp_parts = []
    for r in range(world):
        ranges = shard_ranges(dataclasses.replace(layout, shard_start=r * layout.shard_numel))
        hp_parts.append(tuple((ranges[names[i]][2], ranges[names[i]][1] - ranges[names[i]][0])
                              for i in hp if names[i] in ranges))
    counts = [sum(n for _, n in parts) for parts in hp_parts]
    hp_piece = max(counts)
    hp_offsets = dict(zip(hp, itertools.accumulate((math.prod(layout.shapes[i]) for i in hp), initial=0)))
    hp_start = round_up(layout.padded_numel, 16)
    return Float8UnitPlan(fp8_index=fp8_index, fp8_parts=fp8_parts,
                          hp_parts=hp_parts[layout.shard_start // layout.shard_numel], hp_piece=hp_piece,
                          hp_take=tuple((r * hp_piece, c) for r, c in enumerate(counts) if c),
                          hp_offsets=hp_offsets, hp_start=hp_start,
                          nbytes=hp_start + round_up(sum(counts) * param_dtype.itemsize, 16))


# ---------------------------------------------------------------- the gathers


class Float8AllGather:
    """FSDP's gather codec for the units that hold fp8 weights (their fp8 all-gathers and scales);
    the other units go through the default codec (see enable_float8_all_gather)."""

    def __init__(self, fsdp: FSDP, fp8_names: Collection[str]):
        self.group, self.param_dtype, self.layouts = fsdp.shard_group, fsdp.param_dtype, fsdp.layouts
        world = dist.get_world_size(self.group)
        self.plans = {unit: plan_float8_unit(layout, fp8_names, world, self.param_dtype)
                      for unit, layout in fsdp.layouts.items() if any(n in fp8_names for n in layout.names)}
        self.scales: dict[str, Tensor] = {}  # unit -> fp32 scale per fp8 weight, valid until shards_changed()
        self.other_units = CastToParamDtype(self.param_dtype)

    # ------------------------------------------------------------ scales

    def precompute_scales(self, shards: Mapping[str, Tensor]) -> None:
        """Every unit's scales with one all-reduce: call right after the optimizer step."""
        units = list(self.plans)
        amax = torch.cat([self._local_amax(unit, shards[unit].detach()) for unit in units])
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        sizes = [len(self.plans[unit].fp8_index) for unit in units]
        self.scales = dict(zip(units, scale_from_amax(amax).split(sizes)))

    def shards_changed(self) -> None:
        """The shards are about to change (FSDP.finish_grad_sync calls this before the optimizer step)."""
        self.scales = {}

    def _scales(self, unit: str, shard: Tensor) -> Tensor:
        if unit not in self.scales:
            amax = self._local_amax(unit, shard)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)  # NCCL: the stream waits, not the host
            self.scales[unit] = scale_from_amax(amax)
        return self.scales[unit]

    def _local_amax(self, unit: str, shard: Tensor) -> Tensor:
        """amax of this rank's part of each fp8 weight (0 for a weight it holds none of), taken in
        param_dtype like the linear would, so the scale is the one of the weight it would see."""
        plan = self.plans[unit]
        amax = torch.zeros(len(plan.fp8_index), dtype=torch.float32, device=shard.device)
        for j, offset, n in plan.fp8_parts:
            amax[j] = shard[offset:offset + n].to(self.param_dtype).abs().amax()
        return amax

    # ------------------------------------------------------------ all-gather

    def start(self, unit: str, shard: Tensor, layout: UnitLayout, group: dist.ProcessGroup):
        """Start the unit's all-gathers into a new uint8 buffer: (work, buffer, the inputs, which
        must stay alive until work.wait())."""
        if unit not in self.plans:
            return self.other_units.start(unit, shard, layout, group)
        plan = self.plans[unit]
        shard = shard.detach()
        full = torch.empty(plan.nbytes, dtype=torch.uint8, device=shard.device)
        piece = self._fp8_piece(unit, shard)
        works = [all_gather_single(full[:layout.padded_numel], piece, group=self.group, async_op=True)]
        hp_piece, hp_gathered = self._hp_piece(plan, shard), None
        if plan.hp_piece:
            hp_gathered = hp_piece.new_empty(plan.hp_piece * dist.get_world_size(self.group))
            works.append(all_gather_single(hp_gathered, hp_piece, group=self.group, async_op=True))
        hp_out = full[plan.hp_start:].view(self.param_dtype)
        return _Gathering(works, hp_gathered, plan.hp_take, hp_out), full, (piece, hp_piece)

    def _fp8_piece(self, unit: str, shard: Tensor) -> Tensor:
        """This rank's piece of the flat buffer, one byte an element: each fp8 weight's part cast
        with the weight's scale (as uint8: gloo cannot move float8 dtypes), zeros elsewhere."""
        scales = self._scales(unit, shard)
        piece = torch.zeros(self.layouts[unit].shard_numel, dtype=torch.uint8, device=shard.device)
        for j, offset, n in self.plans[unit].fp8_parts:
            fp8 = cast_to_e4m3(shard[offset:offset + n].to(self.param_dtype), scales[j])
            piece[offset:offset + n] = fp8.view(torch.uint8)
        return piece

    def _hp_piece(self, plan: Float8UnitPlan, shard: Tensor) -> Tensor:
        """This rank's elements of the other params, in param_dtype, padded to what every rank sends."""
        piece = torch.zeros(plan.hp_piece, dtype=self.param_dtype, device=shard.device)
        at = 0
        for offset, n in plan.hp_parts:
            piece[at:at + n] = shard[offset:offset + n]
            at += n
        return piece

    def unit_params(self, unit: str, full: Tensor, layout: UnitLayout) -> tuple[Tensor, ...]:
        """The unit's params from its gathered buffer, in layout order: a Float8Weight for each
        fp8 weight, a param_dtype view for the others."""
        if unit not in self.plans:
            return self.other_units.unit_params(unit, full, layout)
        plan = self.plans[unit]
        fp8 = full[:layout.padded_numel].view(E4M3)
        hp = full[plan.hp_start:].view(self.param_dtype)
        scales = self.scales[unit]
        params = []
        for i, (shape, offset) in enumerate(zip(layout.shapes, layout.offsets)):
            n = math.prod(shape)
            if i in plan.fp8_index:
                params.append(Float8Weight(fp8[offset:offset + n].view(shape), scales[plan.fp8_index[i]],
                                           self.param_dtype))
            else:
                params.append(hp[plan.hp_offsets[i]:plan.hp_offsets[i] + n].view(shape))
        return tuple(params)


class _Gathering:
    """A unit's all-gathers in flight. wait(): wait for them (on NCCL: the current stream waits),
    then copy each rank's elements of the other params into the buffer's compact part."""

    def __init__(self, works: list, hp_gathered: Tensor | None, hp_take: tuple[tuple[int, int], ...], hp_out: Tensor):
        self.works, self.hp_gathered, self.hp_take, self.hp_out = works, hp_gathered, hp_take, hp_out

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        if self.hp_gathered is not None:
            parts = [self.hp_gathered[start:start + n] for start, n in self.hp_take]
            torch.cat(parts, out=self.hp_out[:sum(n for _, n in self.hp_take)])
            self.hp_gathered = None


def enable_float8_all_gather(fsdp: FSDP, fp8_names: Collection[str]) -> Float8AllGather:
    """From now on FSDP gathers each unit holding one of `fp8_names` in fp8 (and its other params in
    param_dtype): the returned codec becomes fsdp.codec. The forward gets those weights as Float8Weight."""
    known = {n for layout in fsdp.layouts.values() for n in layout.names}
    unknown = sorted(set(fp8_names) - known)
    if unknown:
        raise ValueError(f"FSDP fp8 all-gather: {unknown[:5]} are in no FSDP unit; pass names of sharded weights")
    fsdp.codec = Float8AllGather(fsdp, fp8_names)
    return fsdp.codec
