"""Tokens in, batches out: the byte tokenizer, the built-in corpus, token files, synthetic data.

Sampling is a pure function of (seed, step): the global batch of step k is the same whatever the
parallel layout, each data-parallel rank takes its rows, and resuming at step k needs no state
but k. The built-in corpus keeps its last 10% apart as a held-out split for validation.
"""
from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np
import torch

from minititan.core.config import UserError

VALIDATION_FRACTION = 0.1


# ---------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes are the tokens: vocab 256, nothing to download, exact round trip."""
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer.json through the optional `tokenizers` package."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("a tokenizer.json needs the optional package `tokenizers`: pip install tokenizers "
                             "(or use data.tokenizer = \"byte\")") from None
        if not Path(path).is_file():
            raise UserError(f"tokenizer file {path!r} not found: pass the path of a tokenizer.json")
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(name: str):
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


# ---------------------------------------------------------------- token sources


def shakespeare_text() -> str:
    gz = importlib.resources.files("minititan").joinpath("assets/tinyshakespeare.txt.gz").read_bytes()
    return gzip.decompress(gz).decode("utf-8")


def load_token_file(path: str, key: str = "data.dataset") -> np.ndarray:
    """A pre-tokenized file: .npy, or raw .bin of uint16 (uint32 if the name says so). key: the
    config key that named it, for the error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key} {path!r} is neither 'shakespeare', 'synthetic' nor an existing token "
                         f"file: make one with `minititan tokenize TEXT_FILE OUT.bin`")
    if p.suffix == ".npy":
        return np.load(p, mmap_mode="r")
    dtype = np.uint32 if "uint32" in p.name else np.uint16
    return np.memmap(p, dtype=dtype, mode="r")


def tokenize_file(text_path: str, out_path: str, tokenizer: str = "byte") -> int:
    """Write a token file for data.dataset; returns the token count."""
    tok = get_tokenizer(tokenizer)
    ids = np.asarray(tok.encode(Path(text_path).read_text(encoding="utf-8")))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out = Path(out_path)
    if dtype == np.uint32 and "uint32" not in out.name:
        out = out.with_name(out.stem + ".uint32" + out.suffix)
    ids.astype(dtype).tofile(out)
    return len(ids)


class TokenSource:
    """Where batches come from: a token array (train and held-out splits) or synthetic tokens."""

    def __init__(self, dataset: str, vocab_size: int, key: str = "data.dataset"):
        self.synthetic = dataset == "synthetic"
        self.vocab_size = vocab_size
        if self.synthetic:
            return
        tokens = (np.frombuffer(shakespeare_text().encode("utf-8"), dtype=np.uint8)
                  if dataset == "shakespeare" else load_token_file(dataset, key))
        if tokens.size and int(tokens.max()) >= vocab_size:
            raise UserError(f"{key} holds token id {int(tokens.max())} but model.vocab_size is {vocab_size}: "
                             f"raise model.vocab_size or use the matching tokenizer")
        split = int(len(tokens) * (1 - VALIDATION_FRACTION)) if dataset == "shakespeare" else len(tokens)
        self.train, self.val = tokens[:split], tokens[split:]

    def batch(self, seed: int, step: int, batch_size: int, seq_len: int, split: str = "train"):
        """Global batch for `step`: inputs and labels, each [batch_size, seq_len] int64."""
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        if self.synthetic:
            seqs = rng.integers(0, self.vocab_size, size=(batch_size, seq_len + 1))
        else:
            tokens = self.train if split == "train" else self.val
            if len(tokens) < seq_len + 2:
                raise UserError(f"the {split} data has {len(tokens)} tokens, fewer than training.seq_len + 2")
            starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
            seqs = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts])
        seqs = torch.from_numpy(seqs.astype(np.int64))
        return seqs[:, :-1], seqs[:, 1:]


def rank_rows(x: torch.Tensor, data_rank: int, data_size: int) -> torch.Tensor:
    """This data-parallel rank's contiguous slice of the global batch."""
    n = x.shape[0] // data_size
    return x[data_rank * n:(data_rank + 1) * n]
