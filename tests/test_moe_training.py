"""The mixture of experts end to end through the trainer: dp_replicate, dp_shard (FSDP), tp plain
(MoE replicated over tp), with sequence parallel and async TP (each tp rank routes its slice of the
sequence), cp (balance statistics summed over each sequence's ranks), expert parallel alone and
composed with HSDP, pipeline parallel, tp with sequence parallel (or async TP) and cp, and ep = 2 of dp_shard = 4
(expert FSDP: each expert slice sharded over its 2-rank expert-dp group) must reproduce the
one-process run (same losses per step, grad norms, expert-load metrics and final parameters, fp32,
relative difference < 1e-5), with the aux loss and the expert-bias update on. Checkpoints written
at ep = 4 and at dp_shard 4 x ep 2 resume in one process, and the one-process checkpoint resumes at
dp_shard 4 x ep 2, whose ranks hold half of their expert slice each; expert FSDP also composes
with cp, full AC, FSDP kept gathered, HSDP, tp, sequence parallel and pp (up to 8 ranks), and whole
experts with HSDP and sequence parallel (their grads summed over dp_replicate x tp, both of size 2);
`minititan train -c configs/moe_debug.toml` logs the expert loads; a layout ep cannot make is refused with the fix.

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

from tests.distributed import run_ranks
from tests.harness import (TINY, assert_layout_refused, assert_same_losses, assert_same_params, finished_run,
                           train_runs)

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
    "ep2_capped": ["parallelism.dp_shard=2", "parallelism.ep=2", "parallelism.ep_capacity_factor=2.0"],  # no sync
}
FOUR_RANKS = {
    "ep4": ["parallelism.dp_shard=4", "parallelism.ep=4", "checkpoint.interval=3"],
    "dp_shard4_ep2": ["parallelism.dp_shard=4", "parallelism.ep=2", "checkpoint.interval=3"],  # expert FSDP
    "ep2_hsdp": ["parallelism.dp_replicate=2", "parallelism.dp_shard=2", "parallelism.ep=2"],
    "ep2_pp2": ["parallelism.pp=2", "parallelism.dp_shard=2", "parallelism.ep=2"],
    "tp2_sp_ep2": ["parallelism.dp_shard=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
                   "parallelism.ep=2"],
    "tp2_async_ep2": ["parallelism.dp_shard=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
                      "parallelism.async_tp=true", "parallelism.ep=2"],
    "cp2_tp2_sp_ep2": ["parallelism.cp=2", "parallelism.tp=2", "parallelism.sequence_parallel=true",
                       "parallelism.ep=2"],  # each sequence split over 4 ranks (cp x tp)
}
EXPERT_FSDP_FOUR_RANKS = {  # ep 2 of an ep-able width of 4: each expert slice sharded over 2 ranks
    "cp4_ep2": ["parallelism.cp=4", "parallelism.ep=2"],
    "dp_shard2_cp2_ep2": ["parallelism.dp_shard=2", "parallelism.cp=2", "parallelism.ep=2"],
    "dp_shard4_ep2_ac_full": ["parallelism.dp_shard=4", "parallelism.ep=2", "activation_checkpoint.mode=full"],
    "dp_shard4_ep2_keep_gathered": ["parallelism.dp_shard=4", "parallelism.ep=2",
                                    "parallelism.fsdp_reshard_after_forward=false",
                                    "parallelism.fsdp_reduce_every_microbatch=false", "training.local_batch_size=1"],
}
EIGHT_RANKS = {
    "hsdp2x4_ep2": ["parallelism.dp_replicate=2", "parallelism.dp_shard=4", "parallelism.ep=2",
                    "training.local_batch_size=1"],
    "dp_shard4_tp2_ep2": ["parallelism.dp_shard=4", "parallelism.tp=2", "parallelism.ep=2"],
    "dp_shard2_cp2_tp2_sp_ep2": ["parallelism.dp_shard=2", "parallelism.cp=2", "parallelism.tp=2",
                                 "parallelism.sequence_parallel=true", "parallelism.ep=2"],
    "pp2_dp_shard4_ep2": ["parallelism.pp=2", "parallelism.dp_shard=4", "parallelism.ep=2"],
    # not expert FSDP (ep = dp_shard): whole experts, their grads summed over dp_replicate x tp under SP
    "hsdp2x2_tp2_sp_ep2": ["parallelism.dp_replicate=2", "parallelism.dp_shard=2", "parallelism.tp=2",
                           "parallelism.sequence_parallel=true", "parallelism.ep=2"],
}
LOAD = "moe/max_load_over_mean"


def assert_matches(run, reference, name):
    """Loads, losses, grad norms and params as one process (rel. 1e-5)."""
    try:
        assert len(run[0]) == len(reference[0])
        for a, b in zip(run[0], reference[0]):  # the expert loads first: they show a routing bug at step 1
            for key in (LOAD, "moe/balance_loss"):
                assert math.isfinite(a[key]) and abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), \
                    f"step {a['step']}: {key} {a[key]} vs {b[key]}"
        assert_same_losses(run[0], reference[0])  # and the grad norms
        assert_same_params(run[1], reference[1])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The one-process run's folder (checkpoints at steps 3 and 6), its metric rows and final params."""
    folder = tmp_path_factory.mktemp("reference")
    return folder / "one", train_runs(folder, 1, {"one": ["checkpoint.interval=3"]}, common=MOE)["one"]


@pytest.fixture(scope="module")
def reference(reference_run):
    return reference_run[1]


def test_two_rank_layouts(tmp_path, reference):
    for name, run in train_runs(tmp_path, 2, TWO_RANKS, common=MOE).items():
        assert_matches(run, reference, name)
        # the capped exchange at capacity factor ep never drops; the exact ones log no drop fraction
        assert all(row.get("moe/dropped_fraction") == (0.0 if name == "ep2_capped" else None) for row in run[0])


def test_four_rank_layouts_and_resume_from_ep_4_in_one_process(tmp_path, reference):
    """One test, so that the runs start once however pytest-xdist spreads the tests."""
    for name, run in train_runs(tmp_path, 4, FOUR_RANKS, common=MOE).items():
        assert_matches(run, reference, name)
    resumed = {"resumed": "ep4", "resumed_from_dp_shard4_ep2": "dp_shard4_ep2"}
    for name, saved in resumed.items():
        shutil.copytree(tmp_path / saved, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-00000006")
    runs = train_runs(tmp_path, 1, {name: ["checkpoint.interval=3"] for name in resumed}, common=MOE)
    for name, (rows, params) in runs.items():
        assert [r["step"] for r in rows] == [4, 5, 6]
        assert_matches((rows, params), (reference[0][3:], reference[1]), f"{name} at ep 1")


def test_expert_fsdp_compositions(tmp_path, reference):
    """Expert FSDP (ep smaller than the ranks it folds into) under cp, full AC, unsharded-between-
    micro-batches FSDP, HSDP, plain tp, sequence parallel with cp, and pp; whole experts under HSDP
    with sequence parallel."""
    for world, layouts in ((4, EXPERT_FSDP_FOUR_RANKS), (8, EIGHT_RANKS)):
        for name, run in train_runs(tmp_path, world, layouts, common=MOE).items():
            assert_matches(run, reference, name)


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
    for row in rows:  # every MoE layer's busiest and idlest expert against the mean; the worst is the LOAD
        busiest, idlest = row["moe/max_load_over_mean_by_layer"], row["moe/min_load_over_mean_by_layer"]
        assert list(busiest) == list(idlest) == ["0", "1", "2", "3"]
        assert abs(max(busiest.values()) - row[LOAD]) < 1e-4 and all(0 <= v <= 1 for v in idlest.values())
    assert "by_layer" not in r.stdout  # the tables go to metrics.jsonl, not the console line


def _expert_shards_then_resume(rank, world, overrides):
    """The layout's expert storage at these overrides, then the training run they describe."""
    import torch
    from minititan.collectives.mesh import Mesh, resolve_degrees
    from minititan.core.config import load_config
    from minititan.layout import parallelize
    from minititan.train import train
    cfg = load_config(None, overrides)
    layout = parallelize.build(cfg, Mesh(resolve_degrees(world, dp_shard=cfg.parallelism.dp_shard), rank),
                               torch.device("cpu"))
    slices = {name: s for name, (_, s) in layout.chunks(layout.params).items() if ".moe.experts." in name}
    stored = {name: t.numel() for name, t in layout.params.items() if ".moe.experts" in name}
    return stored, slices, train(cfg)


def test_expert_fsdp_holds_half_a_slice_and_resumes_the_one_process_checkpoint(tmp_path, reference_run):
    """dp_shard 4 x ep 2: the 2 ranks holding the same 2 experts (an expert-dp group) each keep half
    of them, as one flat shard per MoE layer; the one-process checkpoint of step 3 resumes there."""
    folder, reference = reference_run
    shutil.copytree(folder / "checkpoints" / "step-00000003", tmp_path / "checkpoints" / "step-00000003")
    overrides = TINY + MOE + ["parallelism.dp_shard=4", "parallelism.ep=2", "checkpoint.interval=3",
                              f"job.dump_folder={tmp_path}"]
    results = run_ranks(4, _expert_shards_then_resume, overrides)
    slice_numel = 2 * 3 * 64 * 64  # 2 of the 4 experts, each w1, w2, w3 of moe_hidden_dim x dim = 64 x 64
    for stored, slices, _ in results:
        assert sorted(stored) == ["layers.0.moe.experts", "layers.1.moe.experts"]  # a shard per layer, no w1/w2/w3
        for layer, numel in stored.items():
            chunks = [s for name, s in slices.items() if name.startswith(layer + ".")]
            assert all(s.box[0][1] - s.box[0][0] == 2 for s in chunks)
            assert sum(s.flat[1] - s.flat[0] for s in chunks) == numel  # its chunks are its shard, no padding
            assert 2 * numel == slice_numel
    rows = results[0][2]
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_matches(finished_run(overrides, rows), (reference[0][3:], reference[1]), "one process -> dp_shard4_ep2")


QWEN_FEATURES = ["model.qk_norm=true", "model.qkv_bias=true", "model.head_dim=32", "model.shared_expert_gate=true",
                 "model.n_layers=3", "model.n_dense_layers=1", "model.route_norm=true", "model.route_scale=2.0"]


def test_qwen_and_deepseek_features_match_one_process(tmp_path):
    """Per-head q/k norms (summed over tp under sequence parallel), q/k/v biases (split with wq/wk/wv),
    heads wider than dim / n_heads, the gated shared expert, a dense first block and scaled routing weights
    train under tp with sequence parallel, FSDP and ep as in one process."""
    # AdamW's eps at 1e-5: an element whose gradient is at rounding level (the k bias's, nearly
    # invariant under the softmax; one of wo's 8192 on torch 2.11) still moves by about lr at
    # eps = 1e-8, in a direction the summation order decides, and so differs between layouts by up
    # to 3e-5 of its tensor's norm. At 1e-5 every tensor matches to 1e-6 on torch 2.11 and 2.13,
    # and a wrong split or a missing sum still errs by far more.
    common = MOE + QWEN_FEATURES + ["optimizer.eps=1e-5"]
    reference = train_runs(tmp_path, 1, {"one": []}, common=common)["one"]
    layouts = {"tp2_sp": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],
               "dp_shard2_ep2": ["parallelism.dp_shard=2", "parallelism.ep=2"]}
    for name, run in train_runs(tmp_path, 2, layouts, common=common).items():
        assert_matches(run, reference, name)


@pytest.mark.parametrize("world, overrides, words", [
    (2, ["parallelism.dp_shard=2", "parallelism.ep=2"], ["model.name", "parallelism.ep = 1"]),
    (2, MOE + ["parallelism.dp_shard=2", "parallelism.ep=2", "model.n_experts=3", "model.top_k=1"],
     ["model.n_experts=3", "parallelism.ep=2"]),
    (4, MOE + ["parallelism.dp_replicate=2", "parallelism.dp_shard=2", "parallelism.ep=4"],
     ["parallelism.ep=4", "dp_shard x cp = 2"]),
    (2, ["parallelism.tp=2", "model.qk_norm=true"], ["model.qk_norm", "parallelism.sequence_parallel = true"]),
    (2, MOE + ["parallelism.dp_shard=2", "parallelism.ep_capacity_factor=1.5"], ["ep_capacity_factor", "ep > 1"]),
], ids=["llama3", "n_experts", "ep_over_dp_shard", "qk_norm_plain_tp", "capacity_without_ep"])
def test_bad_layout_names_the_fix(world, overrides, words):
    assert_layout_refused(world, overrides, words)
