"""Tensor parallel (plain, sequence parallel, async) against the single-process model, on gloo.

Each rank slices the full params, runs model.loss_sum with the TP ops, and compares the loss and
the re-assembled gradients to the reference. FSDP x TP (dp_shard 2 x tp 2) is tested with FSDP.
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from minititan.collectives import tensor_parallel as tpm
from minititan.core import model
from minititan.core.config import Model, hidden_dim
from tests.distributed import run_ranks

BATCH, SEQ = 2, 32  # batch 2 exercises the sequence-dim reshuffles that batch 1 makes trivial


def tiny_model(n_kv_heads: int) -> Model:
    return Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=256, multiple_of=32)


def batch(cfg: Model) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels[0, :3] = tpm.IGNORE_INDEX  # ignored labels must drop out of the loss, as in F.cross_entropy
    return tokens, labels


def loss_and_grads(params, tokens, labels, cfg, ops=None):
    params = {n: t.detach().requires_grad_() for n, t in params.items()}
    loss = model.loss_sum(params, tokens, labels, cfg, ops)
    loss.backward()
    return loss.detach(), params


def gather_shards(t: torch.Tensor, dim: int | None, group) -> torch.Tensor:
    if dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _parity(rank, world, n_kv_heads, layouts):
    """For each (sequence_parallel, async_tp, chunks): loss and worst per-tensor gradient rel diff."""
    group = dist.group.WORLD
    cfg = tiny_model(n_kv_heads)
    tokens, labels = batch(cfg)
    full = model.init(cfg, seed=0)
    ref_loss, ref_params = loss_and_grads(full, tokens, labels, cfg)

    out = []
    for sequence_parallel, async_tp, chunks in layouts:
        ops = dataclasses.replace(model.default_ops(cfg), **tpm.tp_ops(group, sequence_parallel, async_tp, chunks))
        loss, params = loss_and_grads(tpm.shard_params(full, model.tp_shard_dim, rank, world), tokens, labels, cfg, ops)
        if sequence_parallel:
            tpm.sum_in_place([p.grad for n, p in params.items() if model.tp_shard_dim(n) is None], group)
        worst = max((rel_diff(gather_shards(p.grad, model.tp_shard_dim(n), group), ref_params[n].grad), n)
                    for n, p in params.items())
        out.append(((sequence_parallel, async_tp, chunks), rel_diff(loss, ref_loss), worst))
    return out


LAYOUTS = [(False, False, 1), (True, False, 1), (True, True, 2), (True, True, 3)]  # 3 chunks: uneven pieces


@pytest.mark.parametrize("tp, n_kv_heads", [(2, 2), (4, 4)])
def test_matches_single_process(tp, n_kv_heads):
    for rank_results in run_ranks(tp, _parity, n_kv_heads, LAYOUTS):
        for layout, loss_diff, (grad_diff, name) in rank_results:
            assert loss_diff < 1e-5, f"layout {layout}: loss rel diff {loss_diff}"
            assert grad_diff < 1e-5, f"layout {layout}: grad of {name} rel diff {grad_diff}"


def test_shard_dims_by_name():
    cfg = tiny_model(2)
    dims = {n: model.tp_shard_dim(n) for n in model.param_shapes(cfg)}
    assert dims["tok_embeddings"] == dims["output"] == 0
    assert dims["layers.1.attention.wk"] == dims["layers.0.feed_forward.w3"] == 0
    assert dims["layers.1.attention.wo"] == dims["layers.0.feed_forward.w2"] == 1
    assert dims["norm"] is dims["layers.0.attention_norm"] is dims["layers.1.ffn_norm"] is None
    assert model.tp_shard_dim("attention.wq") == 0 and model.tp_shard_dim("feed_forward.w2") == 1  # unit-local names
    assert tpm.shard_tensor(torch.arange(8.0).view(2, 4), 1, 1, 2).tolist() == [[2.0, 3.0], [6.0, 7.0]]


@pytest.mark.parametrize("change, message", [
    ({"n_heads": 6}, "model.n_heads=6"),
    ({"n_kv_heads": 2}, "model.n_kv_heads=2"),  # GQA with fewer kv heads than tp ranks is refused
    ({"ffn_hidden_dim": 90}, "feed-forward hidden dim=90"),
    ({"vocab_size": 250}, "model.vocab_size=250"),
    ({"seq_len": 30}, "training.seq_len"),
])
def test_divisibility_errors(change, message):
    cfg = tiny_model(4)
    numbers = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, ffn_hidden_dim=hidden_dim(cfg),
                   vocab_size=cfg.vocab_size, seq_len=SEQ)
    tpm.check_tp_divisibility(4, **numbers)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        tpm.check_tp_divisibility(4, **(numbers | change))


def test_async_tp_needs_sequence_parallel():
    with pytest.raises(ValueError, match="sequence_parallel"):
        tpm.tp_ops(None, sequence_parallel=False, async_tp=True)
