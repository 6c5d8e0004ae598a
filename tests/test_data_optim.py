import pytest
import torch

from minititan.core.config import LrScheduler, Optimizer
from minititan.core.data import TokenSource
from minititan.core.optim import AdamW, clip_coefficient, lr_at, pick_implementation


IMPLEMENTATIONS = ["fused", "foreach", "compiled"]  # fused: CUDA's kernel, here its CPU twin


def _random_grads(params, gen, step):
    return [torch.randn(p.shape, generator=gen) * (0.05 if step % 2 else 3.0) for p in params]  # clipped every other step


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_adamw_clips_like_torch_clip_grad_norm(implementation):
    """Each implementation, with the clip coefficient folded in and the lr changing every step,
    takes torch's clip_grad_norm_ + torch.optim.AdamW steps; without clipping too (grad_scale None)."""
    init = {"a": torch.randn(10, 5), "b": torch.randn(7)}
    for max_norm in (1.0, 0.0):
        mine = AdamW({k: v.clone() for k, v in init.items()}, Optimizer(lr=1e-2, implementation=implementation))
        ref_params = [v.clone().requires_grad_() for v in init.values()]
        ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        for step in range(10):
            grads = _random_grads(ref_params, gen, step)
            for p, g in zip(mine.params.values(), grads):
                p.grad = g.clone()
            for p, g in zip(ref_params, grads):
                p.grad = g.clone()
            norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
            lr = 1e-2 * (step + 1) / 10
            mine.step(lr, grad_scale=clip_coefficient(norm, max_norm))
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
            for group in ref.param_groups:
                group["lr"] = lr
            ref.step()
        for p, r in zip(mine.params.values(), ref_params):
            assert (p - r).abs().max() < 1e-6, implementation
    assert clip_coefficient(norm, max_norm=0.0) is None  # max_norm <= 0: no clipping


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_adamw_skips_a_step_on_the_device(implementation):
    """skip = 1 (a step whose gradient norm is not finite) leaves the parameters, both moments and
    the step count bit for bit as they were, first step included; skip = 0 is a normal step."""
    gen = torch.Generator().manual_seed(2)
    init = {"a": torch.randn(10, 5, generator=gen), "b": torch.randn(7, generator=gen)}
    mine = AdamW({k: v.clone() for k, v in init.items()}, Optimizer(lr=1e-2, implementation=implementation))
    plain = AdamW({k: v.clone() for k, v in init.items()}, Optimizer(lr=1e-2, implementation=implementation))
    for step in range(4):
        grads = _random_grads(init.values(), gen, step)
        before = [{n: t.clone() for n, t in d.items()} for d in (mine.params, mine.exp_avg, mine.exp_avg_sq)]
        for p, g in zip(mine.params.values(), grads):
            p.grad = torch.full_like(g, float("nan"))
        mine.step(1e-2, grad_scale=torch.tensor(float("nan")), skip=torch.tensor(1.0))  # what a NaN norm gives
        after = (mine.params, mine.exp_avg, mine.exp_avg_sq)
        assert all(torch.equal(a[n], b[n]) for a, b in zip(after, before) for n in a) and mine.steps == step
        for opt in (mine, plain):
            for p, g in zip(opt.params.values(), grads):
                p.grad = g.clone()
        mine.step(1e-2, skip=torch.tensor(0.0))
        plain.step(1e-2)
        assert all(torch.allclose(mine.params[n], plain.params[n], rtol=0, atol=1e-7) for n in init)
    assert mine.steps == plain.steps == 4


def test_compiled_adamw_compiles_once():
    """lr, the step count and the clip coefficient reach the compiled update as device scalars:
    new values every step are no recompile."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mine = AdamW({"a": torch.randn(10, 5), "b": torch.randn(7)}, Optimizer(implementation="compiled"))
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for p, g in zip(mine.params.values(), _random_grads(mine.params.values(), gen, step)):
            p.grad = g
        mine.step(1e-3 * (step + 1), grad_scale=None if step == 2 else torch.tensor(0.5 + step))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_auto_compiles_the_update_only_where_the_model_is_compiled_on_a_gpu():
    """auto = compiled where it was measured faster (a GPU) and the compiler is paid for anyway."""
    assert pick_implementation("auto", model_compiled=True, on_gpu=True) == "compiled"
    assert pick_implementation("auto", model_compiled=False, on_gpu=True) == "fused"
    assert pick_implementation("auto", model_compiled=True, on_gpu=False) == "fused"
    assert pick_implementation("foreach", model_compiled=True, on_gpu=True) == "foreach"
    assert AdamW({"a": torch.zeros(3)}, Optimizer(), model_compiled=True).implementation == "fused"  # the CPU


def test_lr_schedule():
    cfg = LrScheduler(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(5, 1.0, 100, cfg) == 0.5 and lr_at(10, 1.0, 100, cfg) == 1.0
    assert abs(lr_at(100, 1.0, 100, cfg) - 0.1) < 1e-9
    assert lr_at(50, 1.0, 100, LrScheduler(warmup_steps=0, decay="constant")) == 1.0


def test_validation_split_is_held_out():
    src = TokenSource("shakespeare", 256)
    train, val = src.parts("train", 32)[0], src.parts("val", 32)[0]
    assert train.stream is not val.stream and train.stream.size + val.stream.size > 1_000_000
