"""Sequence parallel: the activations between transformer blocks are split along the sequence.

Under tensor parallelism every tp rank would otherwise hold the whole [b, s, d] residual stream
and apply the norms to all of it. Sequence parallel keeps 1/tp of the sequence on each rank
between blocks, and a block's entry and exit become:

    entry (gather_seq)          all-gather the sequence shards      / backward: reduce-scatter
    exit  (reduce_scatter_seq)  sum the partial outputs, keep mine  / backward: all-gather

the same bytes as plain TP's all-reduce (an all-reduce is a reduce-scatter plus an all-gather),
but the norms, residual adds and saved activations between blocks are 1/tp the size.
tensor_parallel.py plugs them in as ops.into_tp / ops.out_of_tp; async_tp.py overlaps them with
the matmuls, chunk by chunk, with `all_gather_stacked` and `reduce_scatter_stacked`.

Only torch and the sibling mesh.py are needed, so this file can be copied.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .mesh import all_gather_single, reduce_scatter_single


def all_gather_stacked(x: Tensor, group, async_op: bool = False):
    """Every rank's contiguous x, stacked in rank order: ([tp, *x.shape], the collective's Work)."""
    tp = dist.get_world_size(group)
    out = x.new_empty((tp * x.shape[0], *x.shape[1:]))  # gloo insists on dim 0 = tp * x's dim 0
    work = all_gather_single(out, x, group=group, async_op=async_op)
    return out.unflatten(0, (tp, -1)), work


def reduce_scatter_stacked(parts: Tensor, group, async_op: bool = False):
    """Contiguous [tp, ...] partial sums on each rank -> (this rank's [...] of the totals, Work)."""
    out = parts.new_empty(parts.shape[1:])
    work = reduce_scatter_single(out, parts.flatten(0, 1), group=group, async_op=async_op)
    return out, work


def _all_gather_seq(x: Tensor, group) -> Tensor:
    """[b, s/tp, ...] on each rank -> [b, s, ...], rank 0's part first."""
    stacked, _ = all_gather_stacked(x.contiguous(), group)  # [tp, b, s/tp, ...]
    return stacked.movedim(0, 1).flatten(1, 2)  # a copy unless b == 1


def _reduce_scatter_seq(x: Tensor, group) -> Tensor:
    """[b, s, ...] partial sums on each rank -> this rank's [b, s/tp, ...] of the total."""
    tp = dist.get_world_size(group)
    s = x.shape[1]
    if s % tp:
        raise ValueError(f"sequence length {s} is not divisible by tp={tp}: sequence parallel needs "
                         f"training.seq_len divisible by parallelism.tp")
    out, _ = reduce_scatter_stacked(x.unflatten(1, (tp, s // tp)).movedim(1, 0).contiguous(), group)
    return out


class _GatherSeq(torch.autograd.Function):
    """SP entry: all-gather the sequence shards; backward reduce-scatters the partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """SP exit: sum the partial outputs and keep this rank's sequence shard; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def gather_seq(x: Tensor, group) -> Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: Tensor, group) -> Tensor:
    return _ReduceScatterSeq.apply(x, group)
