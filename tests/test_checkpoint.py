import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minititan.core import checkpoint as ckpt
from minititan.core.checkpoint import CheckpointError, Slice
from tests.distributed import run_ranks


def test_read_any_box(tmp_path):
    full = torch.randn(6, 8)
    path = ckpt.save(tmp_path, 1, {"w": (full, ckpt.full_slice(full.shape))})
    c = ckpt.Checkpoint(path)
    assert torch.equal(c.read("w"), full)
    assert torch.equal(c.read("w", Slice([6, 8], [[2, 5], [4, 8]])), full[2:5, 4:8])
    assert torch.equal(c.read("w", Slice([6, 8], [[0, 6], [0, 8]], flat=[5, 20])), full.flatten()[5:20])


def test_incomplete_and_corrupt_checkpoints(tmp_path):
    full = torch.randn(6, 8)
    path = ckpt.save(tmp_path, 1, {"w": (full, ckpt.full_slice(full.shape))})
    with pytest.raises(CheckpointError, match="another model shape"):
        ckpt.Checkpoint(path).read("w", ckpt.full_slice([8, 6]))
    with pytest.raises(CheckpointError, match="no tensor"):
        ckpt.Checkpoint(path).read("v")
    f = path / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.Checkpoint(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.Checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.Checkpoint(path)
    assert ckpt.latest(tmp_path) is None


def test_keep_latest_and_tmp_ignored(tmp_path):
    t = torch.ones(3)
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, {"t": (t, ckpt.full_slice(t.shape))}, keep_latest_k=2)
    (tmp_path / "step-00000009.tmp").mkdir()  # a crashed save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


# ---------------------------------------------------------------- async save


def _chunks(tensors):
    return {n: (t, ckpt.full_slice(t.shape)) for n, t in tensors.items()}


def _slow_save_file(payload, path):
    time.sleep(1.0)
    save_file(payload, path)


def _full_disk(payload, path):
    raise OSError(28, "No space left on device")


def test_async_save_returns_before_the_write_and_writes_the_same_bytes(tmp_path, monkeypatch):
    tensors = {"w": torch.randn(6, 8), "b": torch.randn(8)}
    sync = ckpt.save(tmp_path / "sync", 1, _chunks(tensors))
    release = threading.Event()

    def held_save_file(payload, path):  # a slow disk: the write waits until the test lets it go
        assert release.wait(timeout=60)
        save_file(payload, path)

    monkeypatch.setattr(ckpt, "save_file", held_save_file)
    path = ckpt.save(tmp_path / "async", 1, _chunks(tensors), async_save=True)
    assert not path.exists()  # save returned; the write has not even started
    saved = {n: t.clone() for n, t in tensors.items()}
    for t in tensors.values():
        t.add_(1.0)  # training goes on: the next optimizer step changes the params in place
    release.set()
    ckpt.wait_for_async_save()
    for name in ("rank-00000.safetensors", "manifest.json"):
        assert (path / name).read_bytes() == (sync / name).read_bytes()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank-00000.safetensors"]
    assert all(torch.equal(ckpt.Checkpoint(path).read(n), saved[n]) for n in saved)


def test_async_saves_wait_for_each_other_and_keep_latest(tmp_path):
    t = torch.ones(3)
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, _chunks({"t": t * step}), keep_latest_k=2, async_save=True)
    ckpt.wait_for_async_save()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert torch.equal(ckpt.Checkpoint(ckpt.latest(tmp_path)).read("t"), t * 3)


def test_async_save_error_surfaces_at_the_next_save(tmp_path, monkeypatch):
    t = torch.ones(3)
    monkeypatch.setattr(ckpt, "save_file", lambda payload, path: (_full_disk if "step-00000002" in path else
                                                                   save_file)(payload, path))
    ckpt.save(tmp_path, 1, _chunks({"t": t}), async_save=True)
    ckpt.save(tmp_path, 2, _chunks({"t": t}), async_save=True)  # returns; the write fails in the background
    with pytest.raises(CheckpointError, match="async save of step 2 failed.*No space left"):
        ckpt.save(tmp_path, 3, _chunks({"t": t}), async_save=True)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # intact, and no step-2 leftovers


def _async_save_two_ranks(rank, world, folder):
    """Rank 1 writes slowly at step 1 (rank 0's writer must wait for it) and fails at step 2."""
    folder = Path(folder)
    mine = {"w": (torch.full((2, 4), float(rank)), Slice([4, 4], [[2 * rank, 2 * rank + 2], [0, 4]]))}
    if rank == 1:  # chosen by the path, not swapped between saves: a writer may still be running then
        ckpt.save_file = lambda payload, path: (_slow_save_file if "step-00000001" in path else _full_disk)(payload, path)
    for step in (1, 2):
        ckpt.save(folder, step, mine, async_save=True)
    try:
        ckpt.wait_for_async_save()
    except CheckpointError as e:
        return str(e)
    return None


def test_async_save_on_two_ranks(tmp_path):
    errors = run_ranks(2, _async_save_two_ranks, str(tmp_path))
    assert all(e is not None and "step 2" in e and "rank 1" in e and "No space left" in e for e in errors), errors
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    c = ckpt.Checkpoint(tmp_path / "step-00000001")
    assert torch.equal(c.read("w"), torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat_interleave(4).view(4, 4))
    assert sorted(c.manifest.files) == ["rank-00000.safetensors", "rank-00001.safetensors"]
