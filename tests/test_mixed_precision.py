"""mixed_precision.linear: an fp32 master weight in a bf16 matmul, its gradient written in fp32.
It must compute what casting the weight first (F.linear(x, w.to(bf16))) computes, and a bf16
training step must give the gradients of the layout that casts every weight in its gather."""
import torch
import torch.nn.functional as F

from minititan import parallelize
from minititan.core import mixed_precision
from minititan.core.config import load_config
from minititan.core.data import TokenSource
from minititan.train import forward_backward, setup
from tests.harness import TINY


def test_linear_on_an_fp32_master_equals_the_cast_weights_linear():
    torch.manual_seed(0)
    x0 = torch.randn(2, 5, 32).bfloat16()
    w0 = torch.randn(48, 32)
    dy = torch.randn(2, 5, 48).bfloat16()
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = mixed_precision.linear(x, w)
    y.backward(dy)
    x_ref, w_ref = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref.to(torch.bfloat16))
    y_ref.backward(dy)
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-2, atol=1e-2)  # the reference rounds dw to bf16 first


def test_same_dtype_is_plain_linear():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.equal(mixed_precision.linear(x, w), F.linear(x, w))


def step_grads(monkeypatch, keep: bool) -> dict[str, torch.Tensor]:
    cast_gather = parallelize.cast_gather
    monkeypatch.setattr(parallelize, "cast_gather", lambda select, dtype, keep_linear_weights=True:
                        cast_gather(select, dtype, keep_linear_weights and keep))
    cfg = load_config(None, TINY + ["training.param_dtype=bfloat16", "checkpoint.enable=false"])
    _, _, layout = setup(cfg)
    t = cfg.training
    inputs, labels = TokenSource(cfg.data.dataset, cfg.model.vocab_size).batch(t.seed, 1, t.local_batch_size, t.seq_len)
    forward_backward(cfg, layout, inputs, labels, 1, 1.0 / (t.local_batch_size * t.seq_len))
    return {n: p.grad for n, p in layout.params.items()}


def test_bf16_step_gives_the_cast_in_gather_gradients(monkeypatch):
    masters = step_grads(monkeypatch, keep=True)
    casts = step_grads(monkeypatch, keep=False)
    assert masters.keys() == casts.keys()
    for name, g in casts.items():
        assert masters[name].dtype == torch.float32
        err = ((masters[name] - g).norm() / g.norm()).item()
        assert err < 2e-2, f"{name}: {err:.2%} off"  # bf16 rounding of dw, nothing more
