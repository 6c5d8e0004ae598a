"""Activation checkpointing changes memory, never numbers; compile keeps the numbers and the graph whole."""
import dataclasses

import pytest
import torch

from minititan.core import model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.config import Model

CFG = Model(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def loss_and_grads(run_block):
    params = {n: t.requires_grad_() for n, t in model.init(CFG, 0).items()}
    ops = dataclasses.replace(model.default_ops(CFG), run_block=run_block)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    loss = model.loss_sum(params, x, y, CFG, ops)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("mode, selective", [("full", "op"), ("selective", "op"), ("selective", "2")])
def test_checkpointing_is_bitwise_exact(mode, selective):
    ref_loss, ref_grads = loss_and_grads(block_runner("none"))
    loss, grads = loss_and_grads(block_runner(mode, selective, layers_per_forward=CFG.n_layers))
    assert torch.equal(loss, ref_loss)
    for n in ref_grads:
        assert torch.equal(grads[n], ref_grads[n]), n


def test_compiled_blocks_match_without_graph_breaks():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    ref_loss, ref_grads = loss_and_grads(block_runner("none"))
    loss, grads = loss_and_grads(block_runner("selective", "op", compile_blocks=True, layers_per_forward=CFG.n_layers))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6), n


def test_selective_keeps_float8_amaxes():
    """The recompute casts with the forward's amaxes: backward reduces only what it must (each
    linear's output gradient), the same count as without checkpointing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minititan.core.float8 import float8_ops

    class CountAmax(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAmax.count += func is torch.ops.aten.amax.default
            return func(*args, **(kwargs or {}))

    def backward_amaxes(run_block):
        params = {n: t.requires_grad_() for n, t in model.init(CFG, 0).items()}
        ops = dataclasses.replace(float8_ops(model.default_ops(CFG)), run_block=run_block)
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        loss = model.loss_sum(params, x, x, CFG, ops)
        CountAmax.count = 0
        with CountAmax():
            loss.backward()
        return CountAmax.count

    kept = backward_amaxes(block_runner("none"))
    assert kept == 7 * CFG.n_layers  # one per fp8 linear: its output gradient's
    assert backward_amaxes(block_runner("selective", "op", layers_per_forward=CFG.n_layers)) == kept
