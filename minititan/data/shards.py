"""The shard format: a folder of fixed-size token files, each with a small JSON index.

    shard-00000.bin    the tokens, raw little-endian uint16 (uint32 for vocabularies over 65,536)
    shard-00000.json   its index (ShardIndex below): token count, document starts, tokenizer, dtype...

Every shard but the last holds exactly `shard_tokens` tokens of one stream (documents, each ended by
the end-of-document token), so a document may run from one shard into the next (`continues`).
Writes are atomic: a shard is written under a temporary name and renamed, the .bin first and the
index last, so a folder never holds a half-written shard under a final name, and a shard counts as
finished exactly when its index exists.

    folder = ShardFolder.open("data/tokens")   # every shard checked against its index
    folder.tokens(start, stop)                 # np.ndarray of the stream's tokens [start, stop)
    folder.doc_starts                          # where each document starts in the stream
"""
from __future__ import annotations

import os
from pathlib import Path

import msgspec
import numpy as np

from minititan.core.config import UserError

FORMAT = "minititan-shards-1"


class ShardIndex(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    tokens: int  # tokens in the .bin
    dtype: str  # "uint16" | "uint32"
    tokenizer: str  # the tokenizer's fingerprint (tokenizer.py): kind, vocabulary size, file hash
    tokenizer_path: str  # where it was read from ("byte" for the byte tokenizer)
    vocab_size: int
    bos: int | None
    eos: int | None
    max_id: int  # the largest id in the shard (checked against model.vocab_size)
    doc_starts: list[int]  # offsets (in this shard) where a document starts
    continues: bool  # token 0 continues the previous shard's last document
    sources: list[str]  # the input files whose text is in this shard
    run: str  # hash of the tokenize run's inputs and options: resume refuses another run's folder
    end_unit: int  # where the next shard starts: at token `end_skip` of work unit `end_unit`
    end_skip: int
    last: bool  # the run finished with this shard


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def finish_shard(folder: Path, i: int, index: ShardIndex) -> None:
    """Shard i's tokens are in shard-i.bin.tmp, flushed: write its index beside it, then rename
    both (.bin first: the index is what marks the shard finished)."""
    name = shard_name(i)
    idx_tmp = folder / f"{name}.json.tmp"
    with open(idx_tmp, "wb") as f:
        f.write(msgspec.json.encode(index))
        f.flush()
        os.fsync(f.fileno())
    os.replace(folder / f"{name}.bin.tmp", folder / f"{name}.bin")
    os.replace(idx_tmp, folder / f"{name}.json")


def read_index(path: Path) -> ShardIndex:
    try:
        return msgspec.json.decode(path.read_bytes(), type=ShardIndex)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise UserError(f"{path} is not a shard index ({e}): re-run `minititan tokenize` into a new folder") from None


def finished_shards(folder: Path) -> list[ShardIndex]:
    """The indices of the shards 0, 1, ... whose index exists (stops at the first gap)."""
    out = []
    while (folder / f"{shard_name(len(out))}.json").is_file():
        out.append(read_index(folder / f"{shard_name(len(out))}.json"))
    return out


class ShardFolder:
    """A tokenized folder read as one token stream (memory-mapped, nothing loaded up front but the
    indices), with its documents' start offsets."""

    def __init__(self, path: str, indices: list[ShardIndex], arrays: list[np.ndarray]):
        self.path, self.indices, self.arrays = path, indices, arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])  # shard i is stream [offsets[i], offsets[i+1])
        self.size = int(self.offsets[-1])
        starts = [np.asarray(ix.doc_starts, dtype=np.int64) + off for ix, off in zip(indices, self.offsets)]
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        first = indices[0]
        self.tokenizer, self.tokenizer_path, self.vocab_size = first.tokenizer, first.tokenizer_path, first.vocab_size
        self.max_id = max(ix.max_id for ix in indices)

    @classmethod
    def open(cls, path: str, key: str = "data.dataset") -> "ShardFolder":
        folder = Path(path)
        names = sorted(p.name for p in folder.glob("shard-*.json"))
        if not names:
            bins = list(folder.glob("shard-*.bin"))
            what = ("only shards without an index (an interrupted tokenize): run the same `minititan tokenize` "
                    "command again to finish it" if bins else
                    f"no shards: make them with `minititan tokenize CORPUS... {path}`")
            raise UserError(f"{key} {path!r} holds {what}")
        indices, arrays = [], []
        for i, name in enumerate(names):
            if name != f"{shard_name(i)}.json":
                raise UserError(f"{path}: {shard_name(i)} is missing (found {name}): the folder is incomplete; "
                                f"run the `minititan tokenize` that made it again to finish it")
            ix = read_index(folder / name)
            if ix.format != FORMAT:
                raise UserError(f"{folder / name} has format {ix.format!r}, not {FORMAT!r}: re-tokenize with this "
                                f"version of minititan")
            indices.append(ix)
            arrays.append(open_bin(folder / f"{shard_name(i)}.bin", ix))
        if not indices[-1].last:
            raise UserError(f"{key} {path!r} is an unfinished tokenize (its last shard is not marked last): run the "
                            f"same `minititan tokenize` command again to finish it")
        for ix, name in zip(indices, names):
            if (ix.tokenizer, ix.vocab_size) != (indices[0].tokenizer, indices[0].vocab_size):
                raise UserError(f"{path}: {name} was made with another tokenizer than {names[0]}: tokenize the whole "
                                f"corpus with one tokenizer, into one folder")
        return cls(path, indices, arrays)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """The stream's tokens [start, stop), which may span shards."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts, pos = [], start
        for i in range(first, len(self.arrays)):
            if pos >= stop:
                break
            lo = pos - self.offsets[i]
            hi = min(stop, self.offsets[i + 1]) - self.offsets[i]
            parts.append(self.arrays[i][lo:hi])
            pos = self.offsets[i] + hi
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def open_bin(path: Path, ix: ShardIndex) -> np.ndarray:
    if ix.dtype not in ("uint16", "uint32"):
        raise UserError(f"{path.with_suffix('.json')} has dtype {ix.dtype!r}: re-run `minititan tokenize`")
    itemsize = np.dtype(ix.dtype).itemsize
    size = path.stat().st_size if path.is_file() else None
    if size != ix.tokens * itemsize:
        found = "is missing" if size is None else f"holds {size} bytes"
        raise UserError(f"{path} {found}, but its index says {ix.tokens} {ix.dtype} tokens ({ix.tokens * itemsize} "
                        f"bytes): the shard is damaged; re-run `minititan tokenize` into a new folder")
    if ix.tokens == 0:
        return np.zeros(0, dtype=ix.dtype)
    return np.memmap(path, dtype=ix.dtype, mode="r")
