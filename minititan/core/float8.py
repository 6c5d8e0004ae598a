"""Float8 training: y = x @ w.T with the forward GEMM and both backward GEMMs in fp8.

A linear layer runs three matmuls per step, all with fp32 accumulation:

    forward       y  = x  @ w.T      x [M, K], w [N, K]  ->  y  [M, N]
    input grad    dx = dy @ w        dy [M, N]           ->  dx [M, K]
    weight grad   dw = dy.T @ x                          ->  dw [N, K]

Each operand is cast to a float8 dtype right before its matmul, with a scale chosen from its
absolute maximum (amax) so the largest value lands at the top of the fp8 range:

    scale = fp8_max / amax        q = fp8(x * scale)        x ~= q / scale

torch._scaled_mm multiplies the fp8 operands and undoes both scales in its epilogue. Two recipes:

  * tensorwise: one scale per tensor. x and w in e4m3 (3 mantissa bits, normal values from 2**-6
    to 448); dy in e5m2 (2 mantissa bits, 2**-14 to 57344): one scale must cover every element
    of a gradient, whose values span many more orders of magnitude than weights or activations,
    and e5m2 trades a bit of precision for 2**15 times the range, so small gradients survive.
  * rowwise: one scale per row of each operand, along the dimension the matmul reduces over
    (_scaled_mm: scale_a [M, 1], scale_b [1, N]). A backward GEMM reduces over another axis than
    the forward did, so there the operand is re-quantized along that axis from its
    high-precision copy. Per-row scales need less range, so everything is e4m3 (torch's rowwise
    kernels take e4m3 only as second operand, and as both on sm90 in older releases).

Every GEMM here is written `a @ bt.T` with `a` and `bt` row-major and scaled per row (or per
tensor), which is exactly what _scaled_mm wants: its first operand row-major, its second
column-major (bt.T is a column-major view of a row-major bt), every dimension a multiple of 16.

On a GPU without fp8 GEMMs (older than sm89) and on the CPU, the same numbers come from an
emulation: dequantize both operands to fp32, matmul, cast (see `use_scaled_mm`).

The glue: `float8_ops(ops, recipe)` swaps Ops.linear for `float8_linear` and wraps Ops.gather so
the weights that stay in high precision (the output projection by default, any name in
`filter`) reach the linear as a `HighPrecisionWeight`; float8_linear runs them, and shapes fp8
cannot take, in bf16 (mixed_precision.linear).

FSDP's fp8 all-gather (minititan/collectives/fsdp_float8.py, float8.fsdp_all_gather) casts each
weight's shards with the scale of the whole weight before gathering; the linear then receives a
Float8Weight carrying `fp8_data` and `fp8_scale`, and float8_linear multiplies those as they are.
`float8_all_gather_applies` says which weights go that way.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from minititan.core import mixed_precision
from minititan.core.model import is_linear_weight

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
RECIPES = ("tensorwise", "rowwise")
GRAD_DTYPE = {"tensorwise": E5M2, "rowwise": E4M3}  # x and w are always e4m3
AMAX_EPS = 1e-12  # an all-zero tensor gets a large finite scale instead of inf


# ---------------------------------------------------------------- scaling


def amax_to_scale(amax: Tensor, dtype: torch.dtype) -> Tensor:
    """The fp32 scale that maps amax to the largest finite value of the fp8 dtype."""
    return torch.finfo(dtype).max / amax.float().clamp(min=AMAX_EPS)


def cast_to_fp8(t: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """fp8(t * scale), saturating: e4m3fn has no infinity, and out-of-range values would become NaN."""
    fp8_max = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def quantize(t: Tensor, dtype: torch.dtype, rowwise: bool) -> tuple[Tensor, Tensor]:
    """A 2-D tensor as a row-major fp8 tensor and its scale: [rows, 1] if rowwise, else 0-d."""
    amax = t.abs().amax(dim=1, keepdim=True) if rowwise else t.abs().amax()
    scale = amax_to_scale(amax, dtype)
    return cast_to_fp8(t, scale, dtype).contiguous(), scale


# ---------------------------------------------------------------- one GEMM


def scaled_matmul(a: Tensor, a_scale: Tensor, bt: Tensor, bt_scale: Tensor, out_dtype: torch.dtype,
                  emulate: bool) -> Tensor:
    """a @ bt.T from row-major fp8 operands a [M, K], bt [N, K] and the scales they were cast with."""
    # torch's CUTLASS rowwise kernel (used unless cuBLAS >= 12.9 on sm90) writes bf16 only: upcast
    mm_dtype = torch.bfloat16 if a_scale.dim() > 0 else out_dtype
    a_inv, bt_inv = a_scale.reciprocal(), bt_scale.reciprocal()
    if emulate:
        y = (a.float() * a_inv) @ (bt.float() * bt_inv).t()
    else:
        y = torch._scaled_mm(a, bt.t(), scale_a=a_inv, scale_b=bt_inv.t(), out_dtype=mm_dtype)
    # Cast only where the dtype changes: torch 2.11's compile of an autograd.Function whose forward
    # returns a no-op .to() (an alias of the matmul's output) routes the backward's gradient to the
    # wrong output, and the inputs get none (pytorch/pytorch#180642; benchmarks/float8.md).
    y = y if y.dtype == mm_dtype else y.to(mm_dtype)
    return y if y.dtype == out_dtype else y.to(out_dtype)


@functools.cache
def scaled_mm_supported(device: torch.device, recipe: str) -> bool:
    """Whether torch._scaled_mm runs every GEMM of `recipe` on this device; tried once, on 16x16."""
    rowwise = recipe == "rowwise"
    ones = torch.ones(16, 16, device=device)
    w, w_scale = quantize(ones, E4M3, rowwise)
    try:
        for a_dtype in (E4M3, GRAD_DTYPE[recipe]):
            a, a_scale = quantize(ones, a_dtype, rowwise)
            scaled_matmul(a, a_scale, w, w_scale, torch.bfloat16, emulate=False)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


def use_scaled_mm(device: torch.device, recipe: str) -> bool:
    """The automatic choice: torch._scaled_mm on a GPU that runs the recipe (sm89 and later),
    the emulation everywhere else. A CPU has no fp8 units: torch 2.13's CPU _scaled_mm gives
    the emulation's numbers but runs e4m3 x e4m3 through oneDNN's reference loop, far slower."""
    return device.type == "cuda" and scaled_mm_supported(device, recipe)


# ---------------------------------------------------------------- the three GEMMs


class Float8Matmul(torch.autograd.Function):
    """y = x @ w.T for 2-D x, with the output, input-grad and weight-grad GEMMs in fp8.
    w_fp8, w_scale: w already in fp8 (tensorwise e4m3; FSDP's fp8 all-gather cast it before
    gathering): used as is. w then only stands for the weight in autograd (its grad is dw)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, recipe: str, emulate: bool, force_recompute_weight_in_bwd: bool,
                w_fp8: Tensor | None = None, w_scale: Tensor | None = None):
        rowwise = recipe == "rowwise"
        precast = w_fp8 is not None
        x_fp8, x_scale = quantize(x, E4M3, rowwise)
        if not precast:
            w_fp8, w_scale = quantize(w, E4M3, rowwise)
        y = scaled_matmul(x_fp8, x_scale, w_fp8, w_scale, x.dtype, emulate)
        if rowwise:  # the backward scales x and w along their other axis: keep the originals
            ctx.save_for_backward(x, w)
        elif force_recompute_weight_in_bwd and not precast:  # precast: w_fp8 is FSDP's gathered buffer
            ctx.save_for_backward(x_fp8, x_scale, w)
        else:
            ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
        ctx.recipe, ctx.emulate, ctx.dtypes = recipe, emulate, (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        if ctx.recipe == "rowwise":
            dy_rows, w_cols, dy_cols, x_cols = rowwise_backward_operands(dy, *ctx.saved_tensors)
        else:
            dy_rows, w_cols, dy_cols, x_cols = tensorwise_backward_operands(dy, *ctx.saved_tensors)
        x_dtype, w_dtype = ctx.dtypes
        dx = scaled_matmul(*dy_rows, *w_cols, x_dtype, ctx.emulate)
        dw = scaled_matmul(*dy_cols, *x_cols, w_dtype, ctx.emulate)
        return dx, dw, None, None, None, None, None


def tensorwise_backward_operands(dy: Tensor, x_fp8: Tensor, x_scale: Tensor, *weight: Tensor):
    """The fp8 operands of dx = dy @ (w.T).T and dw = dy.T @ (x.T).T, each (row-major fp8, scale).
    One scale per tensor survives a transpose, so w and x are the forward's fp8 copies, transposed."""
    if len(weight) == 1:  # force_recompute_weight_in_bwd: re-cast the high-precision weight
        weight = quantize(weight[0], E4M3, rowwise=False)
    w_fp8, w_scale = weight
    dy_fp8, dy_scale = quantize(dy, E5M2, rowwise=False)
    return ((dy_fp8, dy_scale), (w_fp8.t().contiguous(), w_scale),
            (dy_fp8.t().contiguous(), dy_scale), (x_fp8.t().contiguous(), x_scale))


def rowwise_backward_operands(dy: Tensor, x: Tensor, w: Tensor):
    """The same four operands, each re-quantized with a scale per row of the layout its GEMM reads:
    dx reduces over N (rows of dy, columns of w), dw over M (columns of dy and of x)."""
    return (quantize(dy, E4M3, rowwise=True), quantize(w.t(), E4M3, rowwise=True),
            quantize(dy.t(), E4M3, rowwise=True), quantize(x.t(), E4M3, rowwise=True))


# ---------------------------------------------------------------- Ops.linear


def fits_fp8_gemm(*dims: int) -> bool:
    """_scaled_mm needs every dimension of every GEMM (M, K and N) to be a multiple of 16."""
    return all(d % 16 == 0 for d in dims)


def float8_linear(x: Tensor, w: Tensor, recipe: str = "tensorwise", *, emulate: bool | None = None,
                  force_recompute_weight_in_bwd: bool = False) -> Tensor:
    """Ops.linear in fp8: x [..., K] @ w[N, K].T -> [..., N] in x's dtype.
    bf16 (mixed_precision.linear) for a HighPrecisionWeight (see `float8_gather`) or a shape fp8
    GEMMs cannot take. w may be the fp32 master (no FSDP): it is quantized from fp32 and dw comes
    back in fp32 from the GEMM, so the weights are never cast to bf16 at all.
    A weight that carries `fp8_data` and `fp8_scale` (FSDP's fp8 all-gather: a Float8Weight of
    collectives/fsdp_float8.py) is multiplied as it is, without another cast.
    emulate=None asks `use_scaled_mm` (a cached probe; pass a bool under torch.compile)."""
    if recipe not in RECIPES:
        raise ValueError(f"float8 recipe {recipe!r} is unknown: use one of {', '.join(RECIPES)}")
    precast = getattr(w, "fp8_data", None) is not None
    if precast and recipe != "tensorwise":
        raise ValueError("a weight all-gathered in fp8 is scaled tensorwise: set float8.recipe = \"tensorwise\" "
                         "or float8.fsdp_all_gather = false")
    n, k = w.shape
    m = x.numel() // k
    if isinstance(w, HighPrecisionWeight) or not fits_fp8_gemm(m, k, n):
        return mixed_precision.linear(x, w)  # a Float8Weight acts as its dequantized weight here
    if emulate is None:
        emulate = not use_scaled_mm(x.device, recipe)
    fp8_weight = (w.fp8_data, w.fp8_scale) if precast else ()
    y = Float8Matmul.apply(x.reshape(m, k), w, recipe, emulate, force_recompute_weight_in_bwd, *fp8_weight)
    return y.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- which weights run in fp8


def float8_applies(name: str, shape: tuple[int, ...], filter: tuple[str, ...] = ("output",)) -> bool:
    """Whether the matrix `name` (full name, e.g. layers.3.attention.wq) of `shape` runs in fp8:
    2-D, dims multiples of 16, and not `filtered`."""
    return len(shape) == 2 and fits_fp8_gemm(*shape) and not filtered(name, filter)


def filtered(name: str, filter: tuple[str, ...] = ("output",)) -> bool:
    """Whether a filter entry names the weight `name`, matching whole dotted parts: "output", "wo",
    "attention.wk", "layers.0". The output projection is filtered by default: the logits feed a
    softmax over the vocabulary and are the layer most sensitive to precision."""
    return any(f".{entry}." in f".{name}." for entry in filter)


def float8_all_gather_applies(name: str, shape: tuple[int, ...], filter: tuple[str, ...] = ("output",)) -> bool:
    """Whether FSDP may all-gather the weight `name` in fp8 (float8.fsdp_all_gather): one that runs
    in fp8 and reaches the matmul through ops.linear (the embedding is a lookup; a MoE router and
    the experts are multiplied by other ops)."""
    return is_linear_weight(name, shape) and float8_applies(name, shape, filter)


class HighPrecisionWeight(torch.Tensor):
    """A weight that float8_linear multiplies in its own dtype (a filtered one). To autograd and to
    every op it is the weight it wraps (`weight`); float8_linear only checks its type.
    A type rather than an attribute on the tensor, because the attribute would not survive a
    backward recompute: activation checkpointing detaches the block's inputs, and under FSDP the
    recompute gets fresh views of a re-gathered buffer. A detach here keeps the type, and FSDP's
    saved-tensor hooks take the subclass apart and rebuild it (`__tensor_flatten__`), as they do
    for Float8Weight."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of torch ops are plain tensors

    @staticmethod
    def __new__(cls, weight: Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, weight.shape, strides=weight.stride(), dtype=weight.dtype,
                                                device=weight.device)
        t.weight = weight
        return t

    def __repr__(self):
        return f"HighPrecisionWeight({self.weight!r})"

    def __tensor_flatten__(self):
        return ["weight"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta, outer_size, outer_stride):
        return HighPrecisionWeight(inner["weight"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return HighPrecisionWeight(func(args[0].weight))
        args, kwargs = tree_map_only(HighPrecisionWeight, lambda t: t.weight, (args, kwargs or {}))
        return func(*args, **kwargs)


# Compile's cache asks traceable subclasses for a hash of their metadata and otherwise hashes what
# __tensor_flatten__ gives (the wrapped weight): exactly this subclass's metadata, so say nothing.
warnings.filterwarnings("ignore", message="HighPrecisionWeight does not implement _stable_hash_for_caching")


class KeepHighPrecision(torch.autograd.Function):
    """w -> HighPrecisionWeight(w), differentiable: the gradient passes through to w."""

    @staticmethod
    def forward(ctx, w: Tensor):
        return HighPrecisionWeight(w.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad


def float8_gather(gather, filter: tuple[str, ...] = ("output",)):
    """Wrap Ops.gather so that each weight `filter` names reaches the linear as a HighPrecisionWeight:
    the gather is the one place that knows a weight's full name, float8_linear(x, w) sees only w."""
    def gather_keeping_filtered(params, unit: str):
        p = gather(params, unit)
        prefix = unit.rsplit(".", 1)[0] + "." if unit.startswith("layers.") else ""
        return {local: KeepHighPrecision.apply(t) if t.dim() == 2 and filtered(prefix + local, filter) else t
                for local, t in p.items()}
    return gather_keeping_filtered


def float8_ops(ops, recipe: str = "tensorwise", filter: tuple[str, ...] = ("output",),
               device: torch.device | str = "cpu", force_recompute_weight_in_bwd: bool = False):
    """A copy of `ops` (model.Ops, already set up by the layouts) whose linears run in fp8.
    Whether _scaled_mm or the emulation runs is decided here, once, for `device`."""
    if recipe not in RECIPES:
        raise ValueError(f"float8.recipe={recipe!r} is unknown: set it to one of {', '.join(RECIPES)}")
    if isinstance(filter, str):
        raise ValueError(f"float8 filter={filter!r} must be a list of names, e.g. [{filter!r}]")
    emulate = not use_scaled_mm(torch.device(device), recipe)
    keep_inductor_from_fusing_transposes_into_row_reductions()
    linear = functools.partial(float8_linear, recipe=recipe, emulate=emulate,
                               force_recompute_weight_in_bwd=force_recompute_weight_in_bwd)
    return dataclasses.replace(ops, linear=linear, gather=float8_gather(ops.gather, filter))


def keep_inductor_from_fusing_transposes_into_row_reductions() -> None:
    """Turn off inductor's mix-order reduction (torch 2.11 on). The backward recomputes each
    linear's fp8 input and transposes it for the weight-gradient GEMM; mix-order reduction fused
    that into RMSNorm's backward, a kernel that walks rows, so each transposed byte went to its own
    cache line. Off, Float8 steps at Llama 3 8B width run faster and bf16 steps the same
    (benchmarks/float8.md)."""
    import torch._inductor.config as inductor
    if hasattr(inductor.triton, "mix_order_reduction"):
        inductor.triton.mix_order_reduction = False
