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

Integrity: the manifest holds each file's size and each chunk's CRC-32 (zlib's, of the chunk's bytes
as written). Opening a checkpoint checks the sizes; reading checks the CRC of every chunk read, on
a pool of threads while the reads go on (`Checkpoint.verify` waits for them and raises on a
mismatch), so a flipped byte is an error, never a silently wrong tensor.

Async save (save(..., async_save=True)): the chunks are copied to the host and written by a
background thread while training goes on; see "async save" below for how the ranks agree that
every file is written without a collective off the training thread.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import shutil
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
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


USE_ANOTHER = "use another checkpoint (a step-N folder)"


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
    crc32: int | None = None  # of the chunk's bytes; None in checkpoints written before checksums


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
         extra: dict | None = None, keep_latest_k: int = 0, async_save: bool = False,
         timeout_s: float = 600.0) -> Path:
    """Collective: every rank calls it with the chunks it holds; returns the checkpoint path.

    async_save: copy the chunks to the host, start writing them on a background thread and return;
    the checkpoint appears at the returned path once every rank's file is written (see
    wait_for_async_save). timeout_s: how long rank 0's writer waits for the other ranks' files."""
    wait_for_async_save()  # one save in flight at a time
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
    keys = {name: f"t{i}" for i, name in enumerate(owned)}
    entries = {name: (list(s.shape), str(t.dtype).removeprefix("torch."), Chunk(file, keys[name], s.box, s.flat))
               for name, (t, s) in owned.items()}
    # What every file will hold is known before anything is written, so the one collective of a save
    # happens here, on the training thread (an async writer must not share process groups with it).
    everything = gather_objects(entries)
    commit = functools.partial(_commit, tmp, final, step, everything, config, extra or {}, keep_latest_k)
    payload = {keys[name]: t for name, (t, _) in owned.items()}
    if async_save:
        _start_async_write(tmp, file, payload, commit, step, timeout_s)
        return final
    try:
        written, error = _write_file(tmp / file, {k: t.detach().to("cpu").contiguous() for k, t in payload.items()}), None
    except OSError as e:  # disk full: keep the old checkpoints, tell every rank
        written, error = Written(0, {}), str(e)
    results = gather_objects((file, written, error))
    failed = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(results) if e]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"saving step {step} failed ({'; '.join(failed)}): disk full? The previous "
                              f"checkpoint is intact")
    if rank == 0:
        commit({f: w for f, w, _ in results if w.size})
    _barrier()
    return final


class Written(msgspec.Struct):
    """What one rank's file turned out to be: its size, and the CRC-32 of each chunk by key."""
    size: int
    crc32: dict[str, int]


def _write_file(path: Path, payload: dict[str, torch.Tensor]) -> Written:
    """Write one rank's chunks and flush them to the disk (the manifest that follows promises they are
    there); returns the file's size (0: nothing to write, no file) and the chunks' checksums."""
    if not payload:
        return Written(0, {})
    crcs = {key: _checksum_pool().submit(crc32, t) for key, t in payload.items()}  # while the file is written
    save_file(payload, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return Written(path.stat().st_size, {key: crc.result() for key, crc in crcs.items()})


def crc32(t: torch.Tensor) -> int:
    """zlib's CRC-32 of a host tensor's bytes (zlib lets go of the GIL, so a pool runs several)."""
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


@functools.cache
def _checksum_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="checksum")


def _commit(tmp: Path, final: Path, step: int, everything: list[dict], config: str, extra: dict, keep_latest_k: int,
            files: dict[str, Written]) -> None:
    """Rank 0, once every rank's file is in tmp: the manifest last, then the rename that publishes it."""
    _write_manifest(tmp, step, everything, files, config, extra)
    if final.exists():  # saving the same step again: swap, never delete first
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _prune(final.parent, keep_latest_k)


def _write_manifest(tmp: Path, step: int, everything: list[dict], files: dict[str, Written], config: str,
                    extra: dict) -> None:
    tensors: dict[str, Entry] = {}
    for entries in everything:
        for name, (shape, dtype, chunk) in entries.items():
            chunk = msgspec.structs.replace(chunk, crc32=files[chunk.file].crc32[chunk.key])
            tensors.setdefault(name, Entry(shape, dtype)).chunks.append(chunk)
    sizes = {f: w.size for f, w in sorted(files.items())}
    manifest = Manifest(step=step, tensors=tensors, files=sizes, config=config, extra=extra)
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


# ---------------------------------------------------------------- async save
#
# The training thread copies this rank's chunks to the host (the next optimizer step changes them
# in place) and starts a writer thread; training goes on while it writes. Nothing on the writer
# threads is collective: the ranks meet through files instead. Each writer, after its
# safetensors file, writes a marker rank-R.done (holding the file's size) or rank-R.failed
# (holding the error); rank 0's writer waits until all ranks' markers are there, then writes the
# manifest and renames step-N.tmp as a synchronous save would. The next save, or the end of
# training, waits for the writer (wait_for_async_save) and agrees on errors with one collective on
# the training thread. The writer is not a daemon: a process that fails after starting a save
# still finishes it (rank 0 waits for the other ranks' markers at most timeout_s).


@dataclasses.dataclass
class _AsyncWrite:
    step: int
    thread: threading.Thread | None = None
    error: str | None = None


_in_flight: _AsyncWrite | None = None  # this process's async save, until waited for
_host_buffers: dict[str, torch.Tensor] = {}  # the chunks' host copies, reused by the next save


def _start_async_write(tmp: Path, file: str, payload: dict[str, torch.Tensor], commit, step: int,
                       timeout_s: float) -> None:
    global _in_flight
    rank, world = _rank_world()
    host, copied = _copy_to_host(payload)
    write = _AsyncWrite(step)

    def run():
        try:
            if copied is not None:
                copied.synchronize()
            try:
                written = _write_file(tmp / file, host)
            except Exception as e:
                _write_marker(tmp, rank, "failed", str(e))
                raise
            _write_marker(tmp, rank, "done", msgspec.json.encode(written).decode())
            if rank == 0:
                commit(_wait_for_markers(tmp, world, timeout_s))
        except Exception as e:  # kept for wait_for_async_save, which raises it on every rank
            write.error = f"{type(e).__name__}: {e}"
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

    write.thread = threading.Thread(target=run, name=f"checkpoint-step-{step}")
    write.thread.start()
    _in_flight = write


def wait_for_async_save() -> None:
    """Block until this process's async save (if one is in flight) is written and, on rank 0, renamed
    into place. Collective when a save is in flight (then one is on every rank): raises
    CheckpointError on every rank if any rank's write failed."""
    global _in_flight
    if _in_flight is None:
        return
    write, _in_flight = _in_flight, None
    write.thread.join()
    errors = gather_objects(write.error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise CheckpointError(f"the async save of step {write.step} failed ({'; '.join(failed)}); the previous "
                              f"checkpoint is intact")


def _copy_to_host(payload: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """A host copy of every chunk, into buffers kept from the previous save (fresh memory costs page
    faults, and pinning it is slow). CUDA chunks go into pinned buffers with non-blocking copies queued
    on the current stream: they read the values before the next optimizer step (queued after them)
    overwrites them, and the host does not wait here; the writer waits on the returned event."""
    host, on_cuda = {}, False
    for key, t in payload.items():
        t = t.detach()
        buf = _host_buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = _host_buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        host[key] = buf.copy_(t, non_blocking=t.is_cuda)
        on_cuda |= t.is_cuda
    copied = None
    if on_cuda:
        copied = torch.cuda.Event()
        copied.record()
    return host, copied


def _write_marker(tmp: Path, rank: int, kind: str, text: str) -> None:
    part = tmp / f"rank-{rank:05d}.{kind}.part"
    part.write_text(text)
    os.replace(part, tmp / f"rank-{rank:05d}.{kind}")  # rank 0 never reads half a marker


def _wait_for_markers(tmp: Path, world: int, timeout_s: float) -> dict[str, Written]:
    """Rank 0's writer: wait for every rank's marker, remove them; returns file name -> what it holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = set(os.listdir(tmp))
        failed = sorted(n for n in names if n.endswith(".failed"))
        if failed:
            rank = failed[0].split(".")[0]
            raise CheckpointError(f"{rank} could not write its file: {(tmp / failed[0]).read_text()}")
        done = [f"rank-{r:05d}.done" for r in range(world)]
        if all(n in names for n in done):
            break
        if time.monotonic() > deadline:
            missing = [n.split(".")[0] for n in done if n not in names]
            raise CheckpointError(f"{', '.join(missing[:4])} did not finish writing within {timeout_s:.0f} s")
        time.sleep(0.02)
    files = {}
    for r, marker in enumerate(done):
        written = msgspec.json.decode((tmp / marker).read_bytes(), type=Written)
        if written.size:
            files[f"rank-{r:05d}.safetensors"] = written
        (tmp / marker).unlink()
    return files


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
    """An opened checkpoint: the manifest, checked against the files on disk. `advice` ends every
    error: how the caller's user picks another checkpoint (the flag or key they gave this one with)."""

    MAX_PENDING_CHECKS = 16  # chunks read but not yet checksummed (each holds its host copy until then)

    def __init__(self, path: str | Path, advice: str = USE_ANOTHER):
        self.path = Path(path)
        self.advice = advice
        mpath = self.path / "manifest.json"
        if not self.path.is_dir():
            what = "is a file, not a step-N folder" if self.path.exists() else "does not exist"
            raise CheckpointError(f"checkpoint {self.path} {what}: {advice}")
        if not mpath.is_file():
            raise CheckpointError(f"checkpoint {self.path} has no manifest.json: it is incomplete (a save that did not "
                                  f"finish): {advice}")
        try:
            self.manifest = msgspec.json.decode(mpath.read_bytes(), type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise CheckpointError(f"{mpath} is corrupt ({e}): {advice}") from None
        for file, size in self.manifest.files.items():
            f = self.path / file
            if not f.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {file}: {advice}")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f} has {f.stat().st_size} bytes, the manifest says {size}: the file is "
                                      f"truncated or corrupt: {advice}")
        self._handles = {}
        self._checks: list[tuple[str, Chunk, Future]] = []  # checksums started, in read order
        self._verified = 0  # how many of them are compared

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
            src = self._chunk_box(name, chunk)
            dst_idx = tuple(slice(a - w[0], b - w[0]) for (a, b), w in zip(inter, want.box))
            src_idx = tuple(slice(a - c[0], b - c[0]) for (a, b), c in zip(inter, chunk.box))
            data, have = src
            out[dst_idx] = torch.where(have[src_idx], data[src_idx], out[dst_idx])
            filled[dst_idx] |= have[src_idx]
        if want.flat is not None:
            out, filled = out.flatten()[want.flat[0]:want.flat[1]], filled.flatten()[want.flat[0]:want.flat[1]]
        if not bool(filled.all()):
            raise CheckpointError(f"checkpoint {self.path} does not cover all of tensor {name!r}: a file is missing "
                                  f"from it: {self.advice}")
        return out.to(dtype) if dtype is not None else out

    def verify(self) -> None:
        """Wait for the checksums of every chunk read so far; raise CheckpointError on a mismatch.
        Call it before trusting what `read` returned."""
        while self._verified < len(self._checks):
            name, chunk, crc = self._checks[self._verified]
            self._verified += 1
            if crc.result() != chunk.crc32:
                raise CheckpointError(f"{self.path / chunk.file} is corrupt: its chunk {chunk.key} (of {name}) fails "
                                      f"its CRC-32 check: {self.advice}")

    def _chunk_box(self, name: str, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk as (its box's values, which of them it holds); its checksum starts on the pool."""
        data = self._open(chunk.file).get_tensor(chunk.key)
        if chunk.crc32 is not None:
            self._checks.append((name, chunk, _checksum_pool().submit(crc32, data)))
            if len(self._checks) > self.MAX_PENDING_CHECKS:  # bound the host copies waiting for their check
                self._checks[-self.MAX_PENDING_CHECKS - 1][2].result()
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
                raise CheckpointError(f"{self.path / file} is corrupt ({e}): {self.advice}") from None
        return self._handles[file]


# ---------------------------------------------------------------- distributed helpers


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

