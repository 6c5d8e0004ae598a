"""Checkpoints: safetensors files plus a JSON manifest, written atomically, readable under any layout.

    step-00000100/
      manifest.json              step, config, and for every tensor its global shape and chunks
      rank-00000.safetensors     the chunks rank 0 owns (rank 1 writes rank-00001..., and so on)

A chunk is the part of a tensor that one file holds: a `box` ([start, stop) per dim of the full
tensor: a tensor-parallel slice, say) and optionally a `flat` range inside the flattened box (an
FSDP flat shard). Every rank writes only its own chunks; nobody gathers the model. A reader asks
for any box/flat range and gets it assembled from whichever chunks overlap it, so a checkpoint
saved under one layout loads under another.

Atomicity: everything is written into `step-N.tmp/`; rank 0 writes the manifest last and renames
the directory. A directory without a manifest, or named .tmp, is never loaded, so a crash or a
full disk in the middle of a save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from minititan.core.config import UserError

FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or of another model."""


class Slice(msgspec.Struct):
    """Which part of a full tensor a rank holds."""
    shape: list[int]  # the full (global) shape
    box: list[list[int]]  # [start, stop) per dim
    flat: list[int] | None = None  # [start, stop) inside the flattened box, or None = all of it
    owner: bool = True  # write it? (one rank among replicas)


class Chunk(msgspec.Struct):
    file: str
    key: str
    box: list[list[int]]
    flat: list[int] | None = None


class Entry(msgspec.Struct):
    shape: list[int]
    dtype: str
    chunks: list[Chunk] = []


class Manifest(msgspec.Struct):
    step: int
    tensors: dict[str, Entry]
    files: dict[str, int]  # file name -> size in bytes, checked on load
    config: str = ""  # the resolved config as TOML
    extra: dict = {}
    format: int = FORMAT_VERSION


def full_slice(shape) -> Slice:
    return Slice(shape=list(shape), box=[[0, s] for s in shape])


# ---------------------------------------------------------------- save


def save(folder: str | Path, step: int, tensors: dict[str, tuple[torch.Tensor, Slice]], config: str = "",
         extra: dict | None = None, keep_latest_k: int = 0) -> Path:
    """Collective: every rank calls it with the chunks it holds; returns the checkpoint path."""
    folder = Path(folder)
    rank, world = _rank_world()
    final = folder / f"step-{step:08d}"
    tmp = folder / f"step-{step:08d}.tmp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        tmp.mkdir()
    _barrier()
    file = f"rank-{rank:05d}.safetensors"
    owned = {name: (t, s) for name, (t, s) in tensors.items() if s.owner}
    entries = {}
    payload = {}
    for i, (name, (t, s)) in enumerate(owned.items()):
        key = f"t{i}"
        payload[key] = t.detach().to("cpu").contiguous()
        entries[name] = (list(s.shape), str(t.dtype).removeprefix("torch."), Chunk(file, key, s.box, s.flat))
    try:
        if payload:
            save_file(payload, str(tmp / file))
        size = (tmp / file).stat().st_size if payload else 0
        ok = True
    except OSError as e:  # disk full: keep the old checkpoints, tell every rank
        size, ok, err = 0, False, e
    everything = _gather_objects((entries, file, size, ok))
    if not all(o for _, _, _, o in everything):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving step {step} failed on some rank (disk full?); the previous checkpoint is intact"
                              + (f": {err}" if not ok else ""))
    if rank == 0:
        _write_manifest(tmp, step, everything, config, extra or {})
        if final.exists():  # saving the same step again: swap, never delete first
            old = folder / f"step-{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _prune(folder, keep_latest_k)
    _barrier()
    return final


def _write_manifest(tmp: Path, step: int, everything, config: str, extra: dict) -> None:
    tensors: dict[str, Entry] = {}
    files = {}
    for entries, file, size, _ in everything:
        if size:
            files[file] = size
        for name, (shape, dtype, chunk) in entries.items():
            tensors.setdefault(name, Entry(shape, dtype)).chunks.append(chunk)
    manifest = Manifest(step=step, tensors=tensors, files=files, config=config, extra=extra)
    path = tmp / "manifest.json"
    with open(path.with_suffix(".json.part"), "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(manifest), indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path.with_suffix(".json.part"), path)


def _prune(folder: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- find and open


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


class Checkpoint:
    """An opened checkpoint: the manifest, checked against the files on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint {self.path} does not exist: check checkpoint.load_path or checkpoint.folder")
        if not mpath.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no manifest.json: it is incomplete (a save that did not "
                                  f"finish); point to a complete step-N folder")
        try:
            self.manifest = msgspec.json.decode(mpath.read_bytes(), type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise CheckpointError(f"{mpath} is corrupt ({e}); use another checkpoint") from None
        for file, size in self.manifest.files.items():
            f = self.path / file
            if not f.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {file}; use another checkpoint")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f} has {f.stat().st_size} bytes, the manifest says {size}: the file is "
                                      f"truncated or corrupt; use another checkpoint")
        self._handles = {}

    @property
    def step(self) -> int:
        return self.manifest.step

    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def read(self, name: str, want: Slice | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The part `want` of tensor `name` (all of it if None), assembled from the chunks it overlaps."""
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}: it was saved from another model")
        want = want or full_slice(entry.shape)
        if list(want.shape) != list(entry.shape):
            raise CheckpointError(f"tensor {name!r} has shape {entry.shape} in the checkpoint but the model wants "
                                  f"{want.shape}: the checkpoint is of another model shape")
        out = torch.empty([b - a for a, b in want.box], dtype=getattr(torch, entry.dtype))
        filled = torch.zeros(out.shape, dtype=torch.bool)
        for chunk in entry.chunks:
            inter = [[max(a, c), min(b, d)] for (a, b), (c, d) in zip(want.box, chunk.box)]
            if any(a >= b for a, b in inter):
                continue
            src = self._chunk_box(chunk)
            dst_idx = tuple(slice(a - w[0], b - w[0]) for (a, b), w in zip(inter, want.box))
            src_idx = tuple(slice(a - c[0], b - c[0]) for (a, b), c in zip(inter, chunk.box))
            data, have = src
            out[dst_idx] = torch.where(have[src_idx], data[src_idx], out[dst_idx])
            filled[dst_idx] |= have[src_idx]
        if want.flat is not None:
            out, filled = out.flatten()[want.flat[0]:want.flat[1]], filled.flatten()[want.flat[0]:want.flat[1]]
        if not bool(filled.all()):
            raise CheckpointError(f"checkpoint {self.path} does not cover all of tensor {name!r}: a file is missing "
                                  f"from it; use another checkpoint")
        return out.to(dtype) if dtype is not None else out

    def _chunk_box(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk as (its box's values, which of them it holds)."""
        data = self._open(chunk.file).get_tensor(chunk.key)
        shape = [b - a for a, b in chunk.box]
        if chunk.flat is None:
            return data.reshape(shape), torch.ones(shape, dtype=torch.bool)
        full = torch.zeros(math.prod(shape), dtype=data.dtype)
        have = torch.zeros(math.prod(shape), dtype=torch.bool)
        full[chunk.flat[0]:chunk.flat[1]] = data
        have[chunk.flat[0]:chunk.flat[1]] = True
        return full.reshape(shape), have.reshape(shape)

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as e:  # safetensors reports corruption with its own exception types
                raise CheckpointError(f"{self.path / file} is corrupt ({e}); use another checkpoint") from None
        return self._handles[file]


# ---------------------------------------------------------------- distributed helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

