import pytest
import torch

from minititan.core import model
from minititan.core.config import Model

CFG = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def test_shapes_and_units():
    params = model.init(CFG, 0)
    assert params["layers.1.attention.wk"].shape == (32, 64)
    assert set(model.units(CFG)) == {"tok_embeddings", "layers.0.attention", "layers.0.feed_forward",
                                     "layers.1.attention", "layers.1.feed_forward", "output"}
    logits = model.forward(params, torch.randint(0, 256, (2, 16)), CFG)
    assert logits.shape == (2, 16, 256)


def test_init_is_per_tensor_deterministic():
    full = model.init(CFG, 3)
    some = model.init(CFG, 3, names=["layers.1.feed_forward.w2"])
    assert torch.equal(full["layers.1.feed_forward.w2"], some["layers.1.feed_forward.w2"])
    assert not torch.equal(full["layers.0.attention.wq"], model.init(CFG, 4)["layers.0.attention.wq"])


def test_causal():
    params = model.init(CFG, 0)
    x = torch.randint(0, 256, (1, 24))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 256, (12,))
    a, b = model.forward(params, x, CFG), model.forward(params, y, CFG)
    assert torch.allclose(a[0, :12], b[0, :12], atol=1e-6)
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_loss_matches_logits():
    params = model.init(CFG, 0)
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    ref = torch.nn.functional.cross_entropy(model.forward(params, x, CFG).flatten(0, 1), y.flatten(), reduction="sum")
    assert torch.allclose(model.loss_sum(params, x, y, CFG), ref, rtol=1e-5)


def test_rope_scaling_changes_only_low_frequencies():
    plain = model.rope_frequencies(Model(dim=128, n_heads=1, rope_theta=500000.0))
    scaled = model.rope_frequencies(Model(dim=128, n_heads=1, rope_theta=500000.0, rope_scaling=True))
    assert torch.equal(plain[:8], scaled[:8]) and torch.allclose(scaled[-1], plain[-1] / 8)


def test_flops_per_token_matches_torchtitan_convention():
    # Llama 3 8B width x 8 layers, seq 8192: torchtitan measured 28,144 tok/s at 47.9% MFU of 989 TFLOP/s
    cfg = Model(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.3,
                multiple_of=1024, rope_theta=500000.0, max_seq_len=8192)
    assert abs(28144 * model.flops_per_token(cfg, 8192) / 989e12 - 0.479) < 0.002


def test_chunked_loss_matches_one_pass(monkeypatch):
    """The eager loss computes its gradient chunk by chunk in the forward; value and gradients match one pass."""
    monkeypatch.setattr(model, "LOSS_CHUNK_TOKENS", 7)  # 3 x 10 tokens -> 5 chunks, the last one short
    h = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 10))
    labels[1, 3] = labels[2, 9] = -100  # ignored
    chunked = model.cross_entropy_sum(h, w, labels)
    chunked.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    whole = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten(), reduction="sum")
    whole.backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grads, (h.grad, w.grad))
    with torch.no_grad():
        torch.testing.assert_close(model.cross_entropy_sum(h, w, labels), whole)


def test_the_eager_loss_scales_its_gradient_once():
    """The backward scales the saved gradient in place: a scaled loss gets the scaled gradient, and a
    second backward through the same graph raises instead of scaling it twice."""
    logits = torch.randn(10, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (10,))
    (model.cross_entropy_sum(logits, torch.eye(50, dtype=torch.float64), labels) * 0.25).backward(retain_graph=True)
    expected = torch.func.grad(lambda x: torch.nn.functional.cross_entropy(x, labels, reduction="sum") * 0.25)(logits.detach())
    torch.testing.assert_close(logits.grad, expected)
    loss = model.cross_entropy_sum(logits, torch.eye(50, dtype=torch.float64), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_compiled_rope_matches_eager():
    """Compiled, apply_rope spells the complex multiply out in real arithmetic: the same numbers."""
    rope = model.rope_table(Model(dim=64, n_heads=4), torch.arange(16))
    for x in (torch.randn(2, 16, 4, 16), torch.randn(2, 16, 4, 16).bfloat16()):
        torch.testing.assert_close(torch.compile(model.apply_rope, fullgraph=True)(x, rope), model.apply_rope(x, rope),
                                   rtol=0, atol=0)
