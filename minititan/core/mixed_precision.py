"""fp32 master weights, bf16 matmuls: a linear whose weight gradient comes out in fp32.

The optimizer keeps every weight in fp32 and the matmuls run in bf16. Cast each weight before its
block (w.to(bf16)) and autograd's backward of that cast costs one more pass over every weight
gradient: the weight-gradient GEMM writes dw in bf16, then a copy kernel reads it and writes the
fp32 gradient the optimizer wants (2 + 2 + 4 bytes per weight element, every step, and the copy is
strided where the GEMM's output is transposed). cuBLAS accumulates in fp32 anyway, so asking it
for an fp32 result writes the fp32 gradient directly (4 bytes) and the copy disappears.

`linear(x, w)` is the layouts' Ops.linear: with w in x's dtype it is F.linear; with a wider w (the
fp32 master) it casts w itself and writes dw in w's dtype. The layout's gather then hands the
linear weights over uncast (see parallelize.base_ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ w[N, K].T in x's dtype; the gradient of w comes back in w's own dtype."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    return MasterWeightLinear.apply(x, w)


class MasterWeightLinear(torch.autograd.Function):
    """y = x @ w.to(x.dtype).T; dw = dy.T @ x written in w's dtype by the GEMM itself."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        w_low = w.to(x.dtype)
        ctx.save_for_backward(x, w_low)
        ctx.w_dtype = w.dtype
        return F.linear(x, w_low)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w_low = ctx.saved_tensors
        dx = dy @ w_low
        dw = weight_grad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), ctx.w_dtype)
        return dx, dw


def weight_grad(dy: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """dy.T @ x for 2-D dy [M, N], x [M, K], as a `dtype` [N, K] tensor. On CUDA the GEMM writes
    `dtype` itself (torch.mm's out_dtype: bf16/fp16 operands, fp32 result); the CPU has no such
    kernel, so there the product is cast."""
    if dy.is_cuda:
        return torch.mm(dy.t(), x, out_dtype=dtype)
    return (dy.t() @ x).to(dtype)
