"""Float8 linear: quantization error bounds, the three fp8 GEMMs against a high-precision linear,
the fallbacks to F.linear, _scaled_mm against its emulation, and a few training steps of the model."""
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from minititan.core import model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.config import Model
from minititan.core.float8 import (E4M3, E5M2, GRAD_DTYPE, RECIPES, Float8Matmul, HighPrecisionWeight, amax_to_scale,
                                   cast_to_fp8, float8_applies, float8_linear, float8_ops, quantize, scaled_matmul,
                                   scaled_mm_supported, use_scaled_mm)

CPU = torch.device("cpu")
TINY = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256)  # linear dims: multiples of 16
MANTISSA_BITS = {E4M3: 3, E5M2: 2}


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("rowwise", [False, True])
def test_quantize_round_trip_within_half_an_fp8_step(dtype, rowwise):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 48, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    q, scale = quantize(t, dtype, rowwise)
    assert q.dtype == dtype and q.is_contiguous() and scale.dtype == torch.float32
    assert scale.shape == ((64, 1) if rowwise else ())
    # each amax lands on the largest fp8 value
    top = q.float().abs().amax(dim=1) if rowwise else q.float().abs().amax()
    assert torch.all(top == torch.finfo(dtype).max)
    back = q.float() / scale
    # round to nearest: half a step of the mantissa relative, half the smallest subnormal absolute
    finfo = torch.finfo(dtype)
    smallest_subnormal = finfo.smallest_normal * 2.0 ** -MANTISSA_BITS[dtype]
    bound = torch.maximum(t.abs() * 2.0 ** -(MANTISSA_BITS[dtype] + 1), smallest_subnormal / 2 / scale)
    assert torch.all((back - t).abs() <= bound * (1 + 1e-6))


def test_cast_saturates_and_zero_tensor_stays_finite():
    assert amax_to_scale(torch.tensor(0.0), E4M3).isfinite()
    q, _ = quantize(torch.zeros(16, 16), E4M3, rowwise=False)
    assert torch.all(q.float() == 0)
    big = cast_to_fp8(torch.tensor([1e6, -1e6]), torch.tensor(1.0), E4M3).float()
    assert big.tolist() == [448.0, -448.0]


def skip_without_cpu_scaled_mm(recipe: str, emulate: bool = False) -> None:
    """torch 2.13's CPU _scaled_mm runs both recipes (asserted); 2.11's runs tensorwise only, so
    there rowwise runs emulated and its _scaled_mm cases are skipped (CI's torch 2.11 leg)."""
    if emulate:
        return
    if torch.__version__ >= "2.13":
        assert scaled_mm_supported(CPU, recipe), "this torch's CPU _scaled_mm lacks the recipe: float8 runs emulated"
    elif not scaled_mm_supported(CPU, recipe):
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm lacks the {recipe} recipe")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(64, 64), (2, 32, 64)])
@pytest.mark.parametrize("emulate", [True, False])  # False: torch._scaled_mm on this CPU
def test_linear_forward_and_grads_close_to_high_precision(recipe, dtype, x_shape, emulate):
    skip_without_cpu_scaled_mm(recipe, emulate)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(96, 64, generator=g) * 0.05).to(dtype).requires_grad_()
    dy = torch.randn(*x_shape[:-1], 96, generator=g).to(dtype)
    y = float8_linear(x, w, recipe, emulate=emulate)
    y.backward(dy)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y_ref = F.linear(x_ref, w_ref)
    y_ref.backward(dy.float())
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype and y.shape == y_ref.shape
    # Expected error: round-to-nearest with m mantissa bits gives a relative RMS error of about
    # 2**-m / sqrt(12) * 0.74 per element (2.7% for e4m3, 5.3% for e5m2), and a product of two
    # quantized operands adds both in quadrature: 3.8% with e4m3 x e4m3, 5.9% with e5m2 x e4m3.
    grad_tol = 0.05 if GRAD_DTYPE[recipe] == E4M3 else 0.075
    assert rel_err(y, y_ref) < 0.05
    assert rel_err(x.grad, x_ref.grad) < grad_tol
    assert rel_err(w.grad, w_ref.grad) < grad_tol


@pytest.mark.parametrize("recipe", RECIPES)
def test_emulation_matches_scaled_mm(recipe):
    """On this CPU build _scaled_mm runs both recipes (torch 2.13). Rowwise and e5m2 x e4m3 give
    the emulation's bits; e4m3 x e4m3 tensorwise (oneDNN) sums in another order: the fp32 results
    differ by a few fp32 steps of sum |a_ik * b_jk|."""
    skip_without_cpu_scaled_mm(recipe)
    assert not use_scaled_mm(CPU, recipe)
    rowwise = recipe == "rowwise"
    g = torch.Generator().manual_seed(0)
    bt, bt_scale = quantize(torch.randn(96, 128, generator=g) * 0.02, E4M3, rowwise)
    for a_dtype in (E4M3, GRAD_DTYPE[recipe]):
        a, a_scale = quantize(torch.randn(64, 128, generator=g), a_dtype, rowwise)
        for out_dtype in (torch.float32, torch.bfloat16):
            got = scaled_matmul(a, a_scale, bt, bt_scale, out_dtype, emulate=False)
            want = scaled_matmul(a, a_scale, bt, bt_scale, out_dtype, emulate=True)
            assert got.dtype == want.dtype == out_dtype
            if rowwise or a_dtype == E5M2:
                assert torch.equal(got, want)
            else:
                abs_sum = (a.float() / a_scale).abs() @ (bt.float() / bt_scale).abs().t()
                rounding = want.float().abs() * torch.finfo(out_dtype).eps
                assert torch.all((got.float() - want.float()).abs() <= 1e-6 * abs_sum + rounding)


@pytest.mark.parametrize("x_shape, w_shape", [((4, 40), (32, 40)),  # K = 40
                                              ((4, 64), (24, 64)),  # N = 24
                                              ((3, 5, 64), (32, 64))])  # M = 15 tokens
def test_shapes_fp8_cannot_take_fall_back_to_plain_linear(x_shape, w_shape):
    x = torch.randn(*x_shape, requires_grad=True)
    w = torch.randn(*w_shape, requires_grad=True)
    y = float8_linear(x, w, "rowwise")
    y.sum().backward()
    x_ref, w_ref = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.linear(x_ref, w_ref).sum().backward()
    assert torch.equal(y, F.linear(x_ref, w_ref)) and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(w.grad, w_ref.grad)


def saved_tensor_dtypes(fn):
    dtypes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append(t.dtype) or t, lambda t: t):
        fn()
    return dtypes


def test_force_recompute_weight_in_bwd_saves_the_weight_and_gives_the_same_grads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g, dtype=torch.bfloat16)
    w = torch.randn(48, 64, generator=g, dtype=torch.bfloat16)
    grads = []
    for recompute in (False, True):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        run = lambda: Float8Matmul.apply(xg, wg, "tensorwise", True, recompute).sum().backward()  # noqa: E731
        dtypes = saved_tensor_dtypes(run)
        fp8_saved = [d for d in dtypes if d == E4M3]
        assert len(fp8_saved) == (1 if recompute else 2)  # x's fp8 copy, and w's unless recomputed
        assert (torch.bfloat16 in dtypes) == recompute
        grads.append((xg.grad, wg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_float8_applies_by_name_and_shape():
    assert not float8_applies("output", (256, 64))
    assert float8_applies("layers.3.attention.wq", (64, 64))
    assert not float8_applies("layers.3.attention.wq", (64, 64), filter=("attention.wq",))
    assert not float8_applies("layers.3.attention.wo", (64, 64), filter=("wo",))
    assert float8_applies("layers.10.attention.wo", (64, 64), filter=("layers.1",))
    assert float8_applies("output", (256, 64), filter=())
    assert not float8_applies("layers.0.feed_forward.w1", (24, 64))
    assert not float8_applies("layers.0.attention_norm", (64,))


def test_float8_ops_gathers_filtered_weights_as_high_precision_weights_and_rejects_unknown_recipe():
    params = {k: v.requires_grad_() for k, v in model.init(TINY, seed=0).items()}
    ops = float8_ops(model.default_ops(TINY), "tensorwise", filter=("output", "layers.1.attention.wo"))
    assert isinstance(ops.gather(params, "output")["output"], HighPrecisionWeight)
    assert type(ops.gather(params, "layers.0.attention")["attention.wo"]) is torch.Tensor
    wo = ops.gather(params, "layers.1.attention")["attention.wo"]
    assert isinstance(wo, HighPrecisionWeight) and isinstance(wo.detach(), HighPrecisionWeight)  # checkpoint detaches
    x = torch.randn(2, 16, 64)
    ops.linear(x, wo).sum().backward()  # F.linear, and the gradient reaches the master weight
    w = params["layers.1.attention.wo"].detach().requires_grad_()
    F.linear(x, w).sum().backward()
    assert torch.equal(ops.linear(x, wo), F.linear(x, w)) and torch.equal(params["layers.1.attention.wo"].grad, w.grad)
    with pytest.raises(ValueError, match="float8.recipe"):
        float8_ops(model.default_ops(TINY), "blockwise")
    with pytest.raises(ValueError, match="list of names"):
        float8_ops(model.default_ops(TINY), "rowwise", filter="output")


def loss_and_grads(ops):
    params = {k: v.requires_grad_() for k, v in model.init(TINY, seed=0).items()}
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = model.loss_sum(params, tokens[:, :-1], tokens[:, 1:], TINY, ops)
    loss.backward()
    return loss, {k: v.grad for k, v in params.items()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_filtered_weights_in_a_block_survive_the_recompute(mode):
    """Activation checkpointing recomputes a block from detached inputs: the filtered weights must
    take F.linear again, or the recompute differs from the forward (checkpoint raises). Without
    FSDP; tests/test_float8_fsdp.py has it with FSDP's re-gathered weights."""
    filter = ("output", "wo", "layers.1.attention.wq")
    plain = float8_ops(model.default_ops(TINY), filter=filter)
    loss, grads = loss_and_grads(plain)
    recomputed = loss_and_grads(dataclasses.replace(plain, run_block=block_runner(mode)))
    assert torch.equal(recomputed[0], loss)
    assert all(torch.equal(recomputed[1][k], grads[k]) for k in grads)


def bf16_ops(cfg):
    """default ops whose gather casts the fp32 masters to bf16, as a trainer's layout does."""
    ops = model.default_ops(cfg)
    gather = ops.gather
    ops.gather = lambda params, unit: {k: v.to(torch.bfloat16) for k, v in gather(params, unit).items()}
    return ops


def train_losses(cfg, ops, steps):
    params = {k: v.requires_grad_() for k, v in model.init(cfg, seed=0).items()}
    opt = torch.optim.AdamW(params.values(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model.loss_sum(params, tokens[:, :-1], tokens[:, 1:], cfg, ops) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@functools.cache
def bf16_losses():  # bf16 matmuls are slow on a CPU: train the reference once
    return train_losses(TINY, bf16_ops(TINY), steps=6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_model_trains_in_fp8_like_bf16(recipe):
    reference = bf16_losses()
    fp8 = train_losses(TINY, float8_ops(bf16_ops(TINY), recipe), steps=6)
    assert fp8.isfinite().all() and fp8[-1] < fp8[0] - 0.5
    assert torch.all((fp8 - reference).abs() / reference < 0.02)


def test_float8_training_through_the_trainer(tmp_path):
    """float8.enable=true trains through `minititan train`'s loop and stays near the bf16 losses."""
    from tests.harness import train_run
    common = ["training.param_dtype=bfloat16", "training.steps=4"]
    ref, _ = train_run(tmp_path, 1, common, name="bf16")
    fp8, _ = train_run(tmp_path, 1, common + ["float8.enable=true"], name="fp8")
    for a, b in zip(fp8, ref):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < 0.02
