import pytest
import torch

from minititan.core.config import LrScheduler, Optimizer
from minititan.core.data import ByteTokenizer, TokenSource, rank_rows, tokenize_file
from minititan.core.optim import AdamW, clip_coefficient, lr_at


def test_adamw_matches_torch():
    torch.manual_seed(0)
    init = {"a": torch.randn(10, 5), "b": torch.randn(7)}
    mine = AdamW({k: v.clone() for k, v in init.items()}, Optimizer(lr=1e-2))
    ref_params = [v.clone().requires_grad_() for v in init.values()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(10):
        grads = [torch.randn_like(v) for v in init.values()]
        for p, g in zip(mine.params.values(), grads):
            p.grad = g.clone()
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        mine.step(1e-2)
        ref.step()
    for p, r in zip(mine.params.values(), ref_params):
        assert (p - r).abs().max() < 1e-6


@pytest.mark.parametrize("fused", [False, True])  # the fused kernel (CUDA's, here its CPU twin) clips as it reads
def test_adamw_clips_like_torch_clip_grad_norm(fused):
    torch.manual_seed(0)
    init = {"a": torch.randn(10, 5), "b": torch.randn(7)}
    mine = AdamW({k: v.clone() for k, v in init.items()}, Optimizer(lr=1e-2), fused=fused)
    ref_params = [v.clone().requires_grad_() for v in init.values()]
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(10):
        grads = [torch.randn_like(v) * (0.05 if step % 2 else 3.0) for v in init.values()]  # clipped every other step
        for p, g in zip(mine.params.values(), grads):
            p.grad = g.clone()
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        mine.step(1e-2, grad_scale=clip_coefficient(norm, max_norm=1.0))
        torch.nn.utils.clip_grad_norm_(ref_params, max_norm=1.0)
        ref.step()
    for p, r in zip(mine.params.values(), ref_params):
        assert (p - r).abs().max() < 1e-6
    assert clip_coefficient(norm, max_norm=0.0) is None  # max_norm <= 0: no clipping


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
