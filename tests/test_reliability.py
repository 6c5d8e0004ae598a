"""A run never loses its progress, and every refusal's advice works when followed: divergence
(nothing non-finite saved, skipped steps), reruns in a finished folder or with another model,
unreadable checkpoints (the fallback), checksums, metrics.jsonl after a resume, memory, usability.
Each test runs the `minititan` CLI in this process (tests/harness.run_cli) on the tiny model."""
import json
import math
import re

import pytest
import torch

from minititan import train as trainer
from minititan.layout import parallelize
from minititan.core import checkpoint as ckpt
from minititan.core.config import load_config
from minititan.core.metrics import MetricsLogger
from tests.harness import TINY, assert_one_line_error, run_cli

FAST = [f"--{o}" for o in TINY] + ["--training.global_batch_size=2", "--data.dataset=synthetic",  # no sample printed
                                   "--checkpoint.interval=2", "--checkpoint.keep_latest_k=0"]


def train(folder, *extra):
    return run_cli("train", *FAST, f"--job.dump_folder={folder}", *extra)


def steps_saved(folder) -> list[int]:
    return [ckpt.Checkpoint(p).step for p in ckpt.list_checkpoints(folder / "checkpoints")]


def all_finite(path) -> bool:
    c = ckpt.Checkpoint(path)
    out = all(bool(torch.isfinite(c.read(n)).all()) for n in c.names())
    c.verify()
    return out


def suggested(err: str, flag: str) -> str:
    """The value an error message suggests for --flag."""
    return re.search(rf"--{re.escape(flag)}=(\S+?)[ ),]", err + " ").group(1)


# ---------------------------------------------------------------- divergence


DIVERGE = ["--optimizer.lr=1e25", "--optimizer.weight_decay=0", "--training.max_norm=0",
           "--lr_scheduler.warmup_steps=0"]


def test_a_diverging_run_saves_nothing_nonfinite_names_the_step_and_its_advice_works(tmp_path):
    assert train(tmp_path, "--training.steps=4").exit_code == 0
    r = train(tmp_path, "--training.steps=10", *DIVERGE)
    err = assert_one_line_error(r, ["not finite", "step-00000004", "--optimizer.lr", "--training.skip_nonfinite_steps"])
    step = int(re.search(r"step (\d+): the loss or gradient norm is", err).group(1))
    assert 4 < step <= 10
    assert steps_saved(tmp_path) == [2, 4]  # the good ones are all there, nothing after them was saved
    assert all_finite(tmp_path / "checkpoints" / "step-00000004")
    r = train(tmp_path, "--training.steps=10", "--optimizer.lr=1e-3")  # the advice: a lower lr, from step 4
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stdout and "step-00000004" in r.stdout
    assert steps_saved(tmp_path)[-1] == 10 and all_finite(tmp_path / "checkpoints" / "step-00000010")


def test_a_nonfinite_state_is_never_saved(tmp_path, monkeypatch):
    """Even when the gradient norm stays finite (here an AdamW moment turns inf), the save refuses."""
    step = trainer.AdamW.step

    def poison_a_moment(self, *args, **kwargs):
        step(self, *args, **kwargs)
        if self.steps == 3:
            next(iter(self.exp_avg_sq.values())).view(-1)[0] = math.inf
    monkeypatch.setattr(trainer.AdamW, "step", poison_a_moment)
    r = train(tmp_path, "--training.steps=6")
    assert_one_line_error(r, ["step 4 is not saved", "inf or NaN", "optim.exp_avg_sq", "step-00000002"])
    assert steps_saved(tmp_path) == [2]


def poison_grads_at(monkeypatch, steps: set[int]):
    """Make the gradients of these steps NaN (as a loss spike would), on whatever layout."""
    forward_backward, calls = trainer.forward_backward, []

    def poisoned(layout, *args, **kwargs):
        loss = forward_backward(layout, *args, **kwargs)
        calls.append(1)
        if len(calls) in steps:
            next(iter(layout.params.values())).grad.view(-1)[0] = math.nan
        return loss
    monkeypatch.setattr(trainer, "forward_backward", poisoned)


def test_skip_nonfinite_steps_skips_on_the_device_and_logs_each(tmp_path, monkeypatch):
    poison_grads_at(monkeypatch, {3, 5})
    r = train(tmp_path, "--training.steps=8", "--training.skip_nonfinite_steps=2", "--metrics.jsonl=true")
    assert r.exit_code == 0, r.output
    assert "step 3: the loss or gradient norm is nan (not finite): update skipped (1 of" in r.stdout
    assert "step 5: the loss or gradient norm is nan (not finite): update skipped (2 of" in r.stdout
    rows = {row["step"]: row for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["grad_norm"] is None and rows[4]["grad_norm"] is not None  # null in the JSON, not NaN
    last = ckpt.Checkpoint(tmp_path / "checkpoints" / "step-00000008")
    assert last.manifest.extra["optimizer_steps"] == 6 and all_finite(last.path)  # 8 steps, 2 not applied


def test_more_nonfinite_steps_than_allowed_stop_the_run(tmp_path, monkeypatch):
    poison_grads_at(monkeypatch, {3, 5})
    r = train(tmp_path, "--training.steps=8", "--training.skip_nonfinite_steps=1")
    assert_one_line_error(r, ["step 5", "not finite", "skipped so far: [3]", "step-00000004"])
    assert steps_saved(tmp_path) == [2, 4]


# ---------------------------------------------------------------- reruns


def test_a_rerun_in_a_finished_folder_says_so_and_both_fixes_work(tmp_path):
    assert train(tmp_path / "a", "--training.steps=4").exit_code == 0
    err = assert_one_line_error(train(tmp_path / "a", "--training.steps=4"),
                                ["nothing is left to train", "--training.steps=8", "--job.dump_folder"])
    r = train(tmp_path / "a", f"--training.steps={suggested(err, 'training.steps')}")
    assert r.exit_code == 0 and "resumed from" in r.stdout and steps_saved(tmp_path / "a")[-1] == 8
    assert train(tmp_path / "b", "--training.steps=4").exit_code == 0  # the other fix: a new folder


def test_a_resume_with_another_model_is_refused_and_the_same_settings_resume(tmp_path):
    assert train(tmp_path, "--training.steps=2").exit_code == 0
    err = assert_one_line_error(train(tmp_path, "--training.steps=4", "--model.n_layers=3", "--model.norm_eps=1e-6"),
                                ["another model", "model.n_layers = 2 there, 3 here", "--job.dump_folder"])
    same = re.search(r"same settings \(([^)]*)\)", err).group(1).split()
    assert sorted(same) == ["--model.n_layers=2", "--model.norm_eps=1e-05"]
    r = train(tmp_path, "--training.steps=4", "--model.n_layers=3", "--model.norm_eps=1e-6", *same)
    assert r.exit_code == 0 and "resumed from" in r.stdout, r.output


def test_resume_false_in_a_folder_with_checkpoints_is_refused(tmp_path):
    assert train(tmp_path / "a", "--training.steps=2").exit_code == 0
    assert_one_line_error(train(tmp_path / "a", "--training.steps=2", "--checkpoint.resume=false"),
                          ["checkpoint.resume = false", "step-00000002", "--job.dump_folder", "move"])
    (tmp_path / "a" / "checkpoints").rename(tmp_path / "old")  # the advice: move it away
    assert train(tmp_path / "a", "--training.steps=2", "--checkpoint.resume=false").exit_code == 0


def test_load_path_fine_tunes_and_its_errors_name_the_key(tmp_path):
    assert train(tmp_path / "pre", "--training.steps=2").exit_code == 0
    assert_one_line_error(train(tmp_path / "ft", "--checkpoint.load_path", tmp_path / "nope"),
                          ["does not exist", "checkpoint.load_path"])
    assert_one_line_error(train(tmp_path / "ft", "--checkpoint.load_path", tmp_path / "pre/checkpoints/step-00000002",
                                "--model.dim=32"), ["checkpoint.load_path", "another shape", "model.dim = 64 there"])
    r = train(tmp_path / "ft", "--training.steps=2", "--checkpoint.load_path", tmp_path / "pre/checkpoints/step-00000002")
    assert r.exit_code == 0 and "loaded parameters from" in r.stdout
    r = train(tmp_path / "ft", "--training.steps=4", "--checkpoint.load_path", tmp_path / "pre/checkpoints/step-00000002")
    assert r.exit_code == 0 and "checkpoint.load_path is used only when the folder holds no checkpoint" in r.stdout


# ---------------------------------------------------------------- unreadable checkpoints


def flip_a_data_byte(path):
    f = path / "rank-00000.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # in the last tensor's bytes: the header still parses
    f.write_bytes(bytes(data))


def truncate_a_file(path):
    f = path / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-8])


def garble_the_manifest(path):
    (path / "manifest.json").write_text("{not json")


@pytest.mark.parametrize("damage", [flip_a_data_byte, truncate_a_file, garble_the_manifest])
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_one_before_resumes(tmp_path, damage):
    assert train(tmp_path, "--training.steps=6").exit_code == 0
    damage(tmp_path / "checkpoints" / "step-00000006")
    r = train(tmp_path, "--training.steps=8", "--checkpoint.keep_latest_k=2")
    assert r.exit_code == 0, r.output
    assert re.search(r"^warning: .*step-00000006.*renamed it step-00000006\.unreadable", r.stdout, re.M), r.stdout
    assert "resumed from" in r.stdout and "step-00000004 (step 4)" in r.stdout
    assert (tmp_path / "checkpoints" / "step-00000006.unreadable").is_dir()  # kept for a look
    assert steps_saved(tmp_path) == [6, 8] and all_finite(tmp_path / "checkpoints" / "step-00000008")


def test_no_readable_checkpoint_is_one_line_and_a_rerun_starts_over(tmp_path):
    assert train(tmp_path, "--training.steps=4").exit_code == 0
    for p in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        flip_a_data_byte(p)
    assert_one_line_error(train(tmp_path, "--training.steps=6"), ["no checkpoint", "can be read", "CRC-32", "rerun"])
    r = train(tmp_path, "--training.steps=6")
    assert r.exit_code == 0 and "steps 1..6" in r.stdout, r.output


def test_a_flipped_byte_fails_the_checksum(tmp_path):
    full = torch.randn(6, 8)
    path = ckpt.save(tmp_path, 1, {"w": (full, ckpt.full_slice(full.shape)), "b": (full[0].clone(), ckpt.full_slice([8]))})
    flip_a_data_byte(path)
    c = ckpt.Checkpoint(path, advice="pass another one")
    c.read("w"), c.read("b")
    with pytest.raises(ckpt.CheckpointError, match="fails its CRC-32 check: pass another one"):
        c.verify()


def test_generate_names_its_own_flag_and_takes_a_folder_of_checkpoints(tmp_path):
    assert train(tmp_path, "--training.steps=4").exit_code == 0
    err = assert_one_line_error(run_cli("generate", "--checkpoint", tmp_path / "nope"), ["--checkpoint"])
    assert "checkpoint.load_path" not in err
    flip_a_data_byte(tmp_path / "checkpoints" / "step-00000004")
    assert_one_line_error(run_cli("generate", "--checkpoint", tmp_path / "checkpoints"), ["CRC-32", "--checkpoint"])
    r = run_cli("generate", "--checkpoint", tmp_path / "checkpoints" / "step-00000002", "--max-new-tokens=5")
    assert r.exit_code == 0 and r.stdout.startswith("ROMEO:")  # the advice: another step-N folder


# ---------------------------------------------------------------- metrics after a resume


def test_metrics_jsonl_after_a_resume_describes_one_run(tmp_path):
    assert train(tmp_path, "--training.steps=6", "--metrics.jsonl=true", "--checkpoint.interval=3").exit_code == 0
    (tmp_path / "checkpoints" / "step-00000006").rename(tmp_path / "gone")  # a crash after logging steps 4-6
    assert train(tmp_path, "--training.steps=6", "--metrics.jsonl=true", "--checkpoint.interval=3").exit_code == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_eta_waits_for_timed_steps_and_smooths(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), False, 1.0, None, 1, 100, enabled=True)
    for step, seconds in ((1, 60.0), (2, 1.0), (6, 4.0), (10, 8.0)):  # step 1 holds the warm-up
        logger.log(step, 1.0, 1.0, 1e-3, 1, seconds, 1 if step < 3 else 4, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert "eta" not in lines[0] and "eta" not in lines[1]  # fewer than 5 steps timed after the first log
    assert lines[2].endswith("eta 0:01:34") and lines[3].endswith("eta 0:02:10")  # 5 s / 5 steps, 13 s / 9


# ---------------------------------------------------------------- memory, and usability


def test_out_of_memory_names_the_fixes_and_lowering_the_batch_works(tmp_path, monkeypatch):
    """Out of memory in a step: one line with the step and what to change; following the first
    fix (a smaller local batch: more micro-batches, the same global batch) trains."""
    forward_backward = trainer.forward_backward

    def needs_small_batches(layout, inputs, labels, n_micro, scale, **kwargs):
        if inputs.shape[0] // n_micro > 1:  # a micro-batch of more than one sequence
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 2814749767 bytes. Error code 12 (Cannot allocate memory)")
        return forward_backward(layout, inputs, labels, n_micro, scale, **kwargs)
    monkeypatch.setattr(trainer, "forward_backward", needs_small_batches)
    err = assert_one_line_error(train(tmp_path, "--training.steps=2"),
                                ["out of memory", "step 1", "host memory", "training.local_batch_size (now 2",
                                 "activation_checkpoint.mode = selective", "profiling.memory_snapshot = true"])
    assert "GiB" in err
    assert train(tmp_path, "--training.steps=2", "--training.local_batch_size=1").exit_code == 0


def test_out_of_memory_while_setting_up_is_one_line(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(trainer, "AdamW", no_memory)
    assert_one_line_error(train(tmp_path, "--training.steps=2"), ["out of memory while setting up", "smaller model",
                                                                  "68719476736 bytes"])


def test_a_model_far_too_big_is_refused_up_front_with_the_numbers(tmp_path):
    err = assert_one_line_error(train(tmp_path, "--model.dim=65536", "--model.n_layers=64", "--model.n_heads=64",
                                      "--model.n_kv_heads=8"), ["does not fit", "B parameters", "GiB", "smaller model"])
    assert re.search(r"need at least \d+\.\d GiB a rank", err)
    assert not (tmp_path / "checkpoints").exists()


def test_nproc_with_the_default_config_derives_the_global_batch():
    cfg = load_config(None, ["training.local_batch_size=4"])
    assert cfg.training.global_batch_size == 0  # unset in debug.toml: derived at launch
    assert parallelize.with_global_batch(cfg, 4).training.global_batch_size == 16  # dp_shard = -1 fills 4 ranks
    assert parallelize.with_global_batch(load_config(None, ["training.global_batch_size=8"]), 4).training.global_batch_size == 8


def test_shipped_configs_are_found_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("llama3_8b", "llama3_8b.toml", "moe_4b", "moe_debug", "deepseek_v3_small", "debug"):
        assert run_cli("config", "-c", name).exit_code == 0, name
    assert load_config("llama3_8b").model.dim == 4096


def test_help_lists_the_config_sections_and_the_options_defaults():
    text = run_cli("train", "--help").stdout
    assert "[parallelism]" in text and "[checkpoint]" in text and "minititan config" in text
    text = run_cli("generate", "--help").stdout
    for option in ("--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed"):
        assert option in text
    assert text.count("[default:") >= 5


def test_plot_has_ticks_grid_lines_and_short_labels(tmp_path):
    rows = [{"step": s, "loss": 6.0 - s / 100, "tokens_per_sec_per_device": 205_000 + 30 * s} for s in range(1, 301, 20)]
    rows[4]["loss"] = None  # a skipped step: a gap in the line
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli("plot", tmp_path / "m.jsonl").exit_code == 0
    svg = (tmp_path / "m.svg").read_text()
    for label in (">0<", ">100<", ">300<", ">204k<", ">214k<", ">3<", ">6<"):  # round ticks, short labels
        assert label in svg, label
    assert svg.count('stroke="#e5e5e5"') >= 12 and svg.count("<polyline") == 3  # grid lines; the gap splits the loss
    assert "e+" not in svg
