import json
import subprocess
import sys

import pytest
import torch

from tests.harness import assert_same_losses, assert_same_params, train_run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the tiny model: the run every layout must reproduce."""
    return train_run(tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize("world", [2, 4])
def test_dp_replicate_matches_one_process(tmp_path, reference, world):
    rows, params = train_run(tmp_path, world, [f"parallelism.dp_replicate={world}", "training.local_batch_size=1"])
    assert_same_losses(rows, reference[0])
    assert_same_params(params, reference[1])


def test_gradient_accumulation_matches(tmp_path, reference):
    rows, params = train_run(tmp_path, 1, ["training.local_batch_size=1"])
    assert_same_losses(rows, reference[0])
    assert_same_params(params, reference[1])


def test_resume_is_bitwise(tmp_path, reference):
    # stop after step 3 (a checkpoint at 3), then resume to 6: the same losses, bit for bit
    first, _ = train_run(tmp_path, 1, ["training.steps=6", "checkpoint.interval=3"], name="resumed")
    import shutil
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000006")
    rows, params = train_run(tmp_path, 1, ["checkpoint.interval=3"], name="resumed")
    assert [r["step"] for r in rows] == [4, 5, 6]
    ref_rows, ref_params = reference
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows[3:]]
    for n in params:
        assert torch.equal(params[n], ref_params[n]), n


def test_default_cli_run(tmp_path):
    """The README's first command, shortened: trains, logs, checkpoints, samples."""
    r = subprocess.run([sys.executable, "-m", "minititan.cli", "train", "--training.steps=30",
                        f"--job.dump_folder={tmp_path}", "--metrics.log_freq=10"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_sec_per_device", "mfu", "mem_peak_gib",
            "step_time_s"} <= rows[0].keys()
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert "--- sample ---" in r.stdout and "ROMEO:" in r.stdout
    assert (tmp_path / "checkpoints" / "step-00000030" / "manifest.json").is_file()
    plot = subprocess.run([sys.executable, "-m", "minititan.cli", "plot", str(tmp_path / "metrics.jsonl")],
                          capture_output=True, text=True)
    assert plot.returncode == 0 and (tmp_path / "metrics.svg").read_text().startswith("<svg")
