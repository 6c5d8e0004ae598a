"""Document-masked attention at Llama 3 8B shapes on one GPU: which kernel is fastest, and exact?

    python benchmarks/document_attention_micro.py [OUT_DIR] [--seq 8192] [--mean-doc 1024,4096]

Forward + backward of one attention layer, bf16, batch 1, 32 query heads, 8 kv heads, head dim
128, the sequence packed with documents of random lengths (mean --mean-doc tokens), each variant:

    sdpa_causal       F.scaled_dot_product_attention(is_causal) with cuDNN first: no document mask,
                      the speed to beat (what training without data.document_masking runs)
    sdpa_dense_mask   SDPA with a [1, 1, s, s] boolean mask (the memory-efficient kernel)
    flex_block_mask   compiled FlexAttention with a document BlockMask (what minititan runs on CUDA),
                      and the mask's build time on its own: minititan's (block_mask) and torch's
                      create_block_mask, eager and compiled, which build the same mask
    varlen            torch.nn.attention.varlen.varlen_attn over the documents as separate
                      sequences (flash varlen), where this torch has it

Each masked variant's output and input gradients are compared with sdpa_dense_mask (max abs
difference, bf16). Prints one JSON line per row and writes them to OUT_DIR/document_attention.jsonl.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minititan.core.document_attention import block_mask, dense_mask, masked_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128


def documents_of(seq: int, mean: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < seq:
        n = min(seq - total, max(1, int(torch.empty(1).exponential_(1 / mean, generator=g))))
        lengths.append(n)
        total += n
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return documents.cuda(), lengths


def timed(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def create_block_mask_of(documents: torch.Tensor, compiled: bool):
    """The same BlockMask built the way the trainer did before (torch's create_block_mask, which
    evaluates the rule at every position), eagerly or through its compiled path: the A/B of the
    build from the tiles' first and last documents (core/document_attention.block_mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])
    s = documents.shape[1]
    return create_block_mask(same_document_causal, B=documents.shape[0], H=None, Q_LEN=s, KV_LEN=s,
                             device=documents.device, _compile=compiled)


def varlen_fn(lengths: list[int]):
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    longest = max(lengths)
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def run(q, k, v):  # [1, h, s, d] -> the varlen layout [s, h, d] and back
        q1, k1, v1 = (t[0].transpose(0, 1) for t in (q, k, v))
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            k1, v1 = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k1, v1))
        return varlen_attn(q1, k1, v1, cu, cu, longest, longest, **causal).transpose(0, 1)[None]
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=".")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--mean-doc", default="1024,4096")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, args.seq, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, HKV, args.seq, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    dout = torch.randn_like(q)

    def fwd_bwd(attention):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = attention(*leaves)
        o.backward(dout)
        return o.detach(), [t.grad for t in leaves]

    def causal(q_, k_, v_):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    rows.append({"variant": "sdpa_causal", "mean_doc": None, "ms": timed(lambda: fwd_bwd(causal))})
    for mean in [int(m) for m in args.mean_doc.split(",")]:
        documents, lengths = documents_of(args.seq, mean)
        dense = dense_mask(documents)
        ref_out, ref_grads = fwd_bwd(lambda *t: masked_attention(*t, dense))
        variants = {"sdpa_dense_mask": lambda: (lambda *t: masked_attention(*t, dense)),
                    "flex_block_mask": lambda: (lambda *t, m=block_mask(documents): masked_attention(*t, m)),
                    "varlen": lambda: varlen_fn(lengths)}
        for name, make in variants.items():
            row = {"variant": name, "mean_doc": mean, "documents": len(lengths)}
            try:
                attention = make()
                got_out, got_grads = fwd_bwd(attention)
                row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in
                                          zip([got_out] + got_grads, [ref_out] + ref_grads))
                row["ms"] = timed(lambda: fwd_bwd(attention))
                if name == "flex_block_mask":
                    row["mask_build_ms"] = timed(lambda: block_mask(documents))
                    for key, compiled in (("mask_build_create_block_mask_ms", False),
                                          ("mask_build_create_block_mask_compiled_ms", True)):
                        try:  # the builds to compare with; a failure must not hide the row above
                            row[key] = timed(lambda: create_block_mask_of(documents, compiled))
                        except Exception as e:
                            row[key.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            except Exception as e:  # a kernel this torch or GPU lacks: say so in the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    with open(out / "document_attention.jsonl", "w") as f:
        for r in rows:
            r |= {"seq": args.seq, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
