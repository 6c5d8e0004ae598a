"""Train tiny models under any layout and read back what they did, for parity tests.

    rows, params = train_run(tmp_path, world=4, overrides=["parallelism.dp_shard=4"])

Every run uses the same tiny model and data (TINY below); `rows` are rank 0's logged metrics
(one per step), `params` the final full parameters read from the run's last checkpoint, which
any layout writes in the same layout-independent format.
"""
from __future__ import annotations

from pathlib import Path

from minititan.core import checkpoint as ckpt
from tests.distributed import run_ranks

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "training.seq_len=32", "training.global_batch_size=8", "training.local_batch_size=2", "training.steps=6",
        "metrics.log_freq=1", "metrics.jsonl=false", "checkpoint.interval=1000", "training.device=cpu",
        "lr_scheduler.warmup_steps=2"]


def _train_rank(rank, world, overrides):
    from minititan.core.config import load_config
    from minititan.train import train
    return train(load_config(None, overrides))


def _train_ranks(rank, world, runs):
    from minititan.core.config import load_config
    from minititan.train import train
    return [train(load_config(None, overrides)) for overrides in runs]


def train_runs(folder: Path, world: int, runs: dict[str, list[str]], common: list[str] = ()):
    """Several runs on one set of `world` ranks (starting ranks costs more than training the tiny
    model): name -> (rank 0's metric rows, the final params from the run's last checkpoint)."""
    overrides = [TINY + list(common) + [f"job.dump_folder={Path(folder) / name}"] + o for name, o in runs.items()]
    rows = run_ranks(world, _train_ranks, overrides)[0]
    out = {}
    for name, r in zip(runs, rows):
        c = ckpt.Checkpoint(ckpt.latest(Path(folder) / name / "checkpoints"))
        out[name] = r, {n: c.read(n) for n in c.names() if not n.startswith("optim.")}
    return out


def train_run(tmp_path: Path, world: int = 1, overrides: list[str] = (), name: str = "run"):
    folder = Path(tmp_path) / name
    overrides = TINY + [f"job.dump_folder={folder}"] + list(overrides)
    rows = run_ranks(world, _train_rank, overrides)[0]
    last = ckpt.latest(folder / "checkpoints")
    params = {}
    if last is not None:
        c = ckpt.Checkpoint(last)
        params = {n: c.read(n) for n in c.names() if not n.startswith("optim.")}
    return rows, params


def assert_same_losses(rows_a, rows_b, rtol=1e-5):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        assert rel < rtol, f"step {a['step']}: loss {a['loss']} vs {b['loss']} (rel {rel:.2e})"


def assert_same_params(pa, pb, rtol=1e-5):
    assert pa.keys() == pb.keys()
    for n in pa:
        err = (pa[n] - pb[n]).norm() / pb[n].norm().clamp_min(1e-12)
        assert err < rtol, f"{n}: rel diff {err:.2e}"


def assert_layout_refused(world: int, overrides: list[str], words: list[str]) -> None:
    """parallelize.check refuses this layout on `world` ranks with a UserError whose message has every word."""
    import pytest
    from minititan.core.config import UserError, load_config
    from minititan.layout import parallelize
    cfg = load_config(None, TINY + overrides)
    with pytest.raises(UserError) as e:
        parallelize.check(cfg, world)
    for w in words:
        assert w in str(e.value)


def run_cli(*args: str):
    """`minititan ARGS` in this process (no interpreter to start), on one thread: click's result,
    with exit_code, stdout and stderr. Training installs SIGTERM/SIGINT handlers; they are put back."""
    import signal

    import torch
    from click.testing import CliRunner

    from minititan.cli import main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pytest-xdist runs a test per core already
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)


def assert_one_line_error(result, words: list[str]) -> str:
    """Exit code 2, one line on stderr holding every word, no traceback; returns the line."""
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in result.output, result.output
    for w in words:
        assert w in err, (w, err)
    return err
