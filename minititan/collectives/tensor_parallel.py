"""Tensor parallelism (Megatron-style): each block's matmuls split over the tp ranks of a group.

  * column-parallel matmuls (wq wk wv, w1 w3, the output head) keep a slice of the OUTPUT
    features: rank r has whole attention heads / a slice of the ffn hidden units / a slice of
    the vocabulary, and computes them from the full input;
  * row-parallel matmuls (wo, w2) keep the matching slice of the INPUT features, so each rank
    produces a partial sum of the full output.

Which weight is which is the model's to say (its tp plan: a dim per parameter name, 0 for
column-parallel and vocabulary rows, 1 for row-parallel, None for replicated); `shard_params`
cuts a full param dict by such a plan. A block needs exactly one collective on the way in and one
on the way out. The model calls them `ops.into_tp` (right after the norm) and `ops.out_of_tp`
(right after wo / w2):

                       plain TP                              sequence parallel (SP)
    between blocks     x full [b, s, d] on every rank        x sharded on seq: [b, s/tp, d]
    into_tp            identity      / all-reduce grad       all-gather seq / reduce-scatter grad
    out_of_tp          all-reduce    / identity grad         reduce-scatter seq / all-gather grad

(sequence_parallel.py holds SP's collectives, async_tp.py overlaps them with the matmuls.)

The embedding and the loss are vocabulary-parallel: rank r holds rows [r*V/tp, (r+1)*V/tp) of
`tok_embeddings` and `output`. The embedding looks up the tokens it owns and sums the partial
results over tp; the cross-entropy computes max, sum-exp and the target logit with all-reduces
over [tokens] vectors, never materialising the full [tokens, V] logits anywhere.

Everything here is plain torch.distributed collectives inside autograd Functions. A layout calls
`tp_ops` for the Ops entries and, under SP, `sum_in_place` for the gradients of the replicated
parameters (see docs/tensor_parallel.md). Only torch and the siblings mesh.py,
sequence_parallel.py and async_tp.py are needed, so the four can be copied together.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .async_tp import region_ops as async_region_ops
from .sequence_parallel import gather_seq, reduce_scatter_seq

IGNORE_INDEX = -100  # labels equal to this add nothing to the loss, as in F.cross_entropy


# ---------------------------------------------------------------- splitting the parameters


def shard_tensor(t: Tensor, dim: int | None, rank: int, size: int) -> Tensor:
    """Rank `rank`'s contiguous 1/size slice of `t` along `dim` (a new tensor); dim None = a copy of t."""
    if dim is None:
        return t.clone()
    if t.shape[dim] % size:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} into {size} equal parts along dim {dim}: "
                         f"check_tp_divisibility names the config value to change")
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).clone(memory_format=torch.contiguous_format)


def shard_params(params: Mapping[str, Tensor], plan: Callable[[str], int | None], rank: int,
                 size: int) -> dict[str, Tensor]:
    """This tp rank's slice of every parameter of a full (unsharded) param dict; plan(name) is the
    dim the parameter is split along (the model's tp plan), None for a replicated one."""
    return {name: shard_tensor(t, plan(name), rank, size) for name, t in params.items()}


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


# ---------------------------------------------------------------- entering and leaving a TP region


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.clone(memory_format=torch.contiguous_format)  # never reduce in place into a tensor autograd may hold
    dist.all_reduce(x, group=group)
    return x


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


def copy_to_tp(x: Tensor, group) -> Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group) -> Tensor:
    return _ReduceFromTP.apply(x, group)


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x_r (all-reduce), whose backward is the all-reduce of the gradient.

    Every rank r adds its own term J_r(y) of the same y to the objective, so for every rank q
    d(sum_r J_r)/d(x_q) = sum_r dJ_r/dy: the sum over ranks of each rank's gradient wrt y."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def sum_over_ranks(x: Tensor, group) -> Tensor:
    """A value every rank's loss reads, summed over the group, with its gradient summed too (the
    MoE layer's balance statistics of a sequence split over ranks)."""
    return _SumOverRanks.apply(x, group)


# ---------------------------------------------------------------- vocabulary-parallel embedding and loss


def vocab_parallel_embedding(tokens: Tensor, w_local: Tensor, group, sequence_parallel: bool,
                             lookup: Callable = F.embedding) -> Tensor:
    """tokens [b, s] (the same on every tp rank), w_local = this rank's rows of the table.
    Returns [b, s, d] on every rank (plain TP) or this rank's [b, s/tp, d] (SP).
    lookup(tokens, w): the local lookup, F.embedding or one that casts an fp32 master's rows (the
    sum over ranks then moves the compute dtype)."""
    start = dist.get_rank(group) * w_local.shape[0]
    local = tokens - start
    not_mine = (local < 0) | (local >= w_local.shape[0])
    partial = lookup(local.masked_fill(not_mine, 0), w_local).masked_fill(not_mine[..., None], 0)
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


# ---------------------------------------------------------------- the ops a layout plugs into the model


def tp_ops(group, sequence_parallel: bool = False, async_tp: bool = False, async_chunks: int = 2,
           lookup: Callable = F.embedding) -> dict[str, Callable]:
    """Entries for model.Ops: dataclasses.replace(ops, **tp_ops(group, ...)), with params from shard_params.
    Plain TP and SP return into_tp, out_of_tp, embedding, cross_entropy (ops.linear is untouched);
    async TP also returns linear, which must be used together with its into_tp / out_of_tp.
    lookup: the embedding's local lookup (the ops' embedding before tp: vocab_parallel_embedding)."""
    if async_tp and not sequence_parallel:
        raise ValueError("parallelism.async_tp overlaps the sequence-parallel all-gather and reduce-scatter with "
                         "the matmuls: set parallelism.sequence_parallel=true as well")
    if async_tp:
        ops = async_region_ops(group, async_chunks)
    elif sequence_parallel:
        ops = {"into_tp": lambda x: gather_seq(x, group), "out_of_tp": lambda y: reduce_scatter_seq(y, group)}
    else:
        ops = {"into_tp": lambda x: copy_to_tp(x, group), "out_of_tp": lambda y: reduce_from_tp(y, group)}
    into_tp = ops["into_tp"]

    def embedding(tokens, w_local):
        return vocab_parallel_embedding(tokens, w_local, group, sequence_parallel, lookup)

    def cross_entropy(h, w_out_local, labels, linear):
        # the head is column-parallel over the vocabulary: it enters the region like wq does
        # (under SP this gathers the sequence, so labels stay whole [b, s] on every rank)
        return vocab_parallel_cross_entropy(linear(into_tp(h), w_out_local), labels, group)

    return ops | {"embedding": embedding, "cross_entropy": cross_entropy}


# ---------------------------------------------------------------- gradients of replicated parameters


def sum_in_place(tensors: list[Tensor], group) -> None:
    """All-reduce (SUM) these tensors in place with one collective (they may be views into bigger ones).

    Sequence parallel calls it on the .grad of the replicated parameters (the norms): each rank
    applies them to its own slice of the sequence, so its gradient is the sum over that slice only;
    the full gradient is the sum over ranks. (Under plain TP every rank sees the whole sequence and
    the gradient is already whole: summing would multiply it by tp.) Once, after the last
    micro-batch's backward, before clipping."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # one collective for all the small vectors
    dist.all_reduce(flat, group=group)
    for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(summed.view_as(t))
