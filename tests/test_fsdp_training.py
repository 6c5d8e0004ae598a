"""FSDP / HSDP (dp_shard) end to end through the trainer, alone and composed with dp_replicate, tp
(+ sequence parallel), cp, activation checkpointing and gradient accumulation: every layout must
reproduce the one-process run (same losses per step and same final parameters; fp32 relative
difference < 1e-5, bf16 < 1e-2). A checkpoint written at dp_shard=4 resumes at dp_shard=2, and
each rank holds 1/dp_shard of the parameters and optimizer state."""
import shutil

import pytest
import torch

from minititan.collectives.fsdp import ALIGN
from minititan.collectives.mesh import Mesh, resolve_degrees
from minititan.core import model
from minititan.core.config import load_config
from minititan.core.optim import AdamW
from minititan.layout import parallelize
from tests.distributed import run_ranks
from tests.harness import TINY, assert_same_losses, assert_same_params, train_run

BF16 = ["training.param_dtype=bfloat16", "training.steps=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("ref"), 1)


@pytest.fixture(scope="module")
def dp_shard_4(tmp_path_factory):
    """dp_shard = 4 with a checkpoint at step 3 (for the resume test)."""
    folder = tmp_path_factory.mktemp("dp_shard_4")
    rows, params = train_run(folder, 4, ["parallelism.dp_shard=4", "checkpoint.interval=3"])
    return rows, params, folder / "run"


def test_dp_shard_4(dp_shard_4, reference):
    assert_same_losses(dp_shard_4[0], reference[0])
    assert_same_params(dp_shard_4[1], reference[1])


@pytest.mark.parametrize("world, overrides", [
    (2, ["parallelism.dp_shard=-1"]),  # fills the world: 2 shards, 2 micro-batches each
    (2, ["parallelism.dp_shard=2", "training.local_batch_size=1"]),  # 4 micro-batches
    (2, ["parallelism.dp_shard=2", "parallelism.fsdp_reshard_after_forward=false",
         "parallelism.fsdp_reduce_every_microbatch=false"]),
    (2, ["parallelism.dp_shard=2", "activation_checkpoint.mode=full"]),
    (4, ["parallelism.dp_replicate=2", "parallelism.dp_shard=2"]),
    (4, ["parallelism.dp_shard=2", "parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    (4, ["parallelism.dp_shard=2", "parallelism.cp=2"]),
], ids=["dp_shard2", "accumulate4", "no_reshard_reduce_last", "ac_full", "hsdp2x2", "tp2_sp",
        "cp2"])
def test_layout_matches_one_process(tmp_path, reference, world, overrides):
    rows, params = train_run(tmp_path, world, overrides)
    assert_same_losses(rows, reference[0])
    assert_same_params(params, reference[1])


def test_bf16_matches_one_process_bf16(tmp_path):
    ref_rows, ref_params = train_run(tmp_path, 1, BF16, name="ref")
    rows, params = train_run(tmp_path, 2, BF16 + ["parallelism.dp_shard=2"])
    assert_same_losses(rows, ref_rows, rtol=1e-2)
    assert_same_params(params, ref_params, rtol=1e-2)


def test_checkpoint_from_dp_shard_4_resumes_at_dp_shard_2(tmp_path, dp_shard_4, reference):
    shutil.copytree(dp_shard_4[2], tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    rows, params = train_run(tmp_path, 2, ["parallelism.dp_shard=2", "checkpoint.interval=3"], name="resumed")
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses(rows, reference[0][3:])
    assert_same_params(params, reference[1])


def _bytes_per_rank(rank, world, dim="dp_shard"):
    cfg = load_config(None, TINY + [f"parallelism.{dim}={world}"])
    layout = parallelize.build(cfg, Mesh(resolve_degrees(world, **{dim: world}), rank), torch.device("cpu"))
    optimizer = AdamW(layout.params, cfg.optimizer)
    tensors = [*layout.params.values(), *optimizer.exp_avg.values(), *optimizer.exp_avg_sq.values()]
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in layout.params.values())


@pytest.mark.parametrize("dim", ["dp_shard", "cp"])  # cp alone shards too (over its ranks, as torchtitan)
def test_each_rank_holds_a_shard_of_params_and_optimizer_state(dim):
    world = 2
    cfg = load_config(None, TINY).model
    total, n_params, n_units = model.num_params(cfg), len(model.param_shapes(cfg)), len(model.units(cfg))
    per_rank = run_ranks(world, _bytes_per_rank, dim)
    elements = per_rank[0][1]
    assert all(r == per_rank[0] for r in per_rank)
    assert per_rank[0][0] == 3 * 4 * elements  # fp32 master + AdamW's two fp32 moments
    padding = elements * world - total  # alignment gaps and the end of each unit's buffer
    assert 0 <= padding <= (ALIGN - 1) * n_params + (world - 1) * n_units
