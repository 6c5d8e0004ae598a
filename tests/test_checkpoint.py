import pytest
import torch

from minititan.core import checkpoint as ckpt
from minititan.core.checkpoint import CheckpointError, Slice




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
