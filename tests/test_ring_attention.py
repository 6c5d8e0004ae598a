"""Context-parallel attention (minititan/collectives/ring_attention.py) against full causal attention.

One 4-rank gloo job computes everything (spawning ranks is the slow part): cp = 4 on the whole
world and cp = 2 on the strided groups {0, 2} and {1, 3} (group ranks differ from global ranks,
as they do inside a real mesh). The test process checks its results against a single process.
"""
from __future__ import annotations

import dataclasses
import functools
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minititan.collectives.ring_attention import (context_parallel_attention, math_attention,
                                                  math_attention_backward, shard_positions, shard_sequence,
                                                  unshard_sequence)
from minititan.core import model
from minititan.core.config import Model
from tests.distributed import run_ranks

HEADS = [(6, 2), (3, 1), (5, 5)]  # (query heads, kv heads): GQA, odd groups, plain multi-head
ROTATES = ["ring", "allgather"]
BATCH, SEQ, HEAD_DIM = 2, 32, 16
CFG = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def attention_inputs(hq: int, hkv: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, hq, SEQ, HEAD_DIM, generator=g)
    k, v = (torch.randn(BATCH, hkv, SEQ, HEAD_DIM, generator=g) for _ in range(2))
    dout = torch.randn(BATCH, hq, SEQ, HEAD_DIM, generator=g)
    return q, k, v, dout


def model_inputs() -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g)
    return model.init(CFG, seed=0), tokens, labels


# ---------------------------------------------------------------- what each rank runs


def cp_attention(rank, size, group, rotate, hq, hkv):
    """This rank's output and gradient shards."""
    q, k, v, dout = (shard_sequence(t, rank, size, dim=2) for t in attention_inputs(hq, hkv))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = context_parallel_attention(q, k, v, group, rotate=rotate)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def cp_model(rank, size, group, rotate):
    """loss_sum on this rank's token shard; loss and grads summed over the cp group like a data dim."""
    params, tokens, labels = model_inputs()
    params = {n: p.requires_grad_() for n, p in params.items()}
    ops = dataclasses.replace(model.default_ops(CFG),
                              attention=functools.partial(context_parallel_attention, group=group, rotate=rotate))
    loss = model.loss_sum(params, shard_sequence(tokens, rank, size), shard_sequence(labels, rank, size), CFG, ops,
                          positions=shard_positions(SEQ, rank, size))
    loss.backward()
    loss = loss.detach()
    for t in [loss] + [p.grad for p in params.values()]:
        dist.all_reduce(t, group=group)
    return loss, {n: p.grad for n, p in params.items()}


def worker(rank, world):
    groups = {4: dist.new_group([0, 1, 2, 3])}
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    groups[2] = strided[rank % 2]
    out = {}
    for size, group in groups.items():
        cp_rank = dist.get_rank(group)
        for rotate in ROTATES:
            for hq, hkv in HEADS:
                out[size, rotate, hq, hkv] = cp_attention(cp_rank, size, group, rotate, hq, hkv)
            out[size, rotate, "model"] = cp_model(cp_rank, size, group, rotate)
    # as bytes: many tensors through the result queue would go by shared memory, whose file
    # descriptors can vanish when the rank exits before the test process has read them
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def cp_ranks(size: int) -> list[int]:
    """Global ranks of one cp group, in cp-rank order."""
    return [0, 1, 2, 3] if size == 4 else [0, 2]


# ---------------------------------------------------------------- the checks


def test_context_parallel_matches_single_process():
    """One test for the whole job, so that `pytest -n 2` spawns it once."""
    results = [torch.load(io.BytesIO(data)) for data in run_ranks(4, worker)]
    for size in (2, 4):
        for rotate in ROTATES:
            for hq, hkv in HEADS:
                check_attention(results, size, rotate, hq, hkv)
            check_model(results, size, rotate)


def check_attention(results, size, rotate, hq, hkv):
    """Output and dq, dk, dv equal those of full causal attention on the whole sequence."""
    q, k, v, dout = attention_inputs(hq, hkv)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = model.causal_attention(q, k, v)
    expected.backward(dout)
    shards = [results[r][size, rotate, hq, hkv] for r in cp_ranks(size)]
    for what, got, want in zip(("out", "dq", "dk", "dv"), zip(*shards), (expected, q.grad, k.grad, v.grad)):
        diff = rel_diff(unshard_sequence(list(got), dim=2), want.detach())
        assert diff < 1e-5, f"cp {size} {rotate} hq {hq} hkv {hkv}: {what} off by {diff:.2e}"


def check_model(results, size, rotate):
    """loss_sum and every parameter gradient equal the single-process ones, on every cp rank."""
    params, tokens, labels = model_inputs()
    params = {n: p.requires_grad_() for n, p in params.items()}
    loss = model.loss_sum(params, tokens, labels, CFG)
    loss.backward()
    for r in cp_ranks(size):
        got_loss, got_grads = results[r][size, rotate, "model"]
        assert rel_diff(got_loss, loss.detach()) < 1e-5, f"cp {size} {rotate}: loss {got_loss} != {loss}"
        for name, p in params.items():
            diff = rel_diff(got_grads[name], p.grad)
            assert diff < 1e-5, f"cp {size} {rotate}: grad of {name} off by {diff:.2e}"


def test_shards_cover_the_sequence_head_and_tail():
    assert shard_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    x = torch.arange(2 * 24).view(2, 24)
    assert torch.equal(unshard_sequence([shard_sequence(x, r, 3) for r in range(3)]), x)


def test_sequence_not_divisible_by_two_cp_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_sequence(torch.zeros(1, 30), 0, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_positions(36, 1, 4)


def test_bad_arguments_are_clear_errors():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 3, 8, 16)
    with pytest.raises(ValueError, match="cp_rotate"):
        context_parallel_attention(q, q, q, None, rotate="alltoall")
    with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
        context_parallel_attention(q, k, k, None)
    with pytest.raises(ValueError, match="shard_sequence"):
        context_parallel_attention(q[:, :, :7], q[:, :, :7], q[:, :, :7], None)


@pytest.mark.parametrize("causal", [True, False])
def test_math_fallback_matches_sdpa(causal):
    """The plain-math block (fp32 on CUDA) returns the right lse and gradients."""
    q, k, v, dout = attention_inputs(4, 4)
    k, v = k[:, :, :24], v[:, :, :24]  # non-causal blocks need not be square
    if causal:
        q, dout = q[:, :, :24], dout[:, :, :24]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected.backward(dout)
    out, lse = math_attention(q.detach(), k.detach(), v.detach(), causal)
    scores = q.detach() @ k.detach().transpose(-1, -2) / HEAD_DIM ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
    assert rel_diff(lse, scores.logsumexp(-1)) < 1e-6
    assert rel_diff(out, expected.detach()) < 1e-5
    grads = math_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal)
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert rel_diff(got, want) < 1e-5
