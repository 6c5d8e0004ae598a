"""Pipeline parallel end to end through the trainer: every schedule, pp 2 and 4, pp composed with
tp, cp, dp_replicate and dp_shard, must reproduce the one-process run (same losses per step and same
final parameters, fp32, relative difference < 1e-5); so must validation's forward-only pipeline; a
checkpoint written at pp 2 resumes at pp 1; a pipeline the model or batch cannot make is refused
with the fix.

Starting ranks costs more than training the tiny model, so the runs of one world size share one
set of ranks (train_runs), each run in its own folder."""
import shutil

import pytest

from minititan.core.config import load_config
from minititan.layout import pipeline
from tests.harness import TINY, assert_layout_refused, assert_same_losses, assert_same_params, train_runs

LAYERS4 = ["model.n_layers=4"]  # 4 stages at most: pp 4, or pp 2 x 2 virtual stages
LAYERS8 = ["model.n_layers=8", "training.local_batch_size=4"]  # pp 4 x 2 virtual stages, 4 microbatches
VALIDATE = ["validation.enable=true", "validation.freq=3", "validation.steps=1"]

TWO_RANKS = {
    "1f1b": LAYERS4 + VALIDATE + ["parallelism.pp=2", "checkpoint.interval=3"],
    "gpipe_uneven": LAYERS4 + ["parallelism.pp=2", "parallelism.pp_schedule=gpipe",
                               "parallelism.pp_layers_per_stage=[3, 1]"],
    "interleaved": LAYERS4 + ["parallelism.pp=2", "parallelism.pp_schedule=interleaved_1f1b"],
    "zero_bubble": LAYERS4 + ["parallelism.pp=2", "parallelism.pp_schedule=zero_bubble",
                              "training.local_batch_size=4"],
}
FOUR_RANKS = {
    "pp4_1f1b": LAYERS4 + ["parallelism.pp=4", "training.local_batch_size=4"],
    "pp4_interleaved": LAYERS8 + ["parallelism.pp=4", "parallelism.pp_schedule=interleaved_1f1b"],
    "pp2_cp2": LAYERS4 + ["parallelism.pp=2", "parallelism.cp=2"],
    "pp2_tp2_sp": LAYERS4 + ["parallelism.pp=2", "parallelism.tp=2", "parallelism.sequence_parallel=true"],
    "pp2_dp2": LAYERS4 + ["parallelism.pp=2", "parallelism.dp_replicate=2", "parallelism.pp_schedule=zero_bubble"],
    "pp2_fsdp2": LAYERS4 + ["parallelism.pp=2", "parallelism.dp_shard=2", "parallelism.pp_schedule=zero_bubble"],
}
EIGHT_RANKS = {
    "pp2_fsdp2_tp2": LAYERS4 + ["parallelism.pp=2", "parallelism.dp_shard=2", "parallelism.tp=2",
                                "parallelism.sequence_parallel=true", "parallelism.pp_schedule=interleaved_1f1b",
                                "parallelism.fsdp_reduce_every_microbatch=false"],
}


def assert_matches(run, reference, name):
    try:
        assert_same_losses(run[0], reference[0])
        assert_same_params(run[1], reference[1])
    except AssertionError as e:
        raise AssertionError(f"{name}: {e}") from None


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One process: the 4-layer model (every run but one) and the 8-layer one (pp 4 x 2 virtual)."""
    return train_runs(tmp_path_factory.mktemp("references"), 1,
                      {"layers4": LAYERS4 + VALIDATE, "layers8": LAYERS8})


def test_every_schedule_at_pp_2_validation_and_resume_at_pp_1(tmp_path, references):
    """One test, so that the runs start once however pytest-xdist spreads the tests."""
    runs = train_runs(tmp_path, 2, TWO_RANKS)
    for name, run in runs.items():
        assert_matches(run, references["layers4"], name)

    got = [(r["step"], r["val_loss"]) for r in runs["1f1b"][0] if "val_loss" in r]
    want = [(r["step"], r["val_loss"]) for r in references["layers4"][0] if "val_loss" in r]
    assert [s for s, _ in got] == [s for s, _ in want] == [3, 6]
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) < 1e-5 * b, "validation"

    shutil.copytree(tmp_path / "1f1b", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    rows, params = train_runs(tmp_path, 1, {"resumed": LAYERS4 + ["checkpoint.interval=3"]})["resumed"]
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert_same_losses(rows, references["layers4"][0][3:])
    assert_same_params(params, references["layers4"][1])


def test_pp_4_and_pp_2_composed_with_cp_tp_dp_fsdp(tmp_path, references):
    runs = train_runs(tmp_path, 4, FOUR_RANKS)
    for name, run in runs.items():
        assert_matches(run, references["layers8" if name == "pp4_interleaved" else "layers4"], name)


def test_pp_2_fsdp_2_tp_2(tmp_path, references):
    runs = train_runs(tmp_path, 8, EIGHT_RANKS)
    assert_matches(runs["pp2_fsdp2_tp2"], references["layers4"], "pp2_fsdp2_tp2")


def test_balanced_split_gives_the_output_layer_its_share():
    cfg = load_config(None, TINY + ["model.n_layers=8", "parallelism.pp=2"])
    assert pipeline.layers_per_stage(cfg) == [4, 4]
    big_vocab = load_config(None, TINY + ["model.n_layers=8", "parallelism.pp=2", "model.vocab_size=1024"])
    assert pipeline.layers_per_stage(big_vocab) == [5, 3]  # the output projection costs about 1.2 layers


@pytest.mark.parametrize("world, overrides, words", [
    (4, ["parallelism.pp=4"], ["model.n_layers=2", "4 pipeline stages", "parallelism.pp"]),
    (2, ["parallelism.pp=2", "parallelism.pp_schedule=interleaved_1f1b"], ["pp_virtual_stages=2", "n_layers"]),
    (2, ["parallelism.pp=2", "parallelism.pp_layers_per_stage=[2, 1]"], ["pp_layers_per_stage", "model.n_layers=2"]),
    (2, ["parallelism.pp=2", "parallelism.pp_layers_per_stage=[2]"], ["2 numbers"]),
    (2, ["parallelism.pp=2", "parallelism.pp_microbatches=3"], ["pp_microbatches=3", "local_batch_size=2"]),
    (4, ["parallelism.pp=4", "model.n_layers=8", "parallelism.pp_schedule=interleaved_1f1b"],
     ["multiple of 4", "pp_microbatches"]),
    (2, ["parallelism.pp=2", "parallelism.pp_schedule=interleaved_1f1b", "parallelism.pp_virtual_stages=1"],
     ["pp_virtual_stages >= 2"]),
    (2, ["parallelism.pp=2", "parallelism.pp_schedule=zero_bubble", "activation_checkpoint.mode=selective"],
     ["activation_checkpoint.mode = full"]),
    (2, ["parallelism.pp=2", "parallelism.pp_schedule=zero_bubble", "activation_checkpoint.mode=selective",
         "activation_checkpoint.selective=attention"], ['selective = "attention"', "activation_checkpoint.mode = full"]),
], ids=["too_few_layers", "too_few_layers_virtual", "bad_sum", "bad_length", "microbatches", "interleaved_rounds",
        "one_virtual_stage", "zero_bubble_selective_ac", "zero_bubble_selective_attention"])
def test_bad_pipeline_names_the_fix(world, overrides, words):
    assert_layout_refused(world, overrides, words)
