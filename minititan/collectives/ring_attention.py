"""Context parallelism: causal attention over a sequence that is split across the ranks of a cp group.

Every other layer of a transformer treats tokens independently, so a long sequence can be cut
into pieces, one per rank, and only attention has to look across the cut. This file does that:

    tokens = shard_sequence(tokens, cp_rank, cp_size)            # and labels: [b, s] -> [b, s / cp]
    positions = shard_positions(seq_len, cp_rank, cp_size)      # their global positions, for RoPE
    out = context_parallel_attention(q, k, v, cp_group, rotate="ring")  # in place of causal attention

* Layout. The sequence is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r (one from
  the head, one from the tail). Under a causal mask late tokens attend to more keys than early
  ones; pairing a head chunk with a tail chunk gives every rank the same amount of work.
* "ring": the K/V shards travel around the ring, one hop per step, while each rank attends its
  queries to the block it holds (the send of the next block overlaps that compute). The partial
  results merge exactly by their log-sum-exp (the online softmax of flash attention). The
  backward sends K/V around again, and their gradients travel with them until they reach home.
* "allgather": gather all of K/V once, attend, and reduce-scatter the K/V gradients. More memory
  for a moment, fewer and larger messages.

Grouped-query attention: K/V travel with their own (fewer) heads; each rank repeats them for its
query heads only right before the kernel, and sums the gradient over each group of query heads.

Documents: with `documents` (each token's document index in its row, [b, s_local], sharded like
the tokens) a query sees only keys of its own document. The document indices travel with K/V, and
each block is masked by "same document" (and causal on the diagonal); a query row that sees no key
of a block gets nothing from it (out 0, log-sum-exp -inf, which the merge ignores). Every row sees
itself in the first block (the diagonal), so the merged log-sum-exp is always finite. Masked blocks
run on the plain-math kernel (exact, but it materializes the block's scores).

Blocks run on the attention kernels that also return the log-sum-exp: flash attention on CUDA
(bf16/fp16), PyTorch's flash kernel on CPU (any float dtype), and a plain-math version for the
rest (fp32 on CUDA, which flash does not support: exact, but it materializes the block's scores).
Only torch and the sibling mesh.py are needed, so this file can be copied. docs/context_parallel.md
has the math.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .mesh import all_gather_single, reduce_scatter_single

ROTATE_MODES = ("ring", "allgather")


# ---------------------------------------------------------------- the load-balanced layout


def check_divisible(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * cp = {2 * cp_size}: context parallelism cuts the "
            f"sequence into 2 * cp chunks to balance the causal mask; make training.seq_len a multiple of "
            f"{2 * cp_size} (or change parallelism.cp)")


def shard_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks (of 2 * cp_size) that a rank keeps: one from the head, its mirror from the tail."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def shard_sequence(x: Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> Tensor:
    """This rank's load-balanced part of x along dim (tokens and labels [b, s], hidden [b, s, d])."""
    check_divisible(x.shape[dim], cp_size)
    chunks = x.chunk(2 * cp_size, dim)
    head, tail = shard_chunks(cp_rank, cp_size)
    return torch.cat([chunks[head], chunks[tail]], dim)


def shard_positions(seq_len: int, cp_rank: int, cp_size: int, device: str | torch.device | None = None) -> Tensor:
    """Global positions of this rank's tokens, for RoPE: shard_sequence applied to arange(seq_len)."""
    return shard_sequence(torch.arange(seq_len, device=device), cp_rank, cp_size, dim=0)


def unshard_sequence(shards: list[Tensor], dim: int = 1) -> Tensor:
    """The inverse: every rank's shard, in cp-rank order -> the sequence in its original order.
    Chunk i < cp is the head of shard i; chunk 2*cp-1-i is the tail of shard i."""
    heads, tails = zip(*(shard.chunk(2, dim) for shard in shards))
    return torch.cat(heads + tails[::-1], dim)


# ---------------------------------------------------------------- attention on one block, with its log-sum-exp


def expand_kv(x: Tensor, n_q_heads: int) -> Tensor:
    """[b, hkv, s, d] -> [b, hq, s, d]: query head i reads kv head i // (hq / hkv)."""
    rep = n_q_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def reduce_kv_grad(dx: Tensor, n_kv_heads: int) -> Tensor:
    """The gradient of expand_kv: sum over each group of query heads."""
    return dx if dx.shape[1] == n_kv_heads else dx.unflatten(1, (n_kv_heads, -1)).sum(2)


def uses_cuda_flash(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def block_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool,
                    allowed: Tensor | None = None) -> tuple[Tensor, Tensor, tuple]:
    """softmax(q k^T / sqrt(d)) v over one block of keys -> (out, lse [b, hq, s_q] fp32, rng).
    A causal block has s_q == s_k and is masked on the diagonal. k/v may have fewer heads.
    allowed: [b, 1, s_q, s_k] bool, which keys each query may see (documents), or None.
    rng is what the CUDA flash backward wants back from its forward (unused without dropout)."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if allowed is not None:
        return (*math_attention(q, k, v, causal, allowed), ())
    if uses_cuda_flash(q):
        out, lse, _, _, _, _, rng_a, rng_b, _ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        return out, lse, (rng_a, rng_b)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
        return out, lse, ()
    return (*math_attention(q, k, v, causal), ())


def block_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             causal: bool, rng: tuple, allowed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block, given the *final* out and lse of these query rows (see the docs:
    with those, a block's softmax probabilities are the exact global ones)."""
    n_kv_heads = k.shape[1]
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    if allowed is not None:
        dq, dk, dv = math_attention_backward(dout, q, k, v, out, lse, causal, allowed)
    elif uses_cuda_flash(q):
        s_q, s_k = q.shape[2], k.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, s_q, s_k, 0.0, causal, *rng)
    elif q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal)
    else:
        dq, dk, dv = math_attention_backward(dout, q, k, v, out, lse, causal)
    return dq, reduce_kv_grad(dk, n_kv_heads), reduce_kv_grad(dv, n_kv_heads)


def math_scores(q: Tensor, k: Tensor, causal: bool, allowed: Tensor | None = None) -> Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        above_diagonal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above_diagonal, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def math_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    scores = math_scores(q, k, causal, allowed)
    lse = scores.logsumexp(-1)  # -inf for a row that sees no key of this block: its probabilities are 0
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return (probs @ v.float()).to(q.dtype), lse


def math_attention_backward(dout, q, k, v, out, lse, causal, allowed=None) -> tuple[Tensor, Tensor, Tensor]:
    """P = exp(S - lse); dV = P^T dO; dS = P * (dO V^T - rowsum(dO * O)); dQ = dS K / sqrt(d); dK = dS^T Q / sqrt(d)."""
    probs = torch.exp(math_scores(q, k, causal, allowed) - lse[..., None])
    dout = dout.float()
    dv = probs.transpose(-1, -2) @ dout
    dscores = probs * (dout @ v.float().transpose(-1, -2) - (dout * out.float()).sum(-1, keepdim=True))
    dscores = dscores * q.shape[-1] ** -0.5
    return (dscores @ k.float()).to(q.dtype), (dscores.transpose(-1, -2) @ q.float()).to(k.dtype), dv.to(v.dtype)


def merge_into(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """Fold one block's (out, lse) into the running fp32 (out, lse) of the same rows, in place:
    each side is weighted by its share of the combined softmax denominator."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse)[..., None]).add_(block_out.float() * torch.exp(block_lse - new_lse)[..., None])
    lse.copy_(new_lse)


def empty_accumulators(q: Tensor) -> tuple[Tensor, Tensor]:
    """out = 0, lse = -inf: the state before any key was seen (merging a block into it gives the block).
    zeros_like keeps q's memory layout, so the model's transpose back is free."""
    out = torch.zeros_like(q, dtype=torch.float32)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def rows(x: Tensor, part: slice) -> Tensor:
    """A range of sequence positions of a [..., s, d] tensor."""
    return x[..., part, :]


# ---------------------------------------------------------------- ring: K/V travel, one hop per step


def ring_block(rank: int, source: int, half: int) -> tuple[slice, slice, bool]:
    """Which of this rank's query rows meet which rows of the K/V shard of rank `source`, and if causal.
    Rank r holds chunks (r, 2cp-1-r), the visitor (src, 2cp-1-src):
      src == r: the two chunks against themselves, in order: plain causal attention on the shard;
      src <  r: both query chunks see the visitor's head chunk whole, its tail (after ours) not at all;
      src >  r: our tail chunk sees both visitor chunks whole, our head chunk (before both) nothing.
    Each case is 2 * half^2 query-key pairs of work (the diagonal counts its half-masked blocks)."""
    if source == rank:
        return slice(None), slice(None), True
    if source < rank:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def ring_shift(x: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, list]:
    """Start sending x to the next rank of the ring and receiving the previous rank's x."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group)]
    return received, dist.batch_isend_irecv(ops)


def wait(works: list) -> None:
    for work in works:
        work.wait()  # on CUDA: the compute stream waits for NCCL's, the host does not


def allowed_keys(q_docs: Tensor | None, k_docs: Tensor | None) -> Tensor | None:
    """[b, 1, s_q, s_k] bool: each query may see the keys of its own document (None: all of them)."""
    return None if q_docs is None else (q_docs[:, :, None] == k_docs[:, None, :])[:, None]


def part(docs: Tensor | None, which: slice) -> Tensor | None:
    """Some sequence positions of [b, s] document indices (None stays None)."""
    return None if docs is None else docs[:, which]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, docs: Tensor | None):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        half = q.shape[2] // 2
        out, lse = empty_accumulators(q)
        kv, kv_docs = torch.stack([k, v]), docs  # one message per hop (and the documents of its tokens)
        rng = ()
        for step in range(size):
            if step + 1 < size:
                next_kv, works = ring_shift(kv, group)  # in flight while we compute on kv
                if docs is not None:
                    next_docs, doc_works = ring_shift(kv_docs, group)
                    works += doc_works
            q_part, kv_part, causal = ring_block(rank, (rank - step) % size, half)
            block_out, block_lse, rng = block_attention(
                rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part), causal,
                allowed_keys(part(docs, q_part), part(kv_docs, kv_part)))
            merge_into(rows(out, q_part), lse[..., q_part], block_out, block_lse)
            if step + 1 < size:
                wait(works)
                kv, kv_docs = next_kv, next_docs if docs is not None else None
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, docs)
        ctx.group, ctx.rng = group, rng
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, docs = ctx.saved_tensors
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        half = q.shape[2] // 2
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv, kv_docs = torch.stack([k, v]), docs
        dkv = torch.zeros_like(kv, dtype=torch.float32)  # fp32: it sums one term per rank on the way
        for step in range(size):
            if step + 1 < size:
                next_kv, kv_works = ring_shift(kv, group)
                if docs is not None:
                    next_docs, doc_works = ring_shift(kv_docs, group)
                    kv_works += doc_works
            q_part, kv_part, causal = ring_block(rank, (rank - step) % size, half)
            block_dq, block_dk, block_dv = block_attention_backward(
                rows(dout, q_part), rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part),
                rows(out, q_part), lse[..., q_part].contiguous(), causal, ctx.rng,
                allowed_keys(part(docs, q_part), part(kv_docs, kv_part)))
            rows(dq, q_part).add_(block_dq)
            if step > 0:  # the gradient of the visiting K/V, summed by the ranks it visited before
                wait(dkv_works)
                dkv = next_dkv
            rows(dkv[0], kv_part).add_(block_dk)
            rows(dkv[1], kv_part).add_(block_dv)
            if size > 1:
                next_dkv, dkv_works = ring_shift(dkv, group)  # follows its K/V one hop behind
            if step + 1 < size:
                wait(kv_works)
                kv, kv_docs = next_kv, next_docs if docs is not None else None
        if size > 1:  # the last hop brings this rank's own dK/dV home, summed over every rank
            wait(dkv_works)
            dkv = next_dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


# ---------------------------------------------------------------- all-gather: all of K/V at once


def allgather_blocks(rank: int, size: int, half: int) -> list[tuple[slice, slice, bool]]:
    """(query rows, rows of the whole sequence's K/V, causal) for this rank's two chunks: each
    chunk against itself (causal) and against every chunk before it (whole)."""
    blocks = []
    for q_part, chunk in zip((slice(0, half), slice(half, None)), shard_chunks(rank, size)):
        start = chunk * half
        blocks.append((q_part, slice(start, start + half), True))
        if chunk > 0:
            blocks.append((q_part, slice(0, start), False))
    return blocks


def gather_sequence(kv: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's [2, b, h, s_local, d] shard -> [2, b, h, s, d] in the original token order."""
    size = dist.get_world_size(group)
    gathered = torch.empty((size * kv.shape[0], *kv.shape[1:]), dtype=kv.dtype, device=kv.device)
    all_gather_single(gathered, kv, group=group)  # the shards, concatenated along dim 0
    return unshard_sequence(list(gathered.chunk(size)), dim=3)


def gather_documents(docs: Tensor | None, group: dist.ProcessGroup) -> Tensor | None:
    """Every rank's [b, s_local] document indices -> [b, s] in the original token order."""
    if docs is None:
        return None
    return gather_sequence(docs[None, :, None, :, None], group)[0, :, 0, :, 0]


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, docs: Tensor | None):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        kv, kv_docs = gather_sequence(torch.stack([k, v]), group), gather_documents(docs, group)
        out, lse = empty_accumulators(q)
        rng = ()
        for q_part, kv_part, causal in allgather_blocks(rank, size, q.shape[2] // 2):
            block_out, block_lse, rng = block_attention(
                rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part), causal,
                allowed_keys(part(docs, q_part), part(kv_docs, kv_part)))
            merge_into(rows(out, q_part), lse[..., q_part], block_out, block_lse)
        out = out.to(q.dtype)
        # keep only the local shards: the backward gathers again rather than hold the whole sequence
        ctx.save_for_backward(q, k, v, out, lse, docs)
        ctx.group, ctx.rng = group, rng
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, docs = ctx.saved_tensors
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        kv, kv_docs = gather_sequence(torch.stack([k, v]), group), gather_documents(docs, group)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dkv = torch.zeros_like(kv, dtype=torch.float32)
        for q_part, kv_part, causal in allgather_blocks(rank, size, q.shape[2] // 2):
            block_dq, block_dk, block_dv = block_attention_backward(
                rows(dout, q_part), rows(q, q_part), rows(kv[0], kv_part), rows(kv[1], kv_part),
                rows(out, q_part), lse[..., q_part].contiguous(), causal, ctx.rng,
                allowed_keys(part(docs, q_part), part(kv_docs, kv_part)))
            rows(dq, q_part).add_(block_dq)
            rows(dkv[0], kv_part).add_(block_dk)
            rows(dkv[1], kv_part).add_(block_dv)
        # every rank holds a partial dK/dV of the whole sequence: cut it into the ranks' shards and sum
        per_rank = torch.cat([shard_sequence(dkv, r, size, dim=3) for r in range(size)])  # rank r's part r-th
        mine = torch.empty_like(per_rank.chunk(size)[0])
        reduce_scatter_single(mine, per_rank, group=group)
        return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype), None, None


# ---------------------------------------------------------------- the entry point


@torch.compiler.disable  # communication inside: let a compiled block break around it
def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None,
                               rotate: str = "ring", mask: Tensor | None = None) -> Tensor:
    """Causal attention of this rank's load-balanced shard: q [b, hq, s_local, d] and k/v
    [b, hkv, s_local, d] (hq a multiple of hkv) -> [b, hq, s_local, d], equal to full causal
    attention over the whole sequence, sliced to this rank's tokens. mask: None, or each token's
    document index in its row, [b, s_local] (sharded like the tokens): attention stays inside documents.
    Drop-in for model.Ops.attention: functools.partial(context_parallel_attention, group=cp_group)."""
    if rotate not in ROTATE_MODES:
        raise ValueError(f"parallelism.cp_rotate = {rotate!r} is not one of {ROTATE_MODES}: pick one of those")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads: "
                         f"make model.n_heads a multiple of model.n_kv_heads")
    if q.shape[2] % 2:
        raise ValueError(f"a context-parallel shard holds two equal chunks, but it has {q.shape[2]} tokens: "
                         f"shard the sequence with shard_sequence (seq_len a multiple of 2 * cp)")
    group = dist.group.WORLD if group is None else group
    attention = RingAttention if rotate == "ring" else AllGatherAttention
    return attention.apply(q, k, v, group, mask)
