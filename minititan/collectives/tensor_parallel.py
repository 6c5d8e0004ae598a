"""Tensor parallelism (Megatron-style), with optional sequence parallelism and async TP.

Each transformer block is split over the `tp` ranks of a process group:

  * column-parallel matmuls (wq wk wv, w1 w3, the output head) keep a slice of the OUTPUT
    features: rank r has whole attention heads / a slice of the ffn hidden units / a slice of
    the vocabulary, and computes them from the full input;
  * row-parallel matmuls (wo, w2) keep the matching slice of the INPUT features, so each rank
    produces a partial sum of the full output.

So a block needs exactly one collective on the way in and one on the way out. The model calls
them `ops.into_tp` (right after the norm) and `ops.out_of_tp` (right after wo / w2):

                       plain TP                              sequence parallel (SP)
    between blocks     x full [b, s, d] on every rank        x sharded on seq: [b, s/tp, d]
    into_tp            identity      / all-reduce grad       all-gather seq / reduce-scatter grad
    out_of_tp          all-reduce    / identity grad         reduce-scatter seq / all-gather grad

SP moves the same bytes as plain TP (an all-reduce is a reduce-scatter plus an all-gather) but
the norms, residual adds and the saved activations between blocks are 1/tp the size.

The embedding and the loss are vocabulary-parallel: rank r holds rows [r*V/tp, (r+1)*V/tp) of
`tok_embeddings` and `output`. The embedding looks up the tokens it owns and sums the partial
results over tp; the cross-entropy computes max, sum-exp and the target logit with all-reduces
over [tokens] vectors, never materialising the full [tokens, V] logits anywhere.

Async TP (sequence parallel only) overlaps the all-gather with the column matmul and the row
matmul with the reduce-scatter by cutting the sequence shard into chunks: the collectives of
chunk i+1 run on the process group's own stream (async_op=True) while chunk i is multiplied.

Everything here is plain torch.distributed collectives inside autograd Functions; the trainer
glue only calls `tp_ops`, `shard_params` and `allreduce_replicated_grads`
(see docs/tensor_parallel.md). Only torch is imported, so the file can be copied on its own.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# torch 2.13 renamed the single-tensor collectives (the old names now warn); torch 2.11 has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

IGNORE_INDEX = -100  # labels equal to this add nothing to the loss, as in F.cross_entropy


# ---------------------------------------------------------------- which parameter is split how

# Matched on the end of the name, so they work for full names ("layers.3.attention.wq") and for
# the names a unit sees ("attention.wq"); this file cannot import minititan.core to ask the model.
# Anything else (the norms, MoE routers and experts) is replicated on every tp rank.
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3",
                   "output", "tok_embeddings")  # split the output features: dim 0
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")  # split the input features: dim 1


def tp_shard_dim(name: str) -> int | None:
    """The dim a parameter is split along over tp ranks (0 or 1), or None if it is replicated."""
    def matches(key: str) -> bool:
        return name == key or name.endswith("." + key)
    if any(matches(k) for k in COLUMN_PARALLEL):
        return 0
    if any(matches(k) for k in ROW_PARALLEL):
        return 1
    return None


def shard_tensor(t: Tensor, dim: int | None, rank: int, size: int) -> Tensor:
    """Rank `rank`'s contiguous 1/size slice of `t` along `dim` (a new tensor); dim None = a copy of t."""
    if dim is None:
        return t.clone()
    if t.shape[dim] % size:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} into {size} equal parts along dim {dim}: "
                         f"check_tp_divisibility names the config value to change")
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).clone(memory_format=torch.contiguous_format)


def shard_params(params: Mapping[str, Tensor], rank: int, size: int) -> dict[str, Tensor]:
    """This tp rank's slice of every parameter of a full (unsharded) param dict."""
    return {name: shard_tensor(t, tp_shard_dim(name), rank, size) for name, t in params.items()}


def check_tp_divisibility(tp: int, n_heads: int, n_kv_heads: int, ffn_hidden_dim: int, vocab_size: int,
                          seq_len: int | None = None) -> None:
    """Raise a ValueError naming the config value to change if the model cannot be split tp ways.

    Every rank needs whole query heads AND whole key/value heads. Key/value heads are not
    replicated when n_kv_heads < tp (that would make wk/wv gradients partial over sub-groups
    of tp); choose tp <= n_kv_heads instead. `seq_len` is the sequence length one tp group
    sees (after context parallel); pass it only under sequence parallel."""
    checks = [("model.n_heads", n_heads, "each rank computes whole attention heads"),
              ("model.n_kv_heads", n_kv_heads, "each rank needs whole key/value heads; they are not replicated, "
                                               "so tp may not exceed n_kv_heads"),
              ("the feed-forward hidden dim", ffn_hidden_dim, "set by model.dim, ffn_dim_multiplier, multiple_of"),
              ("model.vocab_size", vocab_size, "the embedding and output head are split by vocabulary rows; "
                                               "pad the vocabulary")]
    if seq_len is not None:
        checks.append(("training.seq_len (per context-parallel rank)", seq_len,
                       "sequence parallel splits the sequence across tp ranks"))
    for what, value, why in checks:
        if value % tp:
            raise ValueError(f"{what}={value} is not divisible by parallelism.tp={tp} ({why}): "
                             f"choose a tp that divides {value}, or change {what}")


# ---------------------------------------------------------------- collectives along the sequence dim


def _all_gather_stacked(x: Tensor, group, async_op: bool = False):
    """Every rank's contiguous x, stacked in rank order: ([tp, *x.shape], the collective's Work)."""
    tp = dist.get_world_size(group)
    out = x.new_empty((tp * x.shape[0], *x.shape[1:]))  # gloo insists on dim 0 = tp * x's dim 0
    work = _all_gather_single(out, x, group=group, async_op=async_op)
    return out.unflatten(0, (tp, -1)), work


def _reduce_scatter_stacked(parts: Tensor, group, async_op: bool = False):
    """Contiguous [tp, ...] partial sums on each rank -> (this rank's [...] of the totals, Work)."""
    out = parts.new_empty(parts.shape[1:])
    work = _reduce_scatter_single(out, parts.flatten(0, 1), group=group, async_op=async_op)
    return out, work


def _all_gather_seq(x: Tensor, group) -> Tensor:
    """[b, s/tp, ...] on each rank -> [b, s, ...], rank 0's part first."""
    stacked, _ = _all_gather_stacked(x.contiguous(), group)  # [tp, b, s/tp, ...]
    return stacked.movedim(0, 1).flatten(1, 2)  # a copy unless b == 1


def _reduce_scatter_seq(x: Tensor, group) -> Tensor:
    """[b, s, ...] partial sums on each rank -> this rank's [b, s/tp, ...] of the total."""
    tp = dist.get_world_size(group)
    s = x.shape[1]
    if s % tp:
        raise ValueError(f"sequence length {s} is not divisible by tp={tp}: sequence parallel needs "
                         f"training.seq_len divisible by parallelism.tp")
    out, _ = _reduce_scatter_stacked(x.unflatten(1, (tp, s // tp)).movedim(1, 0).contiguous(), group)
    return out


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)  # never reduce in place into a tensor autograd may hold
    dist.all_reduce(x, group=group)
    return x


# ---------------------------------------------------------------- entering and leaving a TP region


class _CopyToTP(torch.autograd.Function):
    """Plain TP entry: the input is already whole on every rank; each rank's column matmul
    sends back only its heads' share of the input gradient, so the gradients are summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Plain TP exit: sum the row matmuls' partial outputs; the gradient is the same for every part."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


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


def copy_to_tp(x: Tensor, group) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_seq(x: Tensor, group) -> Tensor:
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: Tensor, group) -> Tensor:
    return _ReduceScatterSeq.apply(x, group)


# ---------------------------------------------------------------- vocabulary-parallel embedding and loss


def vocab_parallel_embedding(tokens: Tensor, w_local: Tensor, group, sequence_parallel: bool) -> Tensor:
    """tokens [b, s] (the same on every tp rank), w_local = this rank's rows of the table.
    Returns [b, s, d] on every rank (plain TP) or this rank's [b, s/tp, d] (SP)."""
    start = dist.get_rank(group) * w_local.shape[0]
    local = tokens - start
    not_mine = (local < 0) | (local >= w_local.shape[0])
    partial = F.embedding(local.masked_fill(not_mine, 0), w_local).masked_fill(not_mine[..., None], 0)
    return reduce_scatter_seq(partial, group) if sequence_parallel else reduce_from_tp(partial, group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits split by vocabulary over tp. Each rank holds [N, V/tp];
    reductions of [N]-sized vectors (the max; then sum of exp and the target's logit, stacked into
    one all-reduce) replace the full logits.
    Backward is local: d loss / d logits = softmax - onehot, for this rank's columns."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        n_local = logits.shape[-1]
        start = dist.get_rank(group) * n_local
        x = logits.flatten(0, -2).float()
        labels = labels.flatten()

        global_max = x.max(dim=-1).values  # subtracting any per-token constant is exact; the max keeps exp finite
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - global_max[:, None]

        local = labels - start
        valid = labels != IGNORE_INDEX
        mine = (local >= 0) & (local < n_local) & valid
        index = local.clamp(0, n_local - 1)[:, None]
        target = torch.where(mine, shifted.gather(1, index).squeeze(1), 0.0)

        exp = shifted.exp_()
        sums = torch.stack([exp.sum(dim=-1), target])  # one all-reduce for both
        dist.all_reduce(sums, group=group)
        sum_exp, target_logit = sums.unbind(0)
        loss = torch.where(valid, sum_exp.log() - target_logit, 0.0).sum()

        ctx.save_for_backward(exp.div_(sum_exp[:, None]), index, mine, valid)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, mine, valid = ctx.saved_tensors
        grad = softmax * (grad_loss * valid)[:, None]
        grad.scatter_add_(1, index, -(grad_loss * mine)[:, None].to(grad.dtype))
        return grad.to(ctx.logits_dtype).view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(logits_local: Tensor, labels: Tensor, group) -> Tensor:
    """Sum over tokens of cross-entropy; logits_local [..., V/tp] is this rank's vocabulary slice,
    labels [...] are full vocabulary ids (the same on every rank). Same value on every rank."""
    return _VocabParallelCrossEntropy.apply(logits_local, labels, group)


# ---------------------------------------------------------------- async TP: chunked, overlapped SP matmuls


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
            gathered, work = _all_gather_stacked(x_shard[:, start:start + size].contiguous(), group, async_op=True)
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
            out, work = _reduce_scatter_stacked(part, ctx.group, async_op=True)
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
            part = F.linear(x_parts[:, :, start:start + size].transpose(0, 1), w)  # [tp, b, l, n]
            out, work = _reduce_scatter_stacked(part, group, async_op=True)
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
            gathered, work = _all_gather_stacked(grad_shard[:, start:start + size].contiguous(), ctx.group,
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


# ---------------------------------------------------------------- the ops a layout plugs into the model


def tp_ops(group, sequence_parallel: bool = False, async_tp: bool = False, async_chunks: int = 2) -> dict[str, Callable]:
    """Entries for model.Ops: dataclasses.replace(ops, **tp_ops(group, ...)), with params from shard_params.
    Plain TP and SP return into_tp, out_of_tp, embedding, cross_entropy (ops.linear is untouched);
    async TP also returns linear, which must be used together with its into_tp / out_of_tp."""
    if async_tp and not sequence_parallel:
        raise ValueError("parallelism.async_tp overlaps the sequence-parallel all-gather and reduce-scatter with "
                         "the matmuls: set parallelism.sequence_parallel=true as well")
    tp = dist.get_world_size(group)

    if async_tp:
        def into_tp(x):
            return SeqShardedInput(x, tp)

        def linear(x, w):
            w = w.to((x.shard if isinstance(x, SeqShardedInput) else x).dtype)  # w may be an fp32 master
            if not isinstance(x, SeqShardedInput):
                return PendingRowLinear(x, w)
            if x.gathered is None:
                y, x.gathered = column_linear_async(x.shard, w, group, async_chunks)
                return y
            return F.linear(x.gathered, w)

        def out_of_tp(y):
            if isinstance(y, PendingRowLinear):
                return row_linear_async(y.x, y.w, group, async_chunks)
            return reduce_scatter_seq(y, group)
    elif sequence_parallel:
        def into_tp(x):
            return gather_seq(x, group)

        def out_of_tp(y):
            return reduce_scatter_seq(y, group)
    else:
        def into_tp(x):
            return copy_to_tp(x, group)

        def out_of_tp(y):
            return reduce_from_tp(y, group)

    def embedding(tokens, w_local):
        return vocab_parallel_embedding(tokens, w_local, group, sequence_parallel)

    def cross_entropy(h, w_out_local, labels, linear):
        # the head is column-parallel over the vocabulary: it enters the region like wq does
        # (under SP this gathers the sequence, so labels stay whole [b, s] on every rank)
        return vocab_parallel_cross_entropy(linear(into_tp(h), w_out_local), labels, group)

    ops = {"into_tp": into_tp, "out_of_tp": out_of_tp, "embedding": embedding, "cross_entropy": cross_entropy}
    if async_tp:
        ops["linear"] = linear
    return ops


# ---------------------------------------------------------------- gradients of replicated parameters


def allreduce_replicated_grads(params: Mapping[str, Tensor], group, names: Iterable[str] | None = None) -> None:
    """Sequence parallel only: sum the .grad of replicated parameters (the norms) over tp, in place.

    Under SP each rank applies the norms to its own slice of the sequence, so its norm-weight
    gradient is the sum over that slice only; the full gradient is the sum over ranks. (Under
    plain TP every rank sees the whole sequence and the gradient is already whole: don't call
    this there, it would multiply them by tp.) Call once after the last micro-batch's backward,
    before clipping. `names` defaults to every name whose tp_shard_dim is None."""
    if names is None:
        names = [n for n in params if tp_shard_dim(n) is None]
    grads = [params[n].grad for n in names if params[n].grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])  # one collective for all the small vectors
    dist.all_reduce(flat, group=group)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))
