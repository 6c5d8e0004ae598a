"""Async TP: sequence parallel's all-gather and reduce-scatter overlapped with the matmuls.

Under sequence parallel (sequence_parallel.py) a block gathers the sequence before its column
matmuls (wq wk wv, w1 w3) and reduce-scatters after its row matmuls (wo, w2), and the matmuls wait
for the collectives. Here each of them is cut into chunks along the sequence shard: the
collectives of chunk i+1 run on the process group's own stream (async_op=True) while chunk i is
multiplied, in the forward and in the backward.

The model calls `ops.into_tp(h)`, then `ops.linear(h, w)` for each column matmul, and
`ops.out_of_tp(ops.linear(o, w))` around each row matmul. To overlap, a collective and its matmul
must be one call, so `region_ops` returns three entries that work together and pass two
placeholders between them instead of tensors:

    into_tp(x)           SeqShardedInput: the shard, not yet gathered (it has the gathered shape)
    linear(x, w)         on a SeqShardedInput: the first call gathers it overlapped with its own
                         matmul and keeps the gathered x for the region's other column matmuls;
                         on a plain tensor: PendingRowLinear(x, w), the matmul not yet done
    out_of_tp(y)         on a PendingRowLinear: the matmul overlapped with its reduce-scatter

so they must be used together (tensor_parallel.tp_ops does). Only torch and the siblings
sequence_parallel.py and mesh.py are needed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .sequence_parallel import all_gather_stacked, reduce_scatter_seq, reduce_scatter_stacked


def _chunk_bounds(length: int, chunks: int) -> list[tuple[int, int]]:
    """(start, size) of up to `chunks` nearly equal pieces of range(length)."""
    size = -(-length // max(1, min(chunks, length)))
    return [(start, min(size, length - start)) for start in range(0, length, size)]


class _GatherThenLinear(torch.autograd.Function):
    """y = all_gather_seq(x_shard) @ w.T, also returning the gathered x for the region's other
    linears. All chunk gathers are queued on the group's stream at once; chunk i's matmul waits
    only for chunk i, so the later gathers run under it. Backward mirrors it: chunk i's input
    gradient is reduce-scattered while chunk i+1's is computed.

    Chunk c holds positions [c0, c0 + l) of every rank's shard, i.e. a strided set of the full
    sequence; viewing the full sequence as [b, tp, s/tp, ...] makes each chunk a plain slice."""

    @staticmethod
    def forward(ctx, x_shard, w, group, chunks):
        tp = dist.get_world_size(group)
        b, shard_len, d = x_shard.shape
        x_full = x_shard.new_empty(b, tp * shard_len, d)
        y = x_shard.new_empty(b, tp * shard_len, w.shape[0])
        x_parts, y_parts = x_full.view(b, tp, shard_len, d), y.view(b, tp, shard_len, -1)

        pending = []
        for start, size in _chunk_bounds(shard_len, chunks):
            gathered, work = all_gather_stacked(x_shard[:, start:start + size].contiguous(), group, async_op=True)
            pending.append((start, size, gathered, work))  # gathered: [tp, b, l, d]
        for start, size, gathered, work in pending:
            work.wait()  # the compute stream waits for this chunk only
            y_parts[:, :, start:start + size] = F.linear(gathered, w).transpose(0, 1)
            x_parts[:, :, start:start + size] = gathered.transpose(0, 1)

        ctx.save_for_backward(x_full, w)
        ctx.group, ctx.chunks = group, chunks
        ctx.set_materialize_grads(False)  # x_full unused by other linears -> None, not a tensor of zeros
        return y, x_full

    @staticmethod
    def backward(ctx, grad_y, grad_x_full):
        x_full, w = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        b, seq, d = x_full.shape
        shard_len = seq // tp
        grad_y = grad_y.contiguous()  # never None: the linear's output is always used
        gy_parts = grad_y.view(b, tp, shard_len, -1)
        gx_parts = grad_x_full.contiguous().view(b, tp, shard_len, d) if grad_x_full is not None else None

        pending = []
        for start, size in _chunk_bounds(shard_len, ctx.chunks):
            part = gy_parts[:, :, start:start + size].transpose(0, 1) @ w  # [tp, b, l, d], contiguous
            if gx_parts is not None:
                part += gx_parts[:, :, start:start + size].transpose(0, 1)
            out, work = reduce_scatter_stacked(part, ctx.group, async_op=True)
            pending.append((start, size, part, out, work))
        grad_w = grad_y.flatten(0, -2).t() @ x_full.flatten(0, -2)  # runs under the last reduce-scatters
        grad_x_shard = x_full.new_empty(b, shard_len, d)
        for start, size, _, out, work in pending:
            work.wait()
            grad_x_shard[:, start:start + size] = out
        return grad_x_shard, grad_w, None, None


class _LinearThenReduceScatter(torch.autograd.Function):
    """reduce_scatter_seq(x @ w.T), chunk by chunk: chunk i's partial output is reduce-scattered
    on the group's stream while chunk i+1 is multiplied. Backward all-gathers the output
    gradient chunk by chunk under the matmuls, the mirror image of _GatherThenLinear."""

    @staticmethod
    def forward(ctx, x, w, group, chunks):
        tp = dist.get_world_size(group)
        b, seq, k = x.shape
        if seq % tp:
            raise ValueError(f"sequence length {seq} is not divisible by tp={tp}: sequence parallel needs "
                             f"training.seq_len divisible by parallelism.tp")
        shard_len = seq // tp
        x = x.contiguous()
        x_parts = x.view(b, tp, shard_len, k)
        y_shard = x.new_empty(b, shard_len, w.shape[0])

        pending = []
        for start, size in _chunk_bounds(shard_len, chunks):
            # one explicit 2-D matmul: on this strided 4-D chunk, F.linear would pick mm or bmm by
            # whether w.t() requires grad, which differs between a forward and its selective-
            # checkpoint recompute under FSDP (w a view of the gathered buffer, then rebuilt by
            # FSDP's unpack hook), and the recompute must run the same ops as the forward
            chunk = x_parts[:, :, start:start + size].transpose(0, 1).reshape(-1, k)
            part = torch.mm(chunk, w.t()).view(tp, b, size, -1)  # [tp, b, l, n]
            out, work = reduce_scatter_stacked(part, group, async_op=True)
            pending.append((start, size, part, out, work))
        for start, size, _, out, work in pending:
            work.wait()
            y_shard[:, start:start + size] = out

        ctx.save_for_backward(x, w)
        ctx.group, ctx.chunks = group, chunks
        return y_shard

    @staticmethod
    def backward(ctx, grad_shard):
        x, w = ctx.saved_tensors
        tp = dist.get_world_size(ctx.group)
        b, seq, k = x.shape
        shard_len = seq // tp
        grad_full = grad_shard.new_empty(b, seq, w.shape[0])
        grad_x = x.new_empty(b, seq, k)
        gf_parts, gx_parts = grad_full.view(b, tp, shard_len, -1), grad_x.view(b, tp, shard_len, k)

        pending = []
        for start, size in _chunk_bounds(shard_len, ctx.chunks):
            gathered, work = all_gather_stacked(grad_shard[:, start:start + size].contiguous(), ctx.group,
                                                 async_op=True)
            pending.append((start, size, gathered, work))
        for start, size, gathered, work in pending:
            work.wait()
            gx_parts[:, :, start:start + size] = (gathered @ w).transpose(0, 1)
            gf_parts[:, :, start:start + size] = gathered.transpose(0, 1)
        grad_w = grad_full.flatten(0, -2).t() @ x.flatten(0, -2)
        return grad_x, grad_w, None, None


def column_linear_async(x_shard: Tensor, w: Tensor, group, chunks: int = 2) -> tuple[Tensor, Tensor]:
    """(all_gather_seq(x_shard) @ w.T, the gathered x), the gather overlapped with the matmul."""
    return _GatherThenLinear.apply(x_shard, w, group, chunks)


def row_linear_async(x: Tensor, w: Tensor, group, chunks: int = 2) -> Tensor:
    """reduce_scatter_seq(x @ w.T), the matmul overlapped with the reduce-scatter."""
    return _LinearThenReduceScatter.apply(x, w, group, chunks)


class SeqShardedInput:
    """What into_tp returns under async TP: the sequence shard, not yet gathered. It has the
    gathered `shape` (the blocks read h.shape) and nothing else, so any use other than
    ops.linear fails loudly. The first linear gathers it (overlapped) and keeps the gathered
    tensor; the region's other linears (wk, wv after wq; w3 after w1) reuse it."""

    def __init__(self, shard: Tensor, tp: int):
        self.shard, self.gathered = shard, None
        self.shape = torch.Size((shard.shape[0], shard.shape[1] * tp, *shard.shape[2:]))


class PendingRowLinear:
    """What ops.linear returns under async TP for a plain-tensor input (wo, w2: the row-parallel
    matmuls): the matmul is done by the out_of_tp that follows, fused with its reduce-scatter."""

    def __init__(self, x: Tensor, w: Tensor):
        self.x, self.w = x, w


def region_ops(group, chunks: int = 2) -> dict:
    """ops.into_tp, ops.linear and ops.out_of_tp of an async-TP region (see the docstring)."""
    tp = dist.get_world_size(group)

    def into_tp(x):
        return SeqShardedInput(x, tp)

    def linear(x, w):
        w = w.to((x.shard if isinstance(x, SeqShardedInput) else x).dtype)  # w may be an fp32 master
        if not isinstance(x, SeqShardedInput):
            return PendingRowLinear(x, w)
        if x.gathered is None:
            y, x.gathered = column_linear_async(x.shard, w, group, chunks)
            return y
        return F.linear(x.gathered, w)

    def out_of_tp(y):
        if isinstance(y, PendingRowLinear):
            return row_linear_async(y.x, y.w, group, chunks)
        return reduce_scatter_seq(y, group)

    return {"into_tp": into_tp, "linear": linear, "out_of_tp": out_of_tp}
