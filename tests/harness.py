"""Train tiny models under any layout and read back what they did, for parity tests.

    rows, params = train_run(tmp_path, world=4, overrides=["parallelism.dp_shard=4"])

Every run uses the same tiny model and data (TINY below); `rows` are rank 0's logged metrics
(one per step), `params` the final full parameters read from the run's last checkpoint, which
any layout writes in the same layout-independent format (None for a run with checkpoints off).

The helpers refuse to compare nothing: a run must log up to its last step and, with checkpoints
on, save every parameter of its model at that step; a comparison needs the same non-empty steps
and parameter names on both sides. Without that, two runs that logged or saved nothing would
"match".
"""
from __future__ import annotations

from pathlib import Path

from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import load_config
from tests.distributed import run_ranks

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "training.seq_len=32", "training.global_batch_size=8", "training.local_batch_size=2", "training.steps=6",
        "metrics.log_freq=1", "metrics.jsonl=false", "checkpoint.interval=1000", "training.device=cpu",
        "lr_scheduler.warmup_steps=2"]


def _train_rank(rank, world, overrides):
    from minititan.train import train
    return train(load_config(None, overrides))


def _train_ranks(rank, world, runs):
    from minititan.train import train
    return [train(load_config(None, overrides)) for overrides in runs]


def train_runs(folder: Path, world: int, runs: dict[str, list[str]], common: list[str] = ()):
    """Several runs on one set of `world` ranks (starting ranks costs more than training the tiny
    model): name -> (rank 0's metric rows, the final params from the run's last checkpoint)."""
    overrides = [TINY + list(common) + [f"job.dump_folder={Path(folder) / name}"] + o for name, o in runs.items()]
    rows = run_ranks(world, _train_ranks, overrides)[0]
    return {name: finished_run(o, r) for name, o, r in zip(runs, overrides, rows)}


def train_run(tmp_path: Path, world: int = 1, overrides: list[str] = (), name: str = "run"):
    overrides = TINY + [f"job.dump_folder={Path(tmp_path) / name}"] + list(overrides)
    return finished_run(overrides, run_ranks(world, _train_rank, overrides)[0])


def finished_run(overrides: list[str], rows: list[dict]) -> tuple[list[dict], dict | None]:
    """(rows, params) of a run that trained with these overrides, after checking that it logged its
    last step and, with checkpoints on, saved every parameter of its model at that step."""
    cfg = load_config(None, overrides)
    folder = Path(cfg.job.dump_folder)
    steps = cfg.training.steps
    assert rows, f"{folder}: the run logged no step"
    assert rows[-1]["step"] == steps, f"{folder}: the run logged steps up to {rows[-1]['step']}, not {steps}"
    if not cfg.checkpoint.enable:
        return rows, None
    last = ckpt.latest(folder / cfg.checkpoint.folder)
    assert last is not None, f"{folder}: the run saved no checkpoint"
    c = ckpt.Checkpoint(last)
    assert c.step == steps, f"{folder}: the last checkpoint is of step {c.step}, not of the last step {steps}"
    params = {n: c.read(n) for n in c.names() if not n.startswith("optim.")}
    want = set(model.param_shapes(cfg.model))
    assert params.keys() == want, (f"{folder}: the checkpoint lacks {sorted(want - params.keys())[:5]} "
                                   f"and has extra {sorted(params.keys() - want)[:5]}")
    return rows, params


def assert_same_losses(rows_a, rows_b, rtol=1e-5):
    """The same logged steps (at least one), and at each the same loss and gradient norm (the norm
    counts every gradient element once in any layout: a gradient summed over the wrong group, or
    scaled, shows there even where AdamW's scale invariance would hide it in the loss)."""
    assert rows_a and rows_b, f"nothing to compare: {len(rows_a)} and {len(rows_b)} logged steps"
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
        assert rel < rtol, f"step {a['step']}: loss {a['loss']} vs {b['loss']} (rel {rel:.2e})"
        rel = abs(a["grad_norm"] - b["grad_norm"]) / abs(b["grad_norm"])
        assert rel < rtol, f"step {a['step']}: grad_norm {a['grad_norm']} vs {b['grad_norm']} (rel {rel:.2e})"


def assert_same_params(pa, pb, rtol=1e-5):
    """The same parameter names (at least one) and values; finished_run has checked that a run's
    names are its model's."""
    assert pa is not None and pb is not None, "nothing to compare: a run had checkpoints off"
    assert pa and pb, f"nothing to compare: {len(pa)} and {len(pb)} parameters"
    assert pa.keys() == pb.keys(), f"different names: {sorted(pa.keys() ^ pb.keys())[:5]}"
    for n in pa:
        err = (pa[n] - pb[n]).norm() / pb[n].norm().clamp_min(1e-12)
        assert err < rtol, f"{n}: rel diff {err:.2e}"


def assert_layout_refused(world: int, overrides: list[str], words: list[str]) -> None:
    """parallelize.check refuses this layout on `world` ranks with a UserError whose message has every word."""
    import pytest
    from minititan.core.config import UserError
    from minititan.layout import parallelize
    cfg = load_config(None, TINY + overrides)
    with pytest.raises(UserError) as e:
        parallelize.check(cfg, world)
    for w in words:
        assert w in str(e.value), f"{w!r} is not in the refusal: {e.value}"


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
