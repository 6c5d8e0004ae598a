"""data.document_masking: a packed sequence computes each document as if it ran alone, on one
process, through the context-parallel ring, and under cp / tp / pp training (gloo)."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minititan.collectives.ring_attention import context_parallel_attention, shard_sequence
from minititan.core import model
from minititan.core.config import Model
from minititan.core.data import TokenSource
from minititan.core.document_attention import dense_mask
from minititan.data.sampling import document_layout
from tests.distributed import run_ranks
from tests.harness import assert_same_losses, train_runs
from tests.test_data import make_shards

CFG = Model(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
SEQ = 32


def packed_rows(lengths: list[list[int]], seed: int = 0):
    """Rows of random tokens cut into documents of the given lengths: (tokens, positions, documents)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (len(lengths), SEQ), generator=g)
    layouts = [document_layout(torch.tensor([0] + list(torch.tensor(r).cumsum(0)[:-1])).numpy(), 0, SEQ)
               for r in lengths]
    documents = torch.stack([torch.from_numpy(d).long() for d, _ in layouts])
    positions = torch.stack([torch.from_numpy(p) for _, p in layouts])
    return tokens, positions, documents


def test_packed_documents_give_the_losses_of_documents_run_alone():
    lengths = [[5, 9, 3, 15], [32], [1, 30, 1]]
    tokens, positions, documents = packed_rows(lengths)
    params = model.init(CFG, seed=0)
    packed = model.forward(params, tokens, CFG, positions=positions, documents=documents)
    unmasked = model.forward(params, tokens, CFG)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            alone = model.forward(params, tokens[row:row + 1, start:start + n], CFG)[0]
            got = packed[row, start:start + n]
            assert (got - alone).abs().max() < 1e-5 * alone.abs().max(), (row, start, n)
            start += n
    assert not torch.allclose(packed[0, 5:], unmasked[0, 5:], atol=1e-3)  # the mask does something
    # per-document losses: the summed cross-entropy of a document's own predictions
    labels = torch.randint(0, CFG.vocab_size, tokens.shape)
    per_token = F.cross_entropy(packed.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    alone = F.cross_entropy(model.forward(params, tokens[:1, 5:14], CFG)[0], labels[0, 5:14], reduction="sum")
    assert torch.allclose(per_token[0, 5:14].sum(), alone, rtol=1e-5)


def test_one_document_per_row_is_plain_causal_attention():
    q, k, v = torch.randn(2, 4, SEQ, 8), torch.randn(2, 2, SEQ, 8), torch.randn(2, 2, SEQ, 8)
    documents = torch.zeros(2, SEQ, dtype=torch.long)
    masked = model.causal_attention(q, k, v, mask=dense_mask(documents))
    assert torch.allclose(masked, model.causal_attention(q, k, v), atol=1e-6)


def test_the_gpu_block_mask_says_what_the_cpu_mask_says():
    """The CUDA path's FlexAttention BlockMask (built from the document indices) masks like the dense
    CPU mask: checked here with flex_attention's eager reference (the GPU compiles the same call)."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention

    from minititan.core.document_attention import block_mask
    q, k, v = torch.randn(2, 4, 160, 16), torch.randn(2, 2, 160, 16), torch.randn(2, 2, 160, 16)
    documents = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 100, 6, 24]))[None].repeat(2, 1)
    documents[1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is slow: it is the reference here
        got = flex_attention(q, k, v, block_mask=block_mask(documents), enable_gqa=True)
    assert torch.allclose(got, model.causal_attention(q, k, v, mask=dense_mask(documents)), atol=1e-5)


@pytest.mark.parametrize("batch, seq, mean_length", [(2, 1024, 200), (1, 1000, 100), (3, 512, 1000), (2, 384, 20)])
def test_the_block_mask_is_the_one_create_block_mask_builds(batch, seq, mean_length):
    """block_mask builds from the tiles' first and last documents what create_block_mask finds by
    evaluating the rule at every position: the same tiles, the same order, full ones apart (sequences
    cut short of a whole tile included)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from minititan.core.document_attention import block_mask
    g = torch.Generator().manual_seed(seq)
    lengths = (torch.empty(batch, seq).exponential_(1 / mean_length, generator=g).long() + 1)
    documents = torch.stack([torch.repeat_interleave(torch.arange(seq), row)[:seq] for row in lengths])

    def rule(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    want, got = create_block_mask(rule, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device="cpu"), block_mask(documents)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.seq_lengths, got.BLOCK_SIZE) == (want.seq_lengths, want.BLOCK_SIZE)


def ring_documents(rank, world, rotate):
    """Context-parallel attention with documents on this rank's shard, against one process."""
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(3)
    q, dout = torch.randn(2, 4, SEQ, 8, generator=g), torch.randn(2, 4, SEQ, 8, generator=g)
    k, v = torch.randn(2, 2, SEQ, 8, generator=g), torch.randn(2, 2, SEQ, 8, generator=g)
    _, _, documents = packed_rows([[5, 9, 3, 15], [16, 16]])
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = model.causal_attention(*whole, mask=dense_mask(documents))
    ref.backward(dout)
    mine = [shard_sequence(t, rank, world, dim=2).requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*mine, group=group, rotate=rotate, mask=shard_sequence(documents, rank, world))
    out.backward(shard_sequence(dout, rank, world, dim=2))
    errors = [(out - shard_sequence(ref, rank, world, dim=2)).abs().max()]
    errors += [(t.grad - shard_sequence(w.grad, rank, world, dim=2)).abs().max() for t, w in zip(mine, whole)]
    return [float(e) for e in errors]


@pytest.mark.parametrize("rotate", ["ring", "allgather"])
def test_ring_attention_respects_document_boundaries(rotate):
    for errors in run_ranks(4, ring_documents, rotate):
        assert max(errors) < 1e-5, errors


def test_batches_carry_documents_that_match_the_one_process_model(tmp_path):
    """Through the data path: a shard folder's batch with documents trains a finite loss."""
    data = TokenSource(make_shards(tmp_path), 256)
    b = data.read(0, 1, 4, SEQ, documents=True)
    params = model.init(CFG, seed=0)
    loss = model.loss_sum(params, b.inputs, b.labels, CFG, positions=b.positions, documents=b.documents)
    assert torch.isfinite(loss) and b.documents.max() > 0


LAYOUTS = {
    "cp2": (2, ["parallelism.cp=2"]),
    "cp2_allgather_dp2": (4, ["parallelism.cp=2", "parallelism.cp_rotate=allgather", "parallelism.dp_replicate=2"]),
    "tp2_sp": (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    "pp2": (2, ["parallelism.pp=2", "parallelism.pp_microbatches=2"]),
    "fsdp2": (2, ["parallelism.dp_shard=2"]),
}


def test_document_masked_training_matches_one_process_under_cp_tp_pp(tmp_path):
    folder = make_shards(tmp_path / "corpus", shard_tokens=3000)
    common = [f"data.dataset={folder}", "data.document_masking=true", "data.holdout_fraction=0.1",
              "validation.enable=true", "validation.freq=3", "validation.steps=1"]
    one = train_runs(tmp_path / "one", 1, {"one": []}, common)["one"][0]
    unmasked = train_runs(tmp_path / "plain", 1, {"plain": [f"data.dataset={folder}"]})["plain"][0]
    assert abs(one[-1]["loss"] - unmasked[-1]["loss"]) > 1e-4  # masking changes the run
    by_world: dict[int, dict] = {}
    for name, (world, overrides) in LAYOUTS.items():
        by_world.setdefault(world, {})[name] = overrides
    for world, runs in by_world.items():
        for name, (rows, _) in train_runs(tmp_path / f"w{world}", world, runs, common).items():
            assert_same_losses(rows, one)
            val = [r["val_loss"] for r in rows if "val_loss" in r]
            assert len(val) == 2 and val == pytest.approx([r["val_loss"] for r in one if "val_loss" in r], rel=1e-5), name
