import pytest
import torch

from minititan.core.config import LrScheduler, Optimizer
from minititan.core.data import ByteTokenizer, TokenSource, rank_rows, tokenize_file
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


def test_batches_are_a_pure_function_of_seed_and_step():
    src = TokenSource("shakespeare", 256)
    x1, y1 = src.batch(0, 5, 8, 32)
    x2, y2 = TokenSource("shakespeare", 256).batch(0, 5, 8, 32)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, src.batch(0, 6, 8, 32)[0])
    # any data-parallel split of the global batch concatenates back to it
    for dp in (1, 2, 4, 8):
        assert torch.equal(torch.cat([rank_rows(x1, r, dp) for r in range(dp)]), x1)


def test_validation_split_is_held_out():
    src = TokenSource("shakespeare", 256)
    assert len(src.val) > 0 and len(src.train) + len(src.val) > 1_000_000


def test_token_file_round_trip(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    out = tmp_path / "t.bin"
    assert tokenize_file(str(text), str(out)) == 600
    src = TokenSource(str(out), 256)
    x, _ = src.batch(1, 1, 2, 8)
    assert ByteTokenizer().decode(x[0].tolist()) in ("hello world " * 3)
