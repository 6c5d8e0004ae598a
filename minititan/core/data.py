"""Tokens in, batches out: what data.dataset / data.sources name, read as the sampling scheme says.

    data = TokenSource("shakespeare", vocab_size=256)          # or a shard folder, a token file, synthetic
    data = TokenSource("", 256, sources=[Source("web/", 0.7), Source("code/", 0.3)], holdout=0.01)
    batch = data.read(seed, step, batch_size, seq_len, rows=rank_slice(rank, ranks, batch_size))

Sampling is a pure function of (seed, step) (minititan/data/sampling.py): the global batch of step k
is the same whatever the parallel layout, each data-parallel rank reads only its own rows of it,
and resuming at step k needs no state but k. A source is a shard folder (`minititan tokenize`), a
token file (.bin of uint16, uint32 if the name says so, or .npy) or the built-in corpus, whose last
10% is always held out for validation; data.holdout_fraction holds out that fraction of every other
source's chunks. Shard folders know their documents (for data.document_masking); the built-in
corpus's documents are its paragraphs; a token file has none (one document).
"""
from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from minititan.core.config import Source, UserError
from minititan.data.loader import Prefetcher
from minititan.data.sampling import Part, Sampler, split_chunks
from minititan.data.shards import ShardFolder
from minititan.data.tokenizer import first_line, load_tokenizer

VALIDATION_FRACTION = 0.1  # the built-in corpus's held-out tail
TRAIN, VAL = 0, 1  # sampler tags: the two splits draw from different generators


class Batch(NamedTuple):
    """Rows of a global batch: int64 [rows, seq_len] each; positions and documents only with
    data.document_masking (each token's position inside its document, and its document's index
    inside its row)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None


# ---------------------------------------------------------------- token streams


class ArrayStream:
    """A token array as a stream (a token file, the built-in corpus), with optional document starts."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray | None = None):
        self.array, self.size, self.doc_starts = tokens, len(tokens), doc_starts

    def tokens(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


def shakespeare_text() -> str:
    gz = importlib.resources.files("minititan").joinpath("assets/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(gz).decode("utf-8")


def shakespeare_streams() -> tuple[ArrayStream, ArrayStream]:
    """The built-in corpus as bytes, split 90 / 10 into train and held-out; a document is a speech
    (paragraphs are separated by a blank line)."""
    tokens = np.frombuffer(shakespeare_text().encode("utf-8"), dtype=np.uint8)
    split = int(len(tokens) * (1 - VALIDATION_FRACTION))
    blank = np.flatnonzero((tokens[:-1] == 10) & (tokens[1:] == 10)) + 2  # the token after "\n\n"
    starts = np.concatenate([[0], blank]).astype(np.int64)
    train, val = starts[starts < split], starts[starts >= split] - split
    return ArrayStream(tokens[:split], train), ArrayStream(tokens[split:], np.concatenate([[0], val]))


def load_token_file(path: str, key: str = "data.dataset") -> np.ndarray:
    """A pre-tokenized file: .npy, or raw .bin of uint16 (uint32 if the name says so)."""
    p = Path(path)
    if p.suffix in (".txt", ".jsonl", ".gz", ".parquet", ".json", ".md"):
        raise UserError(f"{key} {path!r} is text, not tokens: tokenize it first with `minititan tokenize {path} "
                        f"tokens/` and set {key} = \"tokens/\"")
    if p.suffix == ".npy":
        try:
            tokens = np.load(p, mmap_mode="r")
        except ValueError as e:
            raise UserError(f"{key} {path!r} is not a readable .npy array ({first_line(e)}): save one with "
                            f"numpy.save, or make a token file with `minititan tokenize TEXT {p.stem}.bin`") from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise UserError(f"{key} {path!r} holds a {tokens.dtype} array of shape {tokens.shape}, not token ids: save "
                            f"a 1-D integer array (numpy.save(path, ids.astype(numpy.uint32).ravel()))")
        return tokens
    dtype = np.uint32 if "uint32" in p.name else np.uint16
    size = p.stat().st_size
    if size == 0 or size % np.dtype(dtype).itemsize:
        what = "empty" if size == 0 else f"{size} bytes, not a whole number of {np.dtype(dtype).name} tokens"
        raise UserError(f"{key} {path!r} is {what}: make the token file with `minititan tokenize TEXT {p.name}`")
    return np.memmap(p, dtype=dtype, mode="r")


def open_stream(path: str, key: str) -> tuple[object, ShardFolder | None]:
    """(stream, the same if it is a shard folder, else None) for a shard folder or a token file."""
    p = Path(path)
    if p.is_dir():
        folder = ShardFolder.open(path, key)
        return folder, folder
    if not p.is_file():
        raise UserError(f"{key} {path!r} is neither 'shakespeare', 'synthetic', a shard folder nor a token file: "
                        f"make shards with `minititan tokenize CORPUS... tokens/` and pass the folder")
    return ArrayStream(load_token_file(path, key)), None


def check_vocabulary(stream, folder: ShardFolder | None, path: str, key: str, vocab_size: int, tok) -> None:
    """Ids must fit model.vocab_size, and shards must come from data.tokenizer (`tok`, loaded; None:
    not checked)."""
    if folder is not None:
        if tok is not None and tok.fingerprint != folder.tokenizer:
            raise UserError(f"{key} {path!r} was tokenized with {folder.tokenizer_path} (vocab {folder.vocab_size}) "
                            f"but data.tokenizer = {getattr(tok, 'path', 'byte')!r} (vocab {tok.vocab_size}): set "
                            f"data.tokenizer to the tokenizer the shards were made with, or re-tokenize")
        top = folder.max_id
    else:
        top = int(stream.array.max()) if stream.size else 0
        low = int(stream.array.min()) if stream.size and stream.array.dtype.kind == "i" else 0  # a signed .npy
        if low < 0:
            raise UserError(f"{key} {path!r} holds negative token ids (down to {low}): token ids "
                            f"are 0 .. vocab_size - 1; make the file with `minititan tokenize`")
    if top >= vocab_size:
        raise UserError(f"{key} {path!r} holds token id {top} but model.vocab_size is {vocab_size}: raise "
                        f"model.vocab_size to at least {top + 1} or use the matching tokenizer")


# ---------------------------------------------------------------- the token source of a run


class TokenSource:
    """Where batches come from: one dataset, or a weighted mix of sources, plus synthetic tokens."""

    def __init__(self, dataset: str, vocab_size: int, key: str = "data.dataset", sources: list[Source] = (),
                 holdout: float = 0.0, tokenizer: str | None = None):
        self.vocab_size, self.synthetic = vocab_size, dataset == "synthetic" and not sources
        self.train_parts: list[tuple[str, object, float, float]] = []  # name, stream, weight, holdout
        self.val_streams: list[tuple[str, object, float]] = []  # streams held out whole (the built-in's tail)
        self._samplers: dict = {}
        tok = None if tokenizer is None else load_tokenizer(tokenizer)  # a broken one fails now, not at generate time
        if self.synthetic:
            return
        named = [(f"data.sources[{i}]", s.path, s.weight) for i, s in enumerate(sources)] or [(key, dataset, 1.0)]
        for k, path, weight in named:
            if path == "shakespeare":
                train, val = shakespeare_streams()
                self.train_parts.append((path, train, weight, 0.0))
                self.val_streams.append((path, val, weight))
                if vocab_size < 256:
                    raise UserError(f"{k} = shakespeare is bytes (ids up to 255) but model.vocab_size is {vocab_size}: "
                                    f"set model.vocab_size = 256")
                continue
            if path == "synthetic":
                raise UserError(f"{k} = synthetic cannot be mixed with other sources: use it as data.dataset alone")
            stream, folder = open_stream(path, k)
            check_vocabulary(stream, folder, path, k, vocab_size, tok)
            self.train_parts.append((path, stream, weight, holdout))

    def sampler(self, split: str, seq_len: int, batch_size: int, seed: int) -> Sampler:
        """The sampler of a split (cached: its block sums carry over from step to step)."""
        cache_key = (split, seq_len, batch_size, seed)
        if cache_key not in self._samplers:
            self._samplers[cache_key] = Sampler(self.parts(split, seq_len), seq_len, batch_size, seed,
                                                TRAIN if split == "train" else VAL)
        return self._samplers[cache_key]

    def parts(self, split: str, seq_len: int) -> list[Part]:
        parts = []
        for name, stream, weight, holdout in self.train_parts:
            n_train, n_held = split_chunks(stream.size, seq_len, holdout)
            if split == "train":
                parts.append(Part(name, stream, weight, 0, n_train, shuffle=True))
                if n_train == 0:
                    raise UserError(f"{name} has {stream.size} tokens, too few for one training sequence of "
                                    f"training.seq_len + 1 = {seq_len + 1} (after the held-out part): use more "
                                    f"data or a shorter training.seq_len")
            elif n_held:
                parts.append(Part(name, stream, weight, n_train, n_held, shuffle=False))
        if split == "val":
            for name, stream, weight in self.val_streams:
                n = split_chunks(stream.size, seq_len, 0.0)[0]
                if n:
                    parts.append(Part(name, stream, weight, 0, n, shuffle=False))
        return parts

    def has_held_out(self, seq_len: int) -> bool:
        return self.synthetic or bool(self.parts("val", seq_len))

    def read(self, seed: int, step: int, batch_size: int, seq_len: int, split: str = "train",
             rows: slice = slice(None), documents: bool = False) -> Batch:
        """Those rows of the global batch of `step` of a split ("train" or "val")."""
        if self.synthetic:
            return self.synthetic_rows(seed, step, batch_size, seq_len, split, rows, documents)
        sampler = self.sampler(split, seq_len, batch_size, seed)
        if not sampler.parts:
            raise UserError("there is no held-out data to validate on: set data.holdout_fraction > 0 or "
                            "validation.dataset")
        seqs, docs, pos = sampler.read(step, rows, documents)
        seqs = torch.from_numpy(seqs)
        if not documents:
            return Batch(seqs[:, :-1], seqs[:, 1:])
        return Batch(seqs[:, :-1], seqs[:, 1:], torch.from_numpy(pos), torch.from_numpy(docs.astype(np.int64)))

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, split: str = "train"):
        """(inputs, labels) of the whole global batch: the short form tests and tools use."""
        return self.read(seed, step, batch_size, seq_len, split)[:2]

    def epochs(self, seed: int, step: int, batch_size: int, seq_len: int) -> dict[str, float]:
        """Epochs of each source's training chunks read by the end of `step` (for the log)."""
        if self.synthetic:
            return {}
        sampler = self.sampler("train", seq_len, batch_size, seed)
        return {p.name: e for p, e in zip(sampler.parts, sampler.epochs(step))}

    def synthetic_rows(self, seed, step, batch_size, seq_len, split, rows, documents) -> Batch:
        """Uniform random tokens (benchmarks); with documents, each row is cut into documents of
        random lengths (a new one starts at each token with probability 4 / seq_len)."""
        rng = np.random.default_rng([seed, step, TRAIN if split == "train" else VAL])
        seqs = torch.from_numpy(rng.integers(0, self.vocab_size, size=(batch_size, seq_len + 1)))[rows]
        if not documents:
            return Batch(seqs[:, :-1], seqs[:, 1:])
        starts = rng.random((batch_size, seq_len)) < 4 / seq_len
        starts[:, 0] = False
        docs = np.cumsum(starts, axis=1)[rows]
        first = np.maximum.accumulate(np.where(starts, np.arange(seq_len), 0), axis=1)[rows]
        return Batch(seqs[:, :-1], seqs[:, 1:], torch.from_numpy(np.arange(seq_len) - first),
                     torch.from_numpy(docs.astype(np.int64)))


def token_source(cfg) -> TokenSource:
    """The run's training data (data.dataset or data.sources); checks data.tokenizer loads."""
    d = cfg.data
    return TokenSource(d.dataset, cfg.model.vocab_size, sources=d.sources, holdout=d.holdout_fraction,
                       tokenizer=d.tokenizer)


def prefetcher(cfg, data: TokenSource, data_rank: int, data_size: int, first_step: int,
               device: torch.device) -> Prefetcher:
    """This rank's rows of every step's global batch from first_step on, read ahead on a thread."""
    t = cfg.training
    rows = rank_slice(data_rank, data_size, t.global_batch_size)

    def read(step: int) -> Batch:
        return data.read(t.seed, step, t.global_batch_size, t.seq_len, rows=rows,
                         documents=cfg.data.document_masking)

    return Prefetcher(read, first_step, t.steps, cfg.data.prefetch, pin=device.type == "cuda")


def rank_slice(data_rank: int, data_size: int, batch_size: int) -> slice:
    """This data-parallel rank's contiguous rows of the global batch."""
    n = batch_size // data_size
    return slice(data_rank * n, (data_rank + 1) * n)

