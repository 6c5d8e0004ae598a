"""Where a run starts, and the reruns it refuses.

    checkpoint.resume = true (the default) and the folder      the newest checkpoint that opens and
    holds checkpoints                                           reads, with its optimizer state and step;
                                                                checkpoint.load_path is not used
    otherwise checkpoint.load_path set                          its parameters, from step 0
    otherwise                                                   step 0

A checkpoint that cannot be read (a corrupt manifest, a missing or truncated file, a chunk that fails
its checksum) is renamed step-N.unreadable (kept for a look, out of the way of keep_latest_k's pruning
and of later resumes) with a warning line, and the one before it is tried: a preempted job that is
requeued goes on from its newest good checkpoint without anyone's help. The ranks agree on which one
they use (a checkpoint one rank cannot read is skipped by all).

Refused with one line naming the fix (`check_start` runs before anything is loaded; the `--nproc`
launcher runs it too, so the line is printed once, before any rank starts):
  * a resume with nothing left to do: the newest checkpoint is at training.steps or beyond;
  * a resume from a checkpoint of another model: a [model] key other than max_seq_len, or
    data.tokenizer, differs from the config the checkpoint was saved with;
  * checkpoint.resume = false in a folder that holds checkpoints: this run's would mix with them;
  * a checkpoint.load_path of another model shape.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import msgspec
import torch.distributed as dist

from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import AgreedError, Config
from minititan.core.metrics import say

SKIPPED = "a resume skips it"  # what a resume does about a checkpoint it cannot read


def checkpoint_folder(cfg: Config) -> Path:
    return Path(cfg.job.dump_folder) / cfg.checkpoint.folder


def start_points(cfg: Config) -> tuple[list[Path], bool]:
    """The checkpoints to try, newest first, and whether they are a resume (else: load_path, or none)."""
    found = ckpt.list_checkpoints(checkpoint_folder(cfg)) if cfg.checkpoint.enable else []
    if cfg.checkpoint.resume and found:
        return found[::-1], True
    return ([Path(cfg.checkpoint.load_path)] if cfg.checkpoint.load_path else []), False


def check_start(cfg: Config) -> None:
    """The refusals that need only the config and the manifests (see the module docstring)."""
    folder = checkpoint_folder(cfg)
    found = ckpt.list_checkpoints(folder) if cfg.checkpoint.enable else []
    if found and not cfg.checkpoint.resume:
        raise AgreedError(f"checkpoint.resume = false, but {folder} holds checkpoints of an earlier run (the newest: "
                          f"{found[-1].name}) that this run's would mix with: use a new --job.dump_folder, or move "
                          f"{folder} away")
    paths, resuming = start_points(cfg)
    if not paths:
        return
    try:
        newest = ckpt.Checkpoint(paths[0], advice=SKIPPED if resuming else LOAD_PATH_ADVICE)
    except ckpt.CheckpointError:
        if resuming:
            return  # the resume skips it with a warning and checks the one it uses
        raise
    check_checkpoint(cfg, newest, resuming)


LOAD_PATH_ADVICE = "set checkpoint.load_path to another step-N folder"


def check_checkpoint(cfg: Config, c: ckpt.Checkpoint, resuming: bool) -> None:
    diff = config_differences(cfg, c.manifest.config, resuming)
    said = "; ".join(f"{key} = {there!r} there, {here!r} here" for key, there, here in diff)
    if resuming:
        if diff:
            same = " ".join(f"--{key}={str(there).lower() if isinstance(there, bool) else there}"
                            for key, there, _ in diff)
            raise AgreedError(f"{c.path} was saved by a run of another model ({said}): resume it with the same "
                              f"settings ({same}), or train this model in a new --job.dump_folder")
        if c.step >= cfg.training.steps:
            raise AgreedError(f"{c.path} is at step {c.step} and training.steps = {cfg.training.steps}: nothing is "
                              f"left to train. Train on with --training.steps={c.step + cfg.training.steps} (it "
                              f"resumes from there), or start a new run with a new --job.dump_folder")
    elif diff:
        raise AgreedError(f"checkpoint.load_path {c.path} holds a model of another shape ({said}): set the same "
                          f"[model] keys, or {LOAD_PATH_ADVICE} of this model")


def config_differences(cfg: Config, saved_config: str, resuming: bool) -> list[tuple[str, object, object]]:
    """(key, its value in the checkpoint's config, here) for each key that differs and matters: on a
    resume every [model] key but max_seq_len, and data.tokenizer; for load_path, the [model] keys
    when they change a parameter's shape."""
    try:
        saved = msgspec.toml.decode(saved_config) if saved_config else {}
    except msgspec.DecodeError:
        saved = {}
    here = msgspec.to_builtins(cfg)
    keys = [("model", k) for k in here["model"] if k != "max_seq_len"] + ([("data", "tokenizer")] if resuming else [])
    diff = [(f"{sec}.{k}", saved[sec][k], here[sec][k]) for sec, k in keys
            if k in saved.get(sec, {}) and saved[sec][k] != here[sec][k]]
    if diff and not resuming:
        try:
            there = msgspec.convert(saved["model"], type(cfg.model))
        except msgspec.ValidationError:
            return []  # a config of another version: the tensors' shapes are checked as they are read
        if model.param_shapes(there) == model.param_shapes(cfg.model):
            return []
    return diff


def load_first_readable(cfg: Config, load: Callable[[ckpt.Checkpoint], None]) -> ckpt.Checkpoint | None:
    """Open and `load` the first start point that reads on every rank; None if there is none to try.
    Collective: the ranks agree on each attempt (one all_gather_object of its error)."""
    paths, resuming = start_points(cfg)
    if not resuming:
        if not paths:
            return None
        c = ckpt.Checkpoint(paths[0], advice=LOAD_PATH_ADVICE)
        check_checkpoint(cfg, c, resuming=False)
        load(c)
        return c
    rank = dist.get_rank() if dist.is_initialized() else 0
    skipped = []
    for path in paths:
        error = None
        try:
            c = ckpt.Checkpoint(path, advice=SKIPPED)
            check_checkpoint(cfg, c, resuming=True)
            load(c)
        except ckpt.CheckpointError as e:
            error = str(e)
        errors = [e for e in ckpt.gather_objects(error) if e]
        if not errors:
            return c
        aside = path.with_name(path.name + ".unreadable")
        if rank == 0:
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        skipped.append(f"{path.name}: {errors[0]}")
        say(f"warning: {errors[0]}; renamed it {aside.name}, trying the checkpoint before it", rank)
    raise AgreedError(f"no checkpoint in {checkpoint_folder(cfg)} can be read ({' | '.join(skipped)}); each is kept "
                      f"as step-N.unreadable: rerun to train from step 0, or start a new run with a new "
                      f"--job.dump_folder")

