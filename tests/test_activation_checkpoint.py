"""Activation checkpointing changes memory, never numbers; compile keeps the numbers and the graph whole."""
import collections
import dataclasses
import functools
import math

import msgspec
import pytest
import torch

from minititan.core import activation_checkpoint, mixed_precision, model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.config import Model
from minititan.layout.parallelize import cast_gather

CFG = Model(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def loss_and_grads(run_block):
    params = {n: t.requires_grad_() for n, t in model.init(CFG, 0).items()}
    ops = dataclasses.replace(model.default_ops(CFG), run_block=run_block)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    loss = model.loss_sum(params, x, y, CFG, ops)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in params.items()}


@pytest.mark.parametrize("mode, selective", [("full", "op"), ("selective", "op"), ("selective", "attention"),
                                             ("selective", "2")])
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


def saved_tensors(run_block, cfg: Model) -> collections.Counter:
    """What the forward keeps for backward beyond the parameters, as {(shape, dtype): count}, on
    bf16 linears over fp32 masters and the bf16 embedding lookup (core/mixed_precision.py), as the
    GPU rows run."""
    params = {n: t.requires_grad_() for n, t in model.init(cfg, 0).items()}
    saved = collections.Counter()

    def pack(t):
        if not any(t.data_ptr() == p.data_ptr() for p in params.values()):
            saved[tuple(t.shape), t.dtype] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(run_block, cfg, params)
    loss.backward()
    return saved


def training_loss(run_block, cfg: Model, params=None):
    """The loss of one batch on bf16 linears over fp32 masters and the bf16 embedding lookup."""
    params = params or {n: t.requires_grad_() for n, t in model.init(cfg, 0).items()}
    ops = dataclasses.replace(model.default_ops(cfg), run_block=run_block, linear=mixed_precision.linear,
                              embedding=functools.partial(mixed_precision.embedding, dtype=torch.bfloat16),
                              gather=cast_gather(model.default_ops(cfg).gather, torch.bfloat16, True))
    x = torch.randint(0, 256, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    return model.loss_sum(params, x, x, cfg, ops)


def saved_activation_bytes(run_block, cfg: Model) -> int:
    return sum(math.prod(shape) * dtype.itemsize * n for (shape, dtype), n in saved_tensors(run_block, cfg).items())


def test_compiled_full_checkpointing_keeps_only_block_inputs():
    """Compiled, full AC keeps what eager full AC keeps: the blocks' inputs, not the inputs of every
    linear (torch 2.11 keeps the saved tensors of an autograd.Function traced into a checkpointed
    block whatever the policy; mixed_precision.master_linear is why not)."""
    torch._dynamo.reset()
    cfg = msgspec.structs.replace(CFG, dim=256, n_layers=2, max_seq_len=256)  # the partitioner keeps tiny tensors either way
    eager = saved_activation_bytes(block_runner("full", layers_per_forward=cfg.n_layers), cfg)
    compiled = saved_activation_bytes(block_runner("full", compile_blocks=True, layers_per_forward=cfg.n_layers), cfg)
    everything = saved_activation_bytes(block_runner("none", compile_blocks=True), cfg)
    assert compiled < 1.25 * eager < everything / 2, (compiled, eager, everything)


def test_compiled_selective_recomputes_the_weight_casts():
    """Selective AC keeps matmul outputs and recomputes casts: compiled, no block keeps a bf16 copy
    of its weights for backward (a copy of every layer's weights in all), the backward casts them
    again. Without checkpointing the compiled step keeps them, as eager does, and casts once."""
    torch._dynamo.reset()  # (a vocabulary apart from dim: the loss's own bf16 output weight is no block's)
    cfg = msgspec.structs.replace(CFG, dim=256, n_layers=2, max_seq_len=256, vocab_size=384)
    block_weights = collections.Counter((tuple(t.shape), torch.bfloat16) for n, t in model.init(cfg, 0).items()
                                        if n.startswith("layers.") and t.dim() == 2)

    def weight_copies(saved):
        return {key: saved[key] for key in block_weights if saved[key]}

    selective = saved_tensors(block_runner("selective", compile_blocks=True, layers_per_forward=cfg.n_layers), cfg)
    kept = saved_tensors(block_runner("none", compile_blocks=True), cfg)
    assert not weight_copies(selective), weight_copies(selective)
    assert all(kept[key] >= n for key, n in block_weights.items()), (weight_copies(kept), block_weights)


def test_selective_recomputes_the_query_projection(monkeypatch):
    """Selective-op AC keeps every matmul's output but the query projection's. Compiled: one
    [batch, seq, dim] bf16 tensor per layer less saved than keeping them all, and no other change.
    Eager (where the kept outputs sit in checkpoint's own cache): one more matmul per layer in
    backward, the query projection run again."""
    cfg = msgspec.structs.replace(CFG, dim=256, n_layers=2, max_seq_len=256)
    keep_all = activation_checkpoint._selective_op_context

    def measure(recompute_query: bool):
        monkeypatch.setattr(activation_checkpoint, "_selective_op_context",
                            lambda attention_unit: keep_all(attention_unit and recompute_query))
        torch._dynamo.reset()
        saved = saved_activation_bytes(block_runner("selective", compile_blocks=True, layers_per_forward=2), cfg)
        return saved, backward_matmuls(block_runner("selective", layers_per_forward=2), cfg)

    (lean, lean_mms), (everything, all_mms) = measure(True), measure(False)
    assert everything - lean == cfg.n_layers * 2 * cfg.max_seq_len * cfg.dim * 2
    assert lean_mms - all_mms == cfg.n_layers


def test_selective_attention_keeps_only_the_attention_output():
    """selective = "attention" is full AC keeping the attention kernel's results. Compiled: what full
    keeps plus, per layer, the attention output [batch, heads, seq, head_dim] (bf16) and its softmax
    statistics [batch, heads, seq] (fp32). Eager (the kept results sit in checkpoint's own cache):
    the backward runs no attention forward again, where full runs one per layer."""
    cfg = msgspec.structs.replace(CFG, dim=256, n_layers=2, max_seq_len=256)
    b, s, h, L = 2, cfg.max_seq_len, cfg.n_heads, cfg.n_layers

    def compiled(*how):
        torch._dynamo.reset()
        return saved_tensors(block_runner(*how, compile_blocks=True, layers_per_forward=L), cfg)

    full, keep = compiled("full"), compiled("selective", "attention")
    assert keep - full == collections.Counter({((b, h, s, cfg.dim // h), torch.bfloat16): L,
                                               ((b, h, s), torch.float32): L})
    dropped = sum(math.prod(shape) * dtype.itemsize * n for (shape, dtype), n in (full - keep).items())
    assert dropped < b * s * cfg.dim  # (the partitioner's small bookkeeping may differ)
    assert backward_ops(block_runner("full", layers_per_forward=L), cfg, activation_checkpoint._ATTENTION) == L
    assert backward_ops(block_runner("selective", "attention", layers_per_forward=L), cfg,
                        activation_checkpoint._ATTENTION) == 0


def backward_matmuls(run_block, cfg: Model) -> int:
    return backward_ops(run_block, cfg, activation_checkpoint._LINEARS)


def backward_ops(run_block, cfg: Model, ops: set) -> int:
    """How many of `ops` the backward runs (gradients and recomputed outputs), on the same setup as saved_tensors."""
    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in ops
            return func(*args, **(kwargs or {}))

    loss = training_loss(run_block, cfg)
    with Count():
        loss.backward()
    return Count.n
