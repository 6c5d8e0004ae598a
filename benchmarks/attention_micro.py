"""Time causal attention forward+backward at Llama 3 8B shapes on one GPU, for each SDPA route."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

b, s, hq, hkv, d = 1, 8192, 32, 8, 128
q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal fwd (2 matmuls) + bwd (~2.5x)


def flash_gqa():
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def repeat(backend):
    def f():
        kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return f


def bench(f, n=20):
    for _ in range(3):
        f().sum().backward()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(n):
        f().sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


for name, f in [("flash+enable_gqa", flash_gqa), ("flash+repeat", repeat(SDPBackend.FLASH_ATTENTION)),
                ("cudnn+repeat", repeat(SDPBackend.CUDNN_ATTENTION))]:
    try:
        ms = bench(f)
        print(f"{name:18s} {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
    except Exception as e:
        print(f"{name:18s} failed: {str(e)[:100]}")


def cudnn_gqa():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def priority_compiled():
    from minititan.core.model import causal_attention
    return causal_attention(q, k, v)


for name, f in [("cudnn+enable_gqa", cudnn_gqa), ("model.causal_attention", priority_compiled),
                ("compiled model attn", torch.compile(priority_compiled))]:
    try:
        ms = bench(f)
        print(f"{name:18s} {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
    except Exception as e:
        print(f"{name:18s} failed: {str(e)[:300]}")
