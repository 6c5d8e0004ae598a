"""Tensor parallel (+ sequence parallel, async TP), context parallel and their compositions with
data parallel, end to end through the trainer: every layout must reproduce the one-process run
(same losses per step and same final parameters, fp32, relative difference < 1e-5), and a
checkpoint written under one layout resumes under another."""
import shutil

import pytest
import torch

from tests.distributed import run_ranks
from tests.harness import TINY, assert_layout_refused, assert_same_losses, assert_same_params, train_run

KV4 = ["model.n_heads=8", "model.n_kv_heads=4"]  # tp = 4 needs whole kv heads on every rank


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the tiny model, a checkpoint at step 3 (for the resume test) and at the end."""
    folder = tmp_path_factory.mktemp("ref")
    rows, params = train_run(folder, 1, ["checkpoint.interval=3"])
    return rows, params, folder / "run"


@pytest.fixture(scope="module")
def reference_kv4(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("ref_kv4"), 1, KV4)


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp2")
    rows, params = train_run(folder, 2, ["parallelism.tp=2", "checkpoint.interval=3"])
    return rows, params, folder / "run"


def test_tp_2(tp2_run, reference):
    assert_same_losses(tp2_run[0], reference[0])
    assert_same_params(tp2_run[1], reference[1])


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"]),
    (2, ["parallelism.cp=2"]),
    (4, ["parallelism.cp=4"]),
    (4, ["parallelism.cp=2", "parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    (4, ["parallelism.dp_replicate=2", "parallelism.tp=2"]),
    (4, ["parallelism.dp_replicate=2", "parallelism.cp=2", "parallelism.cp_rotate=allgather"]),
    # selective AC recomputes the query projection: under async TP its matmul is the gathered chunks';
    # under FSDP the recompute's weights are rebuilt by FSDP's unpack hook (async_tp.py's row matmul)
    (4, ["parallelism.dp_shard=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
         "parallelism.async_tp=true", "activation_checkpoint.mode=selective"]),
    (2, ["parallelism.cp=2", "activation_checkpoint.mode=selective"]),
    # selective = "attention" keeps the attention's results: under cp they are the ring's per-step kernels'
    (2, ["parallelism.cp=2", "activation_checkpoint.mode=selective", "activation_checkpoint.selective=attention"]),
], ids=["tp2_sp", "tp2_sp_async", "cp2", "cp4", "cp2_tp2_sp", "dp2_tp2", "dp2_cp2_allgather", "dp2_shard_tp2_sp_async_selective",
        "cp2_selective", "cp2_selective_attention"])
def test_layout_matches_one_process(tmp_path, reference, world, overrides):
    rows, params = train_run(tmp_path, world, overrides)
    assert_same_losses(rows, reference[0])
    assert_same_params(params, reference[1])


def test_tp_4(tmp_path, reference_kv4):
    rows, params = train_run(tmp_path, 4, KV4 + ["parallelism.tp=4"])
    assert_same_losses(rows, reference_kv4[0])
    assert_same_params(params, reference_kv4[1])


def _cp_parts(rank, world):
    from minititan.collectives.mesh import Mesh
    from minititan.core.config import load_config
    from minititan.layout import parallelize
    cfg = load_config(None, TINY + [f"parallelism.cp={world}"])
    layout = parallelize.build(cfg, Mesh({"cp": world}, rank), torch.device("cpu"))
    tokens = torch.arange(3 * cfg.training.seq_len).view(3, -1)  # each token its position + row * seq_len
    return layout.prepare(tokens, tokens + 1)


def test_cp_ranks_get_their_tokens_with_their_positions():
    """Each cp rank keeps its part of every sequence and the global positions of exactly those
    tokens (RoPE reads them), and together the ranks hold each position once. The end-to-end runs
    see wrong positions only faintly: a freshly initialised tiny model attends almost uniformly."""
    seq_len = 32
    seen = []
    for inputs, labels, positions in run_ranks(2, _cp_parts):
        held = (inputs % seq_len)[0].tolist()
        assert torch.equal(inputs % seq_len, positions.expand_as(inputs)), f"tokens at {held}, positions {positions}"
        assert torch.equal(labels, inputs + 1)
        seen += positions.tolist()
    assert sorted(seen) == list(range(seq_len))


def resume_from_step_3(run_folder, tmp_path):
    """A copy of a finished run's folder with its last checkpoint removed: resuming continues at step 4."""
    shutil.copytree(run_folder, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")


def test_checkpoint_from_tp_2_resumes_at_tp_1(tmp_path, tp2_run, reference):
    resume_from_step_3(tp2_run[2], tmp_path)
    rows, params = train_run(tmp_path, 1, ["checkpoint.interval=3"], name="resumed")
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses(rows, reference[0][3:])
    assert_same_params(params, reference[1])


def test_checkpoint_from_tp_1_resumes_at_tp_2_sp(tmp_path, reference):
    resume_from_step_3(reference[2], tmp_path)
    rows, params = train_run(tmp_path, 2, ["parallelism.tp=2", "parallelism.sequence_parallel=true",
                                           "checkpoint.interval=3"], name="resumed")
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses(rows, reference[0][3:])
    assert_same_params(params, reference[1])


@pytest.mark.parametrize("world, overrides, words", [
    (4, ["parallelism.tp=4"], ["model.n_kv_heads=2", "parallelism.tp=4"]),
    (2, ["parallelism.tp=2", "model.vocab_size=255"], ["model.vocab_size=255", "parallelism.tp=2"]),
    (4, ["parallelism.tp=4", "model.n_kv_heads=4", "parallelism.sequence_parallel=true", "training.seq_len=34"],
     ["training.seq_len", "parallelism.tp=4"]),
    (2, ["parallelism.cp=2", "training.seq_len=30"], ["training.seq_len", "multiple of 4"]),
    (2, ["parallelism.tp=2", "parallelism.async_tp=true"], ["parallelism.sequence_parallel"]),
], ids=["kv_heads", "vocab", "sp_seq_len", "cp_seq_len", "async_without_sp"])
def test_bad_layout_names_the_fix(world, overrides, words):
    assert_layout_refused(world, overrides, words)


@pytest.mark.parametrize("overrides, words, fix", [
    (["model.name=moe", "parallelism.ep=2"], ["MoE blocks run uncompiled", "ep_capacity_factor > 0"],
     "parallelism.ep_capacity_factor=1.25"),
    (["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"],
     ["tensor-parallel blocks run uncompiled", "async_tp = false"], "parallelism.async_tp=false"),
    (["parallelism.cp=2"], ["attention blocks run uncompiled", 'mode = "full"'], "activation_checkpoint.mode=full"),
], ids=["ep_exact", "async_tp", "cp"])
def test_uncompiled_blocks_under_checkpointing_are_warned(overrides, words, fix):
    """A graph break inside a block checkpointed by a selective policy leaves it uncompiled (under full
    AC it compiles in pieces: test_compile.py): `minititan train` says so, with settings under which it
    compiles, and following the advice silences the warning."""
    from minititan.core.config import load_config
    from minititan.layout.parallelize import uncompiled_blocks
    on = ["compile.enable=true", "activation_checkpoint.mode=selective"]
    [line] = uncompiled_blocks(load_config(None, TINY + overrides + on))
    assert all(w in line for w in words), line
    for settings in ([fix], ["activation_checkpoint.mode=full"], ["activation_checkpoint.mode=none"],
                     ["activation_checkpoint.selective=2"], ["compile.enable=false"]):
        assert uncompiled_blocks(load_config(None, TINY + overrides + on + settings)) == []
