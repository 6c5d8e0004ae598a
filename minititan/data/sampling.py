"""Which tokens row r of step k reads: shuffled sequential chunks, without replacement per epoch,
from sources mixed by weight, as a pure function of (seed, step).

Each source is one token stream (a shard folder, a token file, the built-in corpus) cut into
chunks of seq_len + 1 tokens that overlap by one (chunk c is tokens [c*seq_len, (c+1)*seq_len + 1):
inputs are its first seq_len tokens, labels its last seq_len), so every token is a label once per
epoch. A source's chunks are split once: the first (1 - holdout) part is what training reads, the
rest is held out for validation and never sampled by training.

    sample s of a source:  epoch e = s // n_train, then chunk = permute(s % n_train, key(seed, source, e))

`permute` is a keyed bijection of [0, n) (a Feistel network, below): epoch e visits every training
chunk exactly once, in an order that is a pure function of (seed, source, e), with no table held
in memory, however many chunks there are.

Mixing: each step's global batch of B rows holds n_i rows of source i, drawn as multinomial(B,
weights) from a generator seeded by (seed, block of 1024 steps). A source's samples are used in
order, so the rows of step k from source i are its samples [N_i(k-1), N_i(k)), N_i the running sum
of its counts over the steps before (summed block by block: a resume at step 10^6 costs about
a thousand small draws).
The rows of a step are then shuffled (seeded by (seed, step)), so that no data-parallel rank reads
one source only. Every rank computes this table of B (source, chunk) pairs, a few microseconds,
and reads the tokens of its own rows only.

Random windows (a uniform start anywhere) would repeat some tokens and skip others within an
epoch; sequential chunks in a shuffled order see each token once per epoch and make the epoch
count of each source exact (the trainer logs it).
"""
from __future__ import annotations

import dataclasses

import numpy as np

MIX_BLOCK = 1024  # steps per draw of per-step source counts
FEISTEL_ROUNDS = 4


# ---------------------------------------------------------------- a permutation without a table


def _round_hash(x: np.ndarray, key: int, round_: int, mask: np.uint64) -> np.ndarray:
    """A keyed mix of the right half (splitmix64's finalizer), cut to the half's width."""
    with np.errstate(over="ignore"):
        z = x + np.uint64((key * 0x9E3779B97F4A7C15 + round_ * 0xBF58476D1CE4E5B9) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & mask


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """A bijection of [0, n), keyed: position i -> index. A Feistel network permutes [0, 4^h) for
    the smallest 4^h >= n (two halves of h bits); values that land at n or above are sent through
    again ("cycle walking") until they land inside, which keeps it a bijection of [0, n)."""
    half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    x = np.asarray(i, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half_bits), x[todo] & mask
        for r in range(FEISTEL_ROUNDS):
            left, right = right, left ^ _round_hash(right, key, r, mask)
        x[todo] = (left << np.uint64(half_bits)) | right
        todo = x >= n
    return x.astype(np.int64)


def mix_key(*parts: int) -> int:
    """One 63-bit key from small ints (seed, source, epoch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------- sources and their chunks


@dataclasses.dataclass
class Part:
    """The chunks [first, first + count) of one stream that one split reads, and its weight."""
    name: str
    stream: object  # .size, .tokens(start, stop), .doc_starts (np.int64 array, or None)
    weight: float
    first: int
    count: int
    shuffle: bool  # training: a new order every epoch; validation: in order


def split_chunks(size: int, seq_len: int, holdout: float) -> tuple[int, int]:
    """(training chunks, held-out chunks) of a stream of `size` tokens."""
    chunks = max(size - 1, 0) // seq_len
    held = int(chunks * holdout)
    return chunks - held, held


class Sampler:
    """The global batch of a step as (part, chunk) per row, and each row's tokens."""

    def __init__(self, parts: list[Part], seq_len: int, batch_size: int, seed: int, tag: int):
        total = sum(p.weight for p in parts)
        self.parts, self.seq_len, self.batch_size, self.seed, self.tag = parts, seq_len, batch_size, seed, tag
        self.weights = np.array([p.weight / total for p in parts])
        self._served = [np.zeros(len(parts), dtype=np.int64)]  # [i]: samples per part in blocks 0..i-1
        self._block_cache: tuple[int, np.ndarray] | None = None

    def block_counts(self, block: int) -> np.ndarray:
        """[MIX_BLOCK, parts]: rows per part in each step of the block."""
        if len(self.parts) == 1:
            return np.full((MIX_BLOCK, 1), self.batch_size, dtype=np.int64)
        if self._block_cache is None or self._block_cache[0] != block:
            rng = np.random.default_rng([self.seed, self.tag, 0x6D6978, block])
            self._block_cache = block, rng.multinomial(self.batch_size, self.weights, size=MIX_BLOCK)
        return self._block_cache[1]

    def samples_before(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(samples each part served in steps 0..step-1, its rows in this step)."""
        block, within = divmod(step, MIX_BLOCK)
        while len(self._served) <= block:  # running sums, extended once per new block
            self._served.append(self._served[-1] + self.block_counts(len(self._served) - 1).sum(0))
        counts = self.block_counts(block)
        return self._served[block] + counts[:within].sum(0), counts[within]

    def rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(part index, chunk index) of every row of the step's global batch."""
        before, now = self.samples_before(step)
        part = np.repeat(np.arange(len(self.parts)), now)
        sample = np.concatenate([before[i] + np.arange(n) for i, n in enumerate(now)])
        if len(self.parts) > 1:
            order = np.random.default_rng([self.seed, self.tag, 0x726F77, step]).permutation(self.batch_size)
            part, sample = part[order], sample[order]
        chunk = np.empty_like(sample)
        for i, p in enumerate(self.parts):
            mine = part == i
            epoch, pos = np.divmod(sample[mine], p.count)
            if p.shuffle:
                for e in np.unique(epoch):
                    at = epoch == e
                    pos[at] = permute(pos[at], p.count, mix_key(self.seed, self.tag, i, int(e)))
            chunk[mine] = p.first + pos
        return part, chunk

    def epochs(self, step: int) -> list[float]:
        """Epochs of each part's training chunks read by the end of `step`."""
        before, now = self.samples_before(step)
        return [float(n) / p.count for n, p in zip(before + now, self.parts)]

    def read(self, step: int, rows: slice, documents: bool):
        """Tokens [rows, seq_len + 1] int64 of those rows of the step, and (documents) each input
        token's document index within its row and position within its document [rows, seq_len]."""
        part, chunk = self.rows(step)
        L = self.seq_len
        seqs = np.empty((len(part[rows]), L + 1), dtype=np.int64)
        docs = np.zeros((len(seqs), L), dtype=np.int32) if documents else None
        pos = np.empty((len(seqs), L), dtype=np.int64) if documents else None
        for r, (i, c) in enumerate(zip(part[rows], chunk[rows])):
            stream, start = self.parts[i].stream, int(c) * L
            seqs[r] = stream.tokens(start, start + L + 1)
            if documents:
                docs[r], pos[r] = document_layout(stream.doc_starts, start, L)
        return seqs, docs, pos


def document_layout(doc_starts: np.ndarray | None, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For tokens [start, start + length) of a stream: each token's document (0, 1, ... within the
    window) and its position inside that document, counted from the window's start for the first."""
    if doc_starts is None:
        return np.zeros(length, np.int32), np.arange(length)
    lo, hi = np.searchsorted(doc_starts, [start + 1, start + length])
    inside = doc_starts[lo:hi] - start  # documents that begin inside the window (not at its first token)
    doc = np.zeros(length, dtype=np.int32)
    doc[inside] = 1
    doc = np.cumsum(doc, dtype=np.int32)
    first = np.concatenate([[0], inside])
    return doc, np.arange(length) - first[doc]
