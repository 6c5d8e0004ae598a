import os
import subprocess
import sys

import pytest

from minititan.core.config import ConfigError, config_to_toml, load_config


def test_default_config_loads_and_round_trips(tmp_path):
    cfg = load_config()
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(str(path)) == cfg


def test_overrides_parse_types():
    cfg = load_config(None, ["training.steps=7", "optimizer.betas=[0.8, 0.9]", "compile.enable=true",
                             "job.dump_folder=/tmp/x", "lr_scheduler.decay=linear"])
    assert cfg.training.steps == 7 and cfg.optimizer.betas == [0.8, 0.9] and cfg.compile.enable
    assert cfg.job.dump_folder == "/tmp/x" and cfg.lr_scheduler.decay == "linear"


@pytest.mark.parametrize("override, words", [
    ("training.stepz=3", ["training.stepz", "steps"]),
    ("trainng.steps=3", ["trainng", "training"]),
    ("lr_scheduler.decay=cos", ["cosine", "linear"]),
    ("training.steps=abc", ["training.steps"]),
    ("model.dim=65", ["model.dim", "n_heads"]),
    ("training.seq_len=100000", ["max_seq_len"]),
])
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.toml")


def test_cli_error_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "minititan.cli", "train", "--training.stepz=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'steps'" in r.stderr
    assert "Traceback" not in r.stderr


def test_shipped_configs_load():
    for name in ["debug", "llama3_8b", "llama3_70b", "llama3_405b"]:
        cfg = load_config(f"configs/{name}.toml")
        assert cfg.model.name == "llama3"
    cfg = load_config("configs/llama3_8b.toml")
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.rope_theta) == (4096, 32, 32, 8, 128256, 500000)
    from minititan.core.config import hidden_dim
    assert hidden_dim(m) == 14336
    assert cfg.training.seq_len == 8192 and cfg.training.local_batch_size == 2


@pytest.mark.parametrize("key", ["data.dataset", "validation.dataset"])
def test_missing_token_file_names_its_key(tmp_path, key):
    from minititan.core.config import UserError
    from minititan.core.data import TokenSource
    from minititan.core.validation import held_out
    cfg = load_config(None, [f"{key}={tmp_path / 'missing.bin'}"])
    with pytest.raises(UserError, match=f"^{key} .*minititan tokenize"):
        held_out(cfg, TokenSource(cfg.data.dataset, cfg.model.vocab_size))


BAD_TP = ["--parallelism.tp=2", "--model.n_kv_heads=1", "--training.device=cpu"]
NOT_DIVISIBLE = "model.n_kv_heads=1 is not divisible by parallelism.tp=2"


def test_launcher_refuses_a_bad_layout_before_any_rank_starts():
    """`--nproc` checks the layout against the world it would launch: one line, not one per rank."""
    r = subprocess.run([sys.executable, "-m", "minititan.cli", "train", "--nproc", "2"] + BAD_TP,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and NOT_DIVISIBLE in r.stderr


def test_torchrun_ranks_print_a_bad_layout_once():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "minititan.cli", "train"] + BAD_TP, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and NOT_DIVISIBLE in errors[0], r.stderr


@pytest.mark.parametrize("procid, printed", [("0", True), ("1", False)])
def test_srun_ranks_check_the_layout_against_slurm_ntasks(procid, printed):
    """srun without torchrun: the world is SLURM_NTASKS (not 1), and only rank 0 prints."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "minititan.cli", "train"] + BAD_TP, capture_output=True, text=True,
                       timeout=120, env=env | {"SLURM_PROCID": procid, "SLURM_NTASKS": "2"})
    assert r.returncode == 2 and (NOT_DIVISIBLE in r.stderr) == printed and ("error" in r.stderr) == printed, r.stderr


SWITCHED_OFF = [  # an override whose key does nothing under the rest of the config, and the switch named
    ("model.n_experts=64", 'model.name = "llama3"', 'set model.name = "moe"'),
    ("parallelism.pp_schedule=gpipe", "parallelism.pp = 1", "set parallelism.pp > 1"),
    ("float8.filter=[]", "float8.enable = false", "set float8.enable = true"),
    ("validation.dataset=held_out", "validation.enable = false", "set validation.enable = true"),
    ("activation_checkpoint.selective=2", 'activation_checkpoint.mode = "none"', 'activation_checkpoint.mode = "selective"'),
    ("model.rope_scaling_factor=32", "model.rope_scaling = false", "set model.rope_scaling = true"),
]


@pytest.mark.parametrize("override, switch, fix", SWITCHED_OFF, ids=[o for o, _, _ in SWITCHED_OFF])
def test_a_key_its_switch_leaves_off_is_named_with_the_switch(override, switch, fix):
    """Never a silent no-op: the line names the key, the switch that leaves it idle, and the fix;
    following the fix's switch makes the warning go away."""
    from minititan.core.config import inactive_settings
    [line] = inactive_settings(load_config(None, [override]), [override])
    assert line.startswith(override.split("=")[0]) and switch in line and fix in line, line
    on = {"model.name": ["model.name=moe"], "parallelism.pp": ["parallelism.pp=2"], "float8.enable": ["float8.enable=true"],
          "validation.enable": ["validation.enable=true"], "activation_checkpoint.mode": ["activation_checkpoint.mode=selective"],
          "model.rope_scaling": ["model.rope_scaling=true"]}[switch.split(" =")[0]]
    assert inactive_settings(load_config(None, [override] + on), [override] + on) == []


def test_the_memory_snapshot_is_its_own_switch():
    """The out-of-memory error advises profiling.memory_snapshot = true alone: followed, no warning
    calls it idle (it records without profiling.enable), and the folder it writes to is in use."""
    from minititan.core.config import inactive_settings
    for on in (["profiling.memory_snapshot=true"], ["profiling.memory_snapshot=true", "profiling.folder=snaps"]):
        assert inactive_settings(load_config(None, on), on) == []
    [line] = inactive_settings(load_config(None, ["profiling.folder=snaps"]), ["profiling.folder=snaps"])
    assert "profiling.memory_snapshot = true" in line, line


def test_a_switch_turned_off_on_the_command_line_quiets_the_files_keys_under_it():
    from minititan.core.config import inactive_settings, shipped_configs
    assert all(inactive_settings(load_config(name)) == [] for name in shipped_configs())
    off = ["checkpoint.enable=false"]  # debug.toml sets checkpoint.interval = 100, not the default 500
    assert inactive_settings(load_config(None, off), off) == []
    assert "checkpoint.interval" in inactive_settings(load_config(None, off + ["checkpoint.interval=7"]),
                                                      off + ["checkpoint.interval=7"])[0]


def test_train_prints_the_warning_once_on_stdout(tmp_path):
    from tests.harness import run_cli
    r = run_cli("train", "--training.steps=1", "--checkpoint.enable=false", "--metrics.jsonl=false",
                f"--job.dump_folder={tmp_path}", "--model.n_experts=64")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("warning: model.n_experts = 64 does nothing") == 1
