"""Float8 grouped GEMM for the routed experts: y[rows of e] = x[rows of e] @ w[e].T in e4m3 with rowwise scales.

torch._scaled_grouped_mm (Hopper, torch >= 2.8) multiplies fp8 operands group by group and scales the
result by one fp32 factor per row of the left operand and one per output column of each expert:

    forward     y = x @ w[e].T       x: one scale per token row (amax over dim);
                                     w[e]: one scale per output feature (amax over dim), per expert
    grad of x   dx = dy @ w[e]       dy: one scale per row; w[e].T: one per input feature, per expert
    grad of w   dw[e] = dy_e.T @ x_e bf16 (torch._grouped_mm): its contracted dim is the tokens of
                                     one expert, which rowwise scales cannot follow

So two of the three GEMMs of each projection run in fp8; the weight gradient stays bf16, as the
dense Float8 linears keep nothing else in high precision. The fp8 copies are cast on the fly each call
(the experts' weights change every step), and the amaxes are `aten.amax` so that selective activation
checkpointing keeps them, as it does for the dense Float8 linears.

Layouts the kernel asks for: the left operand row-major, the right one column-major per expert (the
transpose of a contiguous [E, N, K] tensor), every row stride a multiple of 16 bytes, offsets int32.
"""
from __future__ import annotations

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def to_fp8_rowwise(t: Tensor) -> tuple[Tensor, Tensor]:
    """t [..., K] -> (e4m3 values, the fp32 factor per row that turns them back into t: amax / 448)."""
    amax = torch.amax(t.abs(), dim=-1, keepdim=True).float().clamp_min(1e-12)
    values = (t.float() * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return values, (amax / E4M3_MAX).squeeze(-1)


def grouped_mm_fp8(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """a [M, K] (bf16, rows grouped by offs) times w [E, N, K] transposed per group -> [M, N] bf16."""
    return _Float8GroupedMM.apply(a, w, offs)


def _scaled(a: Tensor, b_rows: Tensor, offs: Tensor) -> Tensor:
    """a @ b_rows[e].T per group, both cast to fp8 here with rowwise scales (a per row, b_rows per row of each expert)."""
    a8, a_scale = to_fp8_rowwise(a)
    b8, b_scale = to_fp8_rowwise(b_rows)  # [E, N, K], contiguous: its transpose is column-major
    return torch._scaled_grouped_mm(a8, b8.transpose(-2, -1), a_scale, b_scale, offs=offs, out_dtype=torch.bfloat16)


class _Float8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(a, w, offs)
        return _scaled(a, w, offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, w, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = _scaled(grad, w.transpose(-2, -1).contiguous(), offs)  # dy @ w[e]: w[e].T's rows are w's columns
        grad_w = torch._grouped_mm(grad.t(), a, offs=offs)  # [E, N, K]: per expert dy_e.T @ a_e, in bf16
        return grad_a, grad_w.to(w.dtype), None
