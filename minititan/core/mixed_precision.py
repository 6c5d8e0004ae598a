"""fp32 master weights, bf16 matmuls: a linear whose weight gradient comes out in fp32, an
embedding that casts only the rows it looks up, and casts shared by a step's micro-batches.

The optimizer keeps every weight in fp32 and the matmuls run in bf16. Cast each weight before its
block (w.to(bf16)) and autograd's backward of that cast costs one more pass over every weight
gradient: the weight-gradient GEMM writes dw in bf16, then a copy kernel reads it and writes the
fp32 gradient the optimizer wants (2 + 2 + 4 bytes per weight element, every step, and the copy is
strided where the GEMM's output is transposed). cuBLAS accumulates in fp32 anyway, so asking it
for an fp32 result writes the fp32 gradient directly (4 bytes) and the copy disappears.

`linear(x, w)` is the layouts' Ops.linear: with w in x's dtype it is F.linear; with a wider w (the
fp32 master) it casts w itself and writes dw in w's dtype. The layout's gather then hands the
linear weights over uncast (see layout/parallelize.base_ops).

Two spellings of the same op. Eager, an autograd.Function (the cheapest call). Compiled, a
torch.library custom op: the compiler sees it as one node of the graph, which activation
checkpointing may recompute like any other, whereas the saved tensors of an autograd.Function
traced inside a checkpointed block are kept for backward whatever the policy says (torch 2.11:
under full AC that kept every linear's input of every layer, benchmarks/single_gpu.md). The cast
stays outside the op, an ordinary node of the graph that the op takes as an input: without
checkpointing the compiler keeps the cast weight for backward (the partitioner does not recompute
what backward must write out for a matmul), and selective AC, which keeps the op's output,
recomputes the cast in backward like any cheap element-wise op, instead of holding a bf16 copy of
every block's weights from forward to backward.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x [..., K] @ w[N, K].T in x's dtype; the gradient of w comes back in w's own dtype."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    if torch.compiler.is_compiling():
        return master_linear(x, w, w.detach().to(x.dtype))
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
        return linear_backward(dy, x, w_low, ctx.w_dtype)


@torch.library.custom_op("minititan::master_linear", mutates_args=())
def master_linear(x: Tensor, w: Tensor, w_low: Tensor) -> Tensor:
    """x @ w_low.T with w_low = w cast to x's dtype: MasterWeightLinear as one op the compiler can
    recompute. w comes in for its gradient only."""
    return F.linear(x, w_low)


@master_linear.register_fake
def _(x: Tensor, w: Tensor, w_low: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _save_for_master_linear_backward(ctx, inputs, output):
    x, w, w_low = inputs
    ctx.save_for_backward(x, w_low)
    ctx.w_dtype = w.dtype


def _master_linear_backward(ctx, dy: Tensor):
    x, w_low = ctx.saved_tensors
    return *linear_backward(dy, x, w_low, ctx.w_dtype), None


master_linear.register_autograd(_master_linear_backward, setup_context=_save_for_master_linear_backward)


def linear_backward(dy: Tensor, x: Tensor, w_low: Tensor, w_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dx, dw) of y = x @ w_low.T, dw in w_dtype."""
    dx = dy @ w_low
    dw = weight_grad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), w_dtype)
    return dx, dw


def weight_grad(dy: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """dy.T @ x for 2-D dy [M, N], x [M, K], as a `dtype` [N, K] tensor. On CUDA the GEMM writes
    `dtype` itself (torch.mm's out_dtype: bf16/fp16 operands, fp32 result); the CPU has no such
    kernel, so there the product is cast."""
    if dy.is_cuda:
        return torch.mm(dy.t(), x, out_dtype=dtype)
    return (dy.t() @ x).to(dtype)


def embedding(tokens: Tensor, w: Tensor, dtype: torch.dtype) -> Tensor:
    """The table's rows for `tokens`, in `dtype`: looked up in w's own dtype (the fp32 master), then
    cast. Casting the whole table first, as the gather casts the other tensors, would read and write
    every row each forward and cast the whole table's gradient back to fp32 in backward; here the
    cast touches only the rows looked up, and the lookup's backward writes the fp32 gradient itself."""
    return F.embedding(tokens, w).to(dtype)


def caster(dtype: torch.dtype, casts: StepCasts | None) -> Callable[[Tensor], Tensor]:
    """t -> t in `dtype`: through `casts` (one copy a step) when given, else a plain cast."""
    return casts.cast if casts is not None else functools.partial(Tensor.to, dtype=dtype)


class StepCasts:
    """The compute-dtype copies of fp32 masters, made once per optimizer step and shared by its
    micro-batches, for the tensors the gather casts (norms, and above all the MoE experts, whose
    total parameters are many times what a token uses).

    Cast in every micro-batch, a master costs a cast forward (4 + 2 bytes a parameter), and in
    backward autograd's cast of the bf16 gradient to fp32 (2 + 4) and its sum into .grad (4 + 4 + 4).
    Here the copy is a leaf made at the step's first use; each micro-batch's bf16 gradient lands in
    the leaf and a hook adds it straight into the master's fp32 .grad (2 + 4 + 4), the same sums in
    the same order, so the gradients are bit for bit those of the per-micro-batch casts. A copy is
    remade when its master changes (the optimizer's in-place update bumps the master's version), and
    `clear` drops them all once the step's gradients are complete.

    Autograd never reaches the master, so its AccumulateGrad and the post-accumulate hooks that
    follow it never run: the copy's hook does both (_add_into_master). The master's hooks then fire
    when its gradient of the micro-batch is complete, as without the copy, and data parallel's
    bucketed all-reduce, which listens to them, still starts each bucket inside the last
    micro-batch's backward."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.copies: dict[int, tuple[Tensor, int, Tensor]] = {}  # id(master) -> (master, its version, copy)

    def cast(self, master: Tensor) -> Tensor:
        held, version, copy = self.copies.get(id(master), (None, None, None))
        if held is not master or version != master._version:
            copy = master.detach().to(self.dtype).requires_grad_(master.requires_grad)
            if master.requires_grad:
                copy.register_post_accumulate_grad_hook(functools.partial(_add_into_master, master))
            self.copies[id(master)] = (master, master._version, copy)
        return copy

    def clear(self) -> None:
        self.copies.clear()


def _add_into_master(master: Tensor, copy: Tensor) -> None:
    """The copy's post-accumulate hook: what autograd would have done had the gradient reached the
    master. Add it into master.grad, then run the master's own post-accumulate hooks (torch keeps
    them in this dict and calls them with the tensor; its FSDP2 runs them the same way for the
    gradients it writes itself)."""
    if master.grad is None:
        master.grad = copy.grad.to(master.dtype)
    else:
        master.grad.add_(copy.grad)
    copy.grad = None
    for hook in (master._post_accumulate_grad_hooks or {}).values():
        hook(master)
