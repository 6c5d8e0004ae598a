"""The mixture of experts end to end through the trainer: dp_replicate, dp_shard (FSDP), tp plain
(MoE replicated over tp), with sequence parallel and async TP (each tp rank routes its slice of the
sequence), cp (balance statistics summed over each sequence's ranks), expert parallel alone and
composed with HSDP, pipeline parallel, tp with sequence parallel and cp must reproduce the
one-process run (same losses per step, grad norms, expert-load metrics and final parameters, fp32,
relative difference < 1e-5), with the aux loss and the expert-bias update on. A checkpoint written
at ep = 4 resumes in one process; `minititan train -c configs/moe_debug.toml` logs the expert
loads; a layout ep cannot make is refused with the fix.

Starting ranks costs more than training the tiny model, so the runs of one world size share one
set of ranks, each run in its own folder."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import assert_layout_refused, assert_same_losses, assert_same_params, train_runs

MOE = ["model.name=moe", "model.n_experts=4", "model.top_k=2", "model.moe_hidden_dim=64", "model.n_shared_experts=1",
       "model.aux_loss_coef=0.01", "model.bias_update_rate=0.01"]
TWO_RANKS = {
    "dp_replicate2": ["parallelism.dp_replicate=2"],
    "dp_shard2": ["parallelism.dp_shard=2"],
    "ep2": ["parallelism.dp_shard=2", "parallelism.ep=2"],
    "tp2": ["parallelism.tp=2"],
    "tp2_sp": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],
    "tp2_async": ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.async_tp=true"],
    "cp2": ["parallelism.cp=2"],
    "cp2_ep2": ["parallelism.cp=2", "parallelism.ep=2"],
}
FOUR_RANKS = {
    "ep4": ["parallelism.dp_shard=4", "parallelism.ep=4", "checkpoint.interval=3"],
    "ep2_hsdp": ["parallelism.dp_replicate=2", "parallelism.dp_shard=2", "parallelism.ep=2"],
    "ep2_pp2": ["parallelism.pp=2", "parallelism.dp_shard=2", "parallelism.ep=2"],
    "tp2_sp_ep2": ["parallelism.dp_shard=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
                   "parallelism.ep=2"],
    "cp2_tp2_sp_ep2": ["parallelism.cp=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
                       "parallelism.ep=2"],  # each sequence split over 4 ranks (cp x tp)
}
LOAD = "moe/max_load_over_mean"


def assert_matches(run, reference, name):
    try:
        assert_same_losses(run[0], reference[0])
        for a, b in zip(run[0], reference[0]):
            for key in ("grad_norm", LOAD, "moe/balance_loss"):
                assert math.isfinite(a[key]) and abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
        assert_same_params(run[1], reference[1])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_runs(tmp_path_factory.mktemp("reference"), 1, {"one": []}, common=MOE)["one"]


def test_two_rank_layouts(tmp_path, reference):
    for name, run in train_runs(tmp_path, 2, TWO_RANKS, common=MOE).items():
        assert_matches(run, reference, name)


def test_four_rank_layouts_and_resume_from_ep_4_in_one_process(tmp_path, reference):
    """One test, so that the runs start once however pytest-xdist spreads the tests."""
    for name, run in train_runs(tmp_path, 4, FOUR_RANKS, common=MOE).items():
        assert_matches(run, reference, name)
    shutil.copytree(tmp_path / "ep4", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    rows, params = train_runs(tmp_path, 1, {"resumed": ["checkpoint.interval=3"]}, common=MOE)["resumed"]
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_matches((rows, params), (reference[0][3:], reference[1]), "resumed at ep 1")


def test_moe_debug_config_logs_expert_loads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minititan.cli", "train", "-c", "configs/moe_debug.toml",
                        "--training.steps=2", "--metrics.log_freq=1", "--checkpoint.enable=false",
                        "--training.device=cpu", f"--job.dump_folder={tmp_path}"],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # the test ranks share the cores
    assert r.returncode == 0, r.stderr
    assert LOAD in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(1.0 <= row[LOAD] < 8 and math.isfinite(row["moe/balance_loss"]) for row in rows), rows


@pytest.mark.parametrize("world, overrides, words", [
    (2, ["parallelism.dp_shard=2", "parallelism.ep=2"], ["model.name", "parallelism.ep = 1"]),
    (2, MOE + ["parallelism.dp_shard=2", "parallelism.ep=2", "model.n_experts=3", "model.top_k=1"],
     ["model.n_experts=3", "parallelism.ep=2"]),
    (4, MOE + ["parallelism.dp_replicate=2", "parallelism.dp_shard=2", "parallelism.ep=4"],
     ["parallelism.ep=4", "dp_shard x cp = 2"]),
], ids=["llama3", "n_experts", "ep_over_dp_shard"])
def test_bad_layout_names_the_fix(world, overrides, words):
    assert_layout_refused(world, overrides, words)
