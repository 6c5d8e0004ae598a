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
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def block_mask(documents: Tensor):
    """FlexAttention's BlockMask of the same rule, built on the device (no host sync)."""
    create_block_mask, _ = _flex()

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    s = documents.shape[1]
    return create_block_mask(same_document_causal, B=documents.shape[0], H=None, Q_LEN=s, KV_LEN=s,
                             device=documents.device)


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
