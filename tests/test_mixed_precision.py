"""mixed_precision.linear: an fp32 master weight in a bf16 matmul, its gradient written in fp32
(and mixed_precision.embedding: the table's looked-up rows cast, the table's gradient in fp32).
They must compute what casting the weight first (F.linear(x, w.to(bf16))) computes, a bf16 training
step must give the gradients of the layout that casts every weight in its gather, and the layouts
whose ops meet the fp32 masters (async TP's linear, the MoE shared experts under it, DDP) or keep
the casts (zero bubble) must train in bf16 like one process (within bf16 rounding)."""
import pytest
import torch
import torch.nn.functional as F

from minititan.collectives.mesh import Mesh
from minititan.core import mixed_precision, model
from minititan.core.config import load_config
from minititan.core.data import TokenSource
from minititan.layout import parallelize
from minititan.layout.microbatches import forward_backward
from minititan.train import setup
from tests.harness import TINY, assert_same_losses, assert_same_params, train_runs
from tests.test_moe_training import MOE


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


def test_embedding_on_an_fp32_master_equals_the_cast_tables_lookup():
    torch.manual_seed(0)
    w0, tokens = torch.randn(50, 16), torch.randint(0, 50, (2, 30))  # 60 tokens of 50: repeats
    dy = torch.randn(2, 30, 16).bfloat16()
    w, w_ref = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    y, y_ref = mixed_precision.embedding(tokens, w, torch.bfloat16), F.embedding(tokens, w_ref.to(torch.bfloat16))
    y.backward(dy)
    y_ref.backward(dy)
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and torch.equal(y, y_ref)
    summed_in_fp32 = torch.zeros(50, 16).index_add_(0, tokens.flatten(), dy.float().flatten(0, 1))
    torch.testing.assert_close(w.grad, summed_in_fp32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-2, atol=1e-2)  # the reference sums in bf16


def test_same_dtype_is_plain_linear():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.equal(mixed_precision.linear(x, w), F.linear(x, w))


def step_grads(monkeypatch, keep: bool) -> dict[str, torch.Tensor]:
    cast_gather = parallelize.cast_gather
    monkeypatch.setattr(parallelize, "cast_gather", lambda select, dtype, keep_masters=True:
                        cast_gather(select, dtype, keep_masters and keep))
    cfg = load_config(None, TINY + ["training.param_dtype=bfloat16", "checkpoint.enable=false"])
    _, _, layout = setup(cfg)
    t = cfg.training
    inputs, labels = TokenSource(cfg.data.dataset, cfg.model.vocab_size).batch(t.seed, 1, t.local_batch_size, t.seq_len)
    forward_backward(layout, inputs, labels, 1, 1.0 / (t.local_batch_size * t.seq_len))
    return {n: p.grad for n, p in layout.params.items()}


def test_bf16_step_gives_the_cast_in_gather_gradients(monkeypatch):
    masters = step_grads(monkeypatch, keep=True)
    casts = step_grads(monkeypatch, keep=False)
    assert masters.keys() == casts.keys()
    for name, g in casts.items():
        assert masters[name].dtype == torch.float32
        err = ((masters[name] - g).norm() / g.norm()).item()
        assert err < 2e-2, f"{name}: {err:.2%} off"  # bf16 rounding of dw, nothing more


BF16 = ["training.param_dtype=bfloat16", "training.steps=3"]
BF16_LAYOUTS = {
    "dense_dp_replicate2": [],
    "dense_tp2_async": ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"],
    "dense_pp2_zero_bubble": ["parallelism.pp=2", "parallelism.pp_schedule=zero_bubble",
                              "parallelism.pp_microbatches=2"],
    "moe_tp2_async": MOE + ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"],
}


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    one = train_runs(folder / "one", 1, {"dense": [], "moe": MOE}, common=BF16)
    two = train_runs(folder / "two", 2, {name: o + (["parallelism.dp_replicate=2"] if name == "dense_dp_replicate2" else [])
                                          for name, o in BF16_LAYOUTS.items()}, common=BF16)
    return one, two


@pytest.mark.parametrize("name", BF16_LAYOUTS)
def test_bf16_layout_matches_one_process_bf16(bf16_runs, name):
    one, two = bf16_runs
    ref_rows, ref_params = one[name.split("_", 1)[0]]
    rows, params = two[name]
    assert_same_losses(rows, ref_rows, rtol=1e-2)
    # tp in bf16 ends 1.2e-2 off one process on its smallest weights with every cast in the gather as
    # well (the code before mixed_precision.linear, measured on torch 2.11 and 2.13): bf16 rounding of
    # the sums in another order, not the fp32 masters; a wrong or missing gradient is far more
    assert_same_params(params, ref_params, rtol=2e-2)


@pytest.mark.parametrize("schedule, dtype", [("1f1b", torch.float32), ("zero_bubble", torch.bfloat16)])
def test_zero_bubble_keeps_the_casts_in_the_gather(schedule, dtype):
    """Zero bubble splits the backward at autograd's own matmul nodes, which a custom Function hides."""
    cfg = load_config(None, TINY + BF16 + ["parallelism.pp=2", f"parallelism.pp_schedule={schedule}"])
    facts = parallelize.layout_facts(cfg, Mesh({"pp": 2}, rank=0))
    got = parallelize.base_ops(facts, cfg.compile, cfg.activation_checkpoint).gather(model.init(cfg.model, seed=0),
                                                                                   "layers.0.attention")
    assert got["attention.wq"].dtype == dtype and got["attention_norm"].dtype == torch.bfloat16
    table = parallelize.base_ops(facts, cfg.compile, cfg.activation_checkpoint).gather(model.init(cfg.model, seed=0),
                                                                                     "tok_embeddings")
    assert table["tok_embeddings"].dtype == dtype
