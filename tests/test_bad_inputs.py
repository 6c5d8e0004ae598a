"""Bad input of every kind ends in one line on stderr naming the fix, exit code 2, never a traceback.

Two tables: every config key given a value of the wrong type, and every number given the zero,
negative, NaN, infinite or absurd values it must refuse (generated from the Config structs, so a
new key is covered the day it is added); then every command given missing, empty or garbage files
and nonsense flags. Each case lists the words its message must contain. Token files, tokenizers and
`tokenize` are tested with core/data.py, which checks them."""
import typing

import msgspec
import pytest

from minititan.core.config import Config
from tests.harness import TINY, assert_one_line_error, run_cli

# What every number must be (the rest of the keys are free text, bools, lists or choices).
POSITIVE = {"model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.vocab_size",
            "model.ffn_dim_multiplier", "model.multiple_of", "model.norm_eps", "model.rope_theta",
            "model.rope_scaling_factor", "model.rope_low_freq_factor", "model.rope_high_freq_factor",
            "model.rope_original_context", "model.max_seq_len", "model.moe_frequency", "model.n_experts",
            "model.top_k", "model.route_scale", "training.steps", "training.seq_len", "training.local_batch_size", "optimizer.lr",
            "optimizer.eps", "parallelism.dp_replicate", "parallelism.tp", "parallelism.pp", "parallelism.cp",
            "parallelism.ep", "parallelism.pp_virtual_stages", "checkpoint.interval", "metrics.log_freq",
            "validation.freq", "validation.steps", "profiling.start_step", "profiling.steps", "comm.timeout_s"}
NON_NEGATIVE = {"model.head_dim", "model.n_dense_layers", "model.moe_hidden_dim", "model.n_shared_experts", "model.aux_loss_coef", "model.bias_update_rate",
                "training.global_batch_size", "training.seed", "training.max_norm", "training.skip_nonfinite_steps",
                "optimizer.weight_decay", "lr_scheduler.warmup_steps", "parallelism.pp_microbatches",
                "parallelism.ep_capacity_factor",
                "checkpoint.keep_latest_k"}
OTHER_NUMBERS = {"lr_scheduler.min_lr_ratio", "parallelism.dp_shard",  # [0, 1]; >= 1 or -1: in ABSURD below
                 "data.holdout_fraction", "data.prefetch"}  # [0, 1); >= 0: core/data.py's checks, in ABSURD below


def fields() -> list[tuple[str, typing.Any]]:
    return [(f"{sec.name}.{f.name}", f.type) for sec in msgspec.structs.fields(Config)
            for f in msgspec.structs.fields(sec.type)]


def test_every_number_is_in_a_table():
    numbers = {key for key, t in fields() if t in (int, float)}
    assert numbers == POSITIVE | NON_NEGATIVE | OTHER_NUMBERS


def bad_config_values():
    for key, t in fields():
        if typing.get_origin(t) is typing.Literal:
            yield key, "nonsense", [key, "valid choices", t.__args__[0]]
        elif t is not str:
            yield key, "nonsense", [key, "Expected"]  # the wrong type: msgspec names what it expected
        if t is float:
            for v in ("nan", "inf", "-inf"):
                yield key, v, [key]
        if key in POSITIVE:
            yield key, "0", [key, "must be a positive number"]
            yield key, "-1", [key, "must be a positive number"]
        if key in NON_NEGATIVE:
            yield key, "-1", [key, "must be zero or a positive number"]


ABSURD = [  # values of the right type and sign that are still nonsense
    ("lr_scheduler.min_lr_ratio", "1.5", ["lr_scheduler.min_lr_ratio", "between 0 and 1"]),
    ("lr_scheduler.min_lr_ratio", "-0.1", ["lr_scheduler.min_lr_ratio", "between 0 and 1"]),
    ("parallelism.dp_shard", "0", ["parallelism.dp_shard", "-1"]),
    ("parallelism.dp_shard", "-2", ["parallelism.dp_shard", "-1"]),
    ("data.holdout_fraction", "1", ["data.holdout_fraction", "[0, 1)"]),
    ("data.holdout_fraction", "nan", ["data.holdout_fraction"]),
    ("data.prefetch", "-1", ["data.prefetch", ">= 0"]),
    ("optimizer.betas", "[0.9, 1.0]", ["optimizer.betas", "[0, 1)"]),
    ("optimizer.betas", "[-0.1, 0.9]", ["optimizer.betas", "[0, 1)"]),
    ("optimizer.betas", "[0.9]", ["optimizer.betas", "two numbers"]),
    ("optimizer.betas", "[nan, 0.9]", ["optimizer.betas"]),
    ("optimizer.lr", "1e30", ["optimizer.lr", "optimizer.weight_decay"]),
    ("model.max_seq_len", "1000000000000", ["model.max_seq_len", "at most"]),
    ("model.n_layers", "99999999999", ["model.n_layers", "at most"]),
    ("training.seed", "9223372036854775808", ["training.seed"]),
    ("comm.timeout_s", "1e30", ["comm.timeout_s", "at most"]),
    ("parallelism.pp_layers_per_stage", "[0, 2]", ["parallelism.pp_layers_per_stage", "positive"]),
    ("training.seq_len", "100000", ["training.seq_len", "model.max_seq_len"]),
    ("model.dim", "65", ["model.dim", "model.n_heads"]),
    ("model.n_kv_heads", "3", ["model.n_heads", "model.n_kv_heads"]),
    ("activation_checkpoint.selective", "0", ["activation_checkpoint.selective", "positive integer"]),
    ("activation_checkpoint.selective", "every", ["activation_checkpoint.selective"]),
    ("float8.filter", "output", ["float8.filter", "Expected"]),
    ("training.stepz", "3", ["training.stepz", "did you mean 'steps'"]),
    ("trainng.steps", "3", ["trainng", "training"]),
]


@pytest.mark.parametrize("key, value, words", list(bad_config_values()) + ABSURD,
                         ids=[f"{k}={v}" for k, v, _ in list(bad_config_values()) + ABSURD])
def test_a_bad_config_value_is_one_line_naming_the_key(key, value, words):
    assert_one_line_error(run_cli("config", f"--{key}={value}"), words)


# ---------------------------------------------------------------- files and flags


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


GARBAGE = bytes(range(256)) * 4  # not UTF-8, not JSON, not TOML, not safetensors


def _checkpoint(tmp_path):
    """A real one-step checkpoint (the tiny model): what the damaged cases start from."""
    assert run_cli("train", *[f"--{o}" for o in TINY], "--training.steps=1", "--data.dataset=synthetic",
                   f"--job.dump_folder={tmp_path / 'run'}").exit_code == 0
    return tmp_path / "run" / "checkpoints" / "step-00000001"


def _broken_manifest(tmp_path):
    path = _checkpoint(tmp_path)
    (path / "manifest.json").write_text('{"step": 1}')
    return path


CASES = {  # name: (args given tmp_path, words the one line must hold)
    "train -c missing": (lambda p: ["train", "-c", p / "nope.toml"], ["not found", "shipped config"]),
    "train -c a folder": (lambda p: ["train", "-c", p], ["is a folder", "-c"]),
    "train -c empty": (lambda p: ["train", "-c", _write(p / "e.toml", b"")], ["sets no key", "minititan config >"]),
    "train -c comments only": (lambda p: ["train", "-c", _write(p / "c.toml", b"# nothing\n")], ["sets no key"]),
    "train -c garbage": (lambda p: ["train", "-c", _write(p / "g.toml", GARBAGE)], ["not a text file", "-c"]),
    "train -c not TOML": (lambda p: ["train", "-c", _write(p / "t.toml", b"[training\nsteps=")], ["not valid TOML"]),
    "train -c unknown section": (lambda p: ["train", "-c", _write(p / "u.toml", b"[trainig]\nsteps = 3\n")],
                                 ["[trainig]", "did you mean 'training'"]),
    "train stray argument": (lambda p: ["train", "steps=3"], ["unexpected argument", "--section.key=value"]),
    "train --nproc 0": (lambda p: ["train", "--nproc", "0"], ["--nproc", "x>=1"]),
    "train --nproc -1": (lambda p: ["train", "--nproc", "-1"], ["--nproc", "x>=1"]),
    "train --nproc abc": (lambda p: ["train", "--nproc", "abc"], ["--nproc", "not a valid integer"]),
    "train dump_folder is a file": (lambda p: ["train", f"--job.dump_folder={_write(p / 'f', b'x')}"],
                                    ["job.dump_folder", "is a file", "--job.dump_folder"]),
    "train dump_folder read-only": (lambda p: ["train", "--job.dump_folder=/sys/minititan"],
                                    ["job.dump_folder", "cannot be written", "--job.dump_folder"]),
    "train checkpoint.folder read-only": (lambda p: ["train", f"--job.dump_folder={p}", "--checkpoint.folder=/sys/x"],
                                          ["checkpoint.folder", "cannot be written"]),
    "train model far too big": (lambda p: ["train", f"--job.dump_folder={p}", "--model.vocab_size=100000000000"],
                                ["does not fit", "B parameters", "GiB", "smaller model"]),
    "train n_layers far too many": (lambda p: ["train", f"--job.dump_folder={p}", "--model.n_layers=10000",
                                               "--model.dim=16384"], ["does not fit", "B parameters", "smaller model"]),
    "train cuda without a GPU": (lambda p: ["train", f"--job.dump_folder={p}", "--training.device=cuda"],
                                 ["no CUDA device", "training.device = cpu"]),
    "train load_path missing": (lambda p: ["train", f"--job.dump_folder={p}", f"--checkpoint.load_path={p / 'x'}"],
                                ["does not exist", "checkpoint.load_path"]),
    "train load_path a file": (lambda p: ["train", f"--job.dump_folder={p}",
                                          f"--checkpoint.load_path={_write(p / 'f', b'x')}"],
                               ["is a file", "checkpoint.load_path"]),
    "config -c missing": (lambda p: ["config", "-c", p / "nope.toml"], ["not found"]),
    "generate no --checkpoint": (lambda p: ["generate"], ["Missing option '--checkpoint'", "--help"]),
    "generate --checkpoint missing": (lambda p: ["generate", "--checkpoint", p / "nope"], ["does not exist", "--checkpoint"]),
    "generate --checkpoint a file": (lambda p: ["generate", "--checkpoint", _write(p / "f", GARBAGE)],
                                     ["is a file", "--checkpoint"]),
    "generate --checkpoint empty folder": (lambda p: ["generate", "--checkpoint", p], ["no manifest.json", "--checkpoint"]),
    "generate --checkpoint broken manifest": (lambda p: ["generate", "--checkpoint", _broken_manifest(p)],
                                              ["is corrupt", "--checkpoint"]),
    "generate empty prompt": (lambda p: ["generate", "--checkpoint", p, "--prompt", ""], ["--prompt is empty"]),
    "generate NaN temperature": (lambda p: ["generate", "--checkpoint", p, "--temperature", "nan"],
                                 ["--temperature", "0 (greedy) or a positive number"]),
    "generate negative temperature": (lambda p: ["generate", "--checkpoint", p, "--temperature", "-1"], ["--temperature"]),
    "generate --top-k -1": (lambda p: ["generate", "--checkpoint", p, "--top-k", "-1"], ["--top-k", "x>=0"]),
    "generate --max-new-tokens 0": (lambda p: ["generate", "--checkpoint", p, "--max-new-tokens", "0"],
                                    ["--max-new-tokens", "x>=1"]),
    "plot missing": (lambda p: ["plot", p / "metrics.jsonl"], ["not found", "metrics.jsonl"]),
    "plot empty": (lambda p: ["plot", _write(p / "m.jsonl", b"")], ["holds no rows", "metrics.log_freq"]),
    "plot malformed": (lambda p: ["plot", _write(p / "m.jsonl", b'{"step": 1, "loss": 2}\n{"step": 2, "lo')],
                       ["line 2 is not JSON"]),
    "plot no step": (lambda p: ["plot", _write(p / "m.jsonl", b'{"loss": 2}\n')], ["line 1", "\"step\""]),
    "plot garbage": (lambda p: ["plot", _write(p / "m.jsonl", GARBAGE)], ["not a text file"]),
    "plot -o unwritable": (lambda p: ["plot", _write(p / "m.jsonl", b'{"step": 1, "loss": 2}\n'), "-o", "/sys/x.svg"],
                           ["cannot write", "-o"]),
    "schedule --pp 0": (lambda p: ["schedule", "--pp", "0", "--microbatches", "4"], ["--pp", "x>=1"]),
    "schedule --microbatches 0": (lambda p: ["schedule", "--pp", "2", "--microbatches", "0"], ["--microbatches"]),
    "schedule unknown": (lambda p: ["schedule", "--pp", "2", "--microbatches", "4", "--schedule", "x"],
                         ["unknown schedule", "1f1b"]),
    "convert hf missing": (lambda p: ["convert", "hf-to-minititan", p / "nope", p / "out"], ["not a folder"]),
    "convert hf empty folder": (lambda p: ["convert", "hf-to-minititan", p, p / "out"], ["config.json"]),
    "convert hf garbage config": (lambda p: ["convert", "hf-to-minititan", _write(p / "config.json", GARBAGE).parent,
                                             p / "out"], ["config.json"]),
    "convert hf out is a file": (lambda p: ["convert", "hf-to-minititan", p, _write(p / "f", b"x")],
                                 ["OUT_DIR", "is a file"]),
    "convert to hf missing": (lambda p: ["convert", "minititan-to-hf", p / "nope", p / "out"],
                              ["does not exist", "CKPT_DIR"]),
    "convert to hf broken manifest": (lambda p: ["convert", "minititan-to-hf", _broken_manifest(p), p / "out"],
                                      ["is corrupt", "CKPT_DIR"]),
    "unknown command": (lambda p: ["trian"], ["No such command", "trian"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_file_or_flag_is_one_line_naming_the_fix(tmp_path, name):
    args, words = CASES[name]
    assert_one_line_error(run_cli(*args(tmp_path)), words)

