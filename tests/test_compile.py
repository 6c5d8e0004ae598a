"""torch.compile must not change what a step computes: one forward/backward through the trainer,
compiled and eager, gives the same gradient for every weight, for the dense model, both Float8
recipes and the mixture of experts.

Custom autograd Functions are where compile has gone wrong: torch 2.11 routed the gradient of a
Function whose forward returned a no-op .to() to the wrong output, so every Float8 weight got none
(benchmarks/float8.md). A missing gradient is off by 100%; the bars below only leave room for
the fp8 rounding that fused kernels may do differently (more of it in bf16: 5-6% on some weights)."""
import pytest
import torch

from minititan.core.config import load_config
from minititan.core.data import TokenSource
from minititan.layout.microbatches import forward_backward
from minititan.train import setup
from tests.harness import TINY
from tests.test_moe_training import MOE

CASES = {
    "dense": ([], 1e-4),
    "float8_tensorwise": (["float8.enable=true", "float8.recipe=tensorwise"], 0.05),
    "float8_rowwise": (["float8.enable=true", "float8.recipe=rowwise"], 0.05),
    "moe": (MOE, 1e-4),
    # bf16: the linears get fp32 masters and write fp32 weight gradients (core/mixed_precision.py)
    "dense_bf16": (["training.param_dtype=bfloat16"], 0.05),
    "float8_tensorwise_bf16": (["training.param_dtype=bfloat16", "float8.enable=true", "float8.recipe=tensorwise"], 0.1),
}


def step_grads(overrides: list[str]) -> dict[str, torch.Tensor]:
    torch._dynamo.reset()
    cfg = load_config(None, TINY + ["training.global_batch_size=2", "checkpoint.enable=false"] + overrides)
    _, _, layout = setup(cfg)
    t = cfg.training
    inputs, labels = TokenSource(cfg.data.dataset, cfg.model.vocab_size).batch(t.seed, 0, t.local_batch_size, t.seq_len)
    forward_backward(layout, inputs, labels, 1, 1.0 / (t.local_batch_size * t.seq_len))
    return {n: p.grad.clone() for n, p in layout.params.items() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_gives_the_eager_gradients(case):
    overrides, rtol = CASES[case]
    eager = step_grads(overrides + ["compile.enable=false"])
    compiled = step_grads(overrides + ["compile.enable=true"])
    assert compiled.keys() == eager.keys()
    for name, g in eager.items():
        err = ((compiled[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < rtol, f"{name}: compiled gradient off by {err:.1%}"


def test_compiled_optimizer_trains_like_the_fused_one(tmp_path):
    """optimizer.implementation = compiled, on FSDP shards with clipping on: the losses and final
    params of the one-process run with torch's fused kernel."""
    from tests.harness import assert_same_losses, assert_same_params, train_run
    reference = train_run(tmp_path, 1, ["training.max_norm=0.5"], name="fused")
    compiled = train_run(tmp_path, 2, ["training.max_norm=0.5", "parallelism.dp_shard=2",
                                       "optimizer.implementation=compiled"], name="compiled")
    assert_same_losses(compiled[0], reference[0])
    assert_same_params(compiled[1], reference[1])


@pytest.mark.parametrize("ac", ["selective", "full"])
def test_the_moe_block_compiles_whole_under_activation_checkpointing(monkeypatch, ac):
    """The MoE layer logs its balance loss for the metrics. As a Python list append, under compile
    with activation checkpointing dynamo refused the side effect inside checkpoint and ran the whole
    MoE block eagerly (one graph break per MoE layer, torch 2.11 and 2.13): the MoE rows of
    benchmarks/moe.md trained with an uncompiled MoE layer. Now an in-place add to a device
    tensor (moe.log_mean): no break, no recompile from layer to layer, the eager gradients and
    balance loss. 4 layers: the list's length made dynamo recompile at each one."""
    from torch._dynamo.utils import counters

    from minititan.core import moe
    # the GPU's path, grouped GEMMs (the CPU's loop over experts reads the counts: a break of its own)
    monkeypatch.setattr(moe, "grouped_mm_ok", lambda x, w1: x.dtype == w1.dtype == torch.bfloat16)
    overrides = MOE + ["training.param_dtype=bfloat16", f"activation_checkpoint.mode={ac}", "model.n_layers=4"]
    eager, eager_balance = step_grads_and_balance(overrides + ["compile.enable=false"], monkeypatch)
    counters.clear()
    compiled, compiled_balance = step_grads_and_balance(overrides + ["compile.enable=true"], monkeypatch)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])  # attention, MoE, loss: one graph each
    for name, g in eager.items():
        err = ((compiled[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < 0.05, f"{name}: compiled gradient off by {err:.1%}"
    assert compiled_balance == pytest.approx(eager_balance, rel=1e-2)


def step_grads_and_balance(overrides: list[str], monkeypatch) -> tuple[dict[str, torch.Tensor], float]:
    """step_grads, and the mean balance loss the MoE layers logged (eager checkpointing logs each
    layer twice, forward and recompute; the mean is the same)."""
    from minititan.layout import moe as moe_layout
    balances, init = [], moe_layout.ExpertBalance.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        balances.append(self)
    monkeypatch.setattr(moe_layout.ExpertBalance, "__init__", keep)
    grads = step_grads(overrides)
    total, count = balances[-1].balance_log.tolist()
    return grads, total / count


@pytest.mark.parametrize("overrides", [["activation_checkpoint.mode=selective"], ["activation_checkpoint.mode=full"],
                                       ["activation_checkpoint.mode=selective", "float8.enable=true"],
                                       ["activation_checkpoint.mode=selective", "activation_checkpoint.selective=2"]],
                         ids=["selective", "full", "float8_selective", "every_2nd"])
def test_dense_blocks_compile_without_graph_breaks(overrides):
    """A graph break makes dynamo run part of a block eagerly, silently slower (the MoE block ran
    whole eagerly for that reason): every dense block, checkpointed or not, compiles as one graph."""
    from torch._dynamo.utils import counters
    counters.clear()
    step_grads(["training.param_dtype=bfloat16", "compile.enable=true", "model.n_layers=4"] + overrides)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # attention and feed-forward (checkpointed and plain under every-N), the loss
    assert counters["stats"]["unique_graphs"] <= 5, dict(counters["stats"])


def _compiled_and_eager(rank, world, overrides):
    """On each rank: (dynamo's unique graphs and graph breaks compiled, relative difference of all this
    rank's gradients compiled against eager), one forward/backward of 2 rows."""
    from torch._dynamo.utils import counters

    from minititan.core import moe
    moe.grouped_mm_ok = lambda x, w1: x.dtype == w1.dtype == torch.bfloat16  # the GPU's path (the loop reads counts)
    grads = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config(None, TINY + ["checkpoint.enable=false", f"compile.enable={compiled}"] + overrides)
        _, _, layout = setup(cfg)
        t = cfg.training
        inputs, labels = TokenSource(cfg.data.dataset, cfg.model.vocab_size).batch(t.seed, 0, t.local_batch_size, t.seq_len)
        forward_backward(layout, inputs[:2], labels[:2], 1, 1.0 / 64)
        grads[compiled] = torch.cat([p.grad.flatten().float() for p in layout.params.values() if p.grad is not None])
    diff = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), diff


@pytest.mark.parametrize("overrides, graphs", [
    (MOE + ["parallelism.dp_shard=2", "parallelism.ep=2"], 9),
    (["parallelism.cp=2"], 4),
    (["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"], 16),
], ids=["ep_exact", "cp", "async_tp"])
def test_blocks_that_break_the_graph_compile_in_pieces_under_full_checkpointing(overrides, graphs):
    """dynamo cannot break a graph inside checkpoint: a block with a break (the exact ep exchange's
    host read, cp's ring under torch.compiler.disable, async TP's async collectives) compiled as
    compile(checkpoint(block)) ran whole eagerly (2, 2 and 0 graphs in these runs). Under full AC it is
    checkpointed outside and compiled inside: its pieces compile, with the eager gradients."""
    from tests.distributed import run_ranks
    unique, breaks, diff = run_ranks(2, _compiled_and_eager, overrides + [
        "activation_checkpoint.mode=full", "training.param_dtype=bfloat16"])[0]
    assert unique == graphs and breaks > 0, (unique, breaks)
    assert diff < 1e-3, diff
