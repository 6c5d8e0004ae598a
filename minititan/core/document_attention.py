"""Document masking: causal attention that starts afresh at every document inside a packed sequence.

A training sequence is cut from a stream of documents, so it usually holds the end of one, a few
whole ones and the start of another. With data.document_masking (as Llama 3 was trained) a token
attends only to the earlier tokens of its own document, and its RoPE position counts from its
document's first token, so every document is computed exactly as if it had been run alone.

The batch carries, per row, each token's document index (0, 1, ... within the row) and its
position inside its document (core/data.py). The model turns the document indices into a mask
once per forward (`Ops.document_mask`), and each layer's attention takes it (`Ops.attention(q, k,
v, mask)`):

    CPU (exact):  a boolean [b, 1, s, s] mask, causal AND same document, through SDPA
    CUDA:         FlexAttention with a BlockMask: blocks that lie wholly outside every document are
                  skipped, so the cost falls with the documents' lengths (benchmarks/
                  document_attention_micro.py measures it against SDPA with a dense mask and the
                  varlen kernel)
    context parallel: the document indices themselves; the ring attends block by block with the
                  mask of each pair of chunks (collectives/ring_attention.py)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def dense_mask(documents: Tensor) -> Tensor:
    """[b, s] document indices -> [b, 1, s, s] bool: query i may see key j (j <= i, same document)."""
    s = documents.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=documents.device).tril()
    return (documents[:, :, None] == documents[:, None, :]).logical_and_(causal)[:, None]


@functools.lru_cache
def _flex():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    return BlockMask, torch.compile(flex_attention, dynamic=False)


BLOCK = 128  # FlexAttention's default block: the mask says, per 128 x 128 tile, skip / compute / compute unmasked


def block_mask(documents: Tensor):
    """FlexAttention's BlockMask of the same rule, built on the device (no host sync) from the blocks'
    first and last document: the indices grow along a row, so that is all a tile needs.

      kv tile k, query tile q (k <= q) holds a visible pair  iff  last doc of k >= first doc of q
      (k < q) every pair is visible ("full", no mask_mod)      iff  first doc of k == last doc of q

    A tile cut short by the sequence's end is never full. This is what create_block_mask computes
    by evaluating the rule at every one of the s x s positions; here it costs a few ops on
    [batch, s / 128] tensors."""
    BlockMask, _ = _flex()
    b, s = documents.shape
    starts = torch.arange(0, s, BLOCK, device=documents.device)
    ends = (starts + BLOCK).clamp_max(s) - 1
    first, last = documents[:, starts], documents[:, ends]  # [b, tiles]
    whole = ends - starts == BLOCK - 1
    q, k = starts[:, None] // BLOCK, starts[None, :] // BLOCK
    visible = (k <= q) & (last[:, None, :] >= first[:, :, None])  # [b, q tile, kv tile]
    full = (k < q) & (first[:, None, :] == last[:, :, None]) & (whole[:, None] & whole[None, :])
    partial = visible & ~full

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=same_document_causal, seq_lengths=(s, s))


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """[b, q tiles, kv tiles] bool -> per query tile, how many kv tiles and which (those first, in
    order), with the head dim FlexAttention expects: [b, 1, q], [b, 1, q, kv] int32."""
    tiles = tiles.to(torch.int32)[:, None]
    return (tiles.sum(-1, dtype=torch.int32),
            torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32))


def document_mask(documents: Tensor):
    """Ops.document_mask for one device: a BlockMask on CUDA, a dense mask elsewhere."""
    return block_mask(documents) if documents.is_cuda else dense_mask(documents)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q [b, hq, s, d], k/v [b, hkv, s, d] under a document mask (dense bool, or a BlockMask)."""
    if not isinstance(mask, Tensor):
        return _flex()[1](q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
