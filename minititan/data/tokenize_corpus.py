"""`minititan tokenize`: stream a corpus into fixed-size token shards, on every core, resumably.

    tokenize_corpus(["corpus/"], "tokens/", tokenizer="tokenizer.json", workers=16)

The pipeline: the main process cuts the input files into work units (readers.py), hands them to a
pool of worker processes and takes the results back *in order*, at most a few units ahead of the
writer, so memory stays flat whatever the corpus size. Each worker parses its unit, encodes the
documents in one batch call and adds BOS / EOS around each document. The writer appends the tokens
to the current shard and writes it out (shards.py, atomically) when it holds `shard_tokens`.

Deterministic: units are cut from the files alone and written in unit order, so any number of
workers writes byte-identical shards. Resumable: every shard's index records where the next
shard starts (work unit, tokens to skip in it); a rerun of the same command skips the units before
that point without tokenizing them and carries on with the first unfinished shard.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

from minititan.core.config import UserError
from minititan.data import readers, shards
from minititan.data.tokenizer import EOS_NAMES, load_tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16: a few seconds to read, thousands of sequences


class Options(msgspec.Struct, frozen=True):
    """Everything that decides the token stream (the run key of a resume is its hash)."""
    files: list[str]
    file_sizes: list[int]
    tokenizer: str  # fingerprint
    text_field: str
    bos: int | None
    eos: int | None
    shard_tokens: int
    unit_bytes: int


class Progress:
    """One line on stderr every `every` seconds (0: none): documents, tokens, MB/s of input, ETA."""

    def __init__(self, total_bytes: int, every: float = 2.0, out=sys.stderr):
        self.total, self.every, self.out = max(total_bytes, 1), every, out
        self.start = self.last = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0

    def add(self, docs: int, tokens: int, nbytes: int, force: bool = False) -> None:
        self.docs, self.tokens, self.bytes = self.docs + docs, self.tokens + tokens, self.bytes + nbytes
        now = time.perf_counter()
        if self.every > 0 and (force or now - self.last >= self.every):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9)
            eta = (self.total - self.bytes) / rate if rate > 0 else float("inf")
            print(f"tokenize: {self.docs:,} documents, {self.tokens:,} tokens, {rate / 1e6:.1f} MB/s, "
                  f"{self.bytes / self.total:.0%}, ETA {format_seconds(eta)}", file=self.out, flush=True)


def format_seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------- the workers


_worker: dict = {}  # per worker process: the tokenizer and options, set once by init_worker


def init_worker(tokenizer_name: str, files: list[str], text_field: str, bos, eos, in_process: bool = False) -> None:
    if not in_process:  # one thread per worker process: the workers are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tok=load_tokenizer(tokenizer_name, "--tokenizer"), files=files, text_field=text_field,
                   bos=bos, eos=eos)


def encode_unit(unit: readers.Unit) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (tokens uint32 with BOS/EOS, offsets of the documents that start in the unit, documents)."""
    w = _worker
    docs = readers.unit_documents(unit, w["files"][unit.file], w["text_field"])
    ids = w["tok"].encode_batch([text for text, _, _ in docs])
    bos = None if w["bos"] is None else np.array([w["bos"]], dtype=np.uint32)
    eos = None if w["eos"] is None else np.array([w["eos"]], dtype=np.uint32)
    pieces, starts, length = [], [], 0
    for (_, begins, ends), doc in zip(docs, ids):
        if begins:
            starts.append(length)
            if bos is not None:
                pieces.append(bos)
                length += 1
        pieces.append(np.asarray(doc, dtype=np.uint32))  # one conversion per document, not per token
        length += len(doc)
        if ends and eos is not None:
            pieces.append(eos)
            length += 1
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    return tokens, np.array(starts, dtype=np.int64), len(starts)


def ordered_results(pool, units, lookahead: int):
    """The pool's results in unit order, with at most `lookahead` units in flight (a pool's map
    would read the whole input ahead of the writer)."""
    pending: collections.deque = collections.deque()
    for unit in units:
        pending.append((unit, pool.submit(encode_unit, unit)))
        if len(pending) >= lookahead:
            u, r = pending.popleft()
            yield u, r.result()
    while pending:
        u, r = pending.popleft()
        yield u, r.result()


class InlinePool:
    """workers = 0: the same calls in this process (debugging, tests)."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future


# ---------------------------------------------------------------- the writer


class ShardWriter:
    """Streams the ordered unit results into shards: tokens go straight to the shard's temporary
    file (only its document starts are kept in memory), and a full shard is closed and renamed."""

    def __init__(self, folder: Path, opts: Options, run: str, tok, files: list[str], first_shard: int):
        self.folder, self.opts, self.run, self.tok, self.files = folder, opts, run, tok, files
        self.dtype = np.dtype(shards.dtype_for(tok.vocab_size))
        self.shard, self.file = first_shard, None

    def open(self) -> None:
        self.file = open(self.folder / f"{shards.shard_name(self.shard)}.bin.tmp", "wb")
        self.fill, self.max_id, self.starts, self.sources = 0, 0, [], set()

    def add(self, unit: readers.Unit, tokens: np.ndarray, starts: np.ndarray, skip: int) -> None:
        """Append tokens[skip:] of this unit (skip > 0: the part before belongs to a written shard)."""
        pos = skip
        while pos < len(tokens):
            if self.file is None:
                self.open()
            take = min(len(tokens) - pos, self.opts.shard_tokens - self.fill)
            part = tokens[pos:pos + take]
            self.file.write(part.astype(self.dtype).tobytes())
            self.max_id = max(self.max_id, int(part.max()))
            self.starts += (starts[(starts >= pos) & (starts < pos + take)] - pos + self.fill).tolist()
            self.sources.add(self.files[unit.file])
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.opts.shard_tokens:
                self.close((unit.index, pos) if pos < len(tokens) else (unit.index + 1, 0), last=False)

    def close(self, end: tuple[int, int], last: bool) -> None:
        """Finish the current shard (an empty one if none is open): flush, index, rename."""
        if self.file is None:
            self.open()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        ix = shards.ShardIndex(
            format=shards.FORMAT, tokens=self.fill, dtype=self.dtype.name, tokenizer=self.tok.fingerprint,
            tokenizer_path=getattr(self.tok, "path", "byte"), vocab_size=self.tok.vocab_size, bos=self.opts.bos,
            eos=self.opts.eos, max_id=self.max_id, doc_starts=self.starts,
            continues=self.fill > 0 and self.starts[:1] != [0], sources=sorted(self.sources), run=self.run,
            end_unit=end[0], end_skip=end[1], last=last)
        shards.finish_shard(self.folder, self.shard, ix)
        self.shard += 1


# ---------------------------------------------------------------- the command


def resolve_special(tok, value: str | None, default: int | None, flag: str) -> int | None:
    """--bos / --eos: 'none', a token (e.g. '</s>') or an id; None = the tokenizer's default."""
    if value is None:
        return default
    if value.lower() == "none":
        return None
    token_id = tok.token_id(value)
    if token_id is None or not 0 <= token_id < tok.vocab_size:
        raise UserError(f"{flag} {value!r} is not a token of this tokenizer: pass a token it has (e.g. "
                        f"'<|endoftext|>' or '</s>'), an id below {tok.vocab_size}, or none")
    return token_id


def tokenize_corpus(inputs: list[str], out: str, tokenizer: str = "byte", text_field: str = "text",
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None, bos: str | None = None,
                    eos: str | None = None, unit_bytes: int = readers.UNIT_BYTES, progress_every: float = 2.0) -> dict:
    """Tokenize (or finish tokenizing) `inputs` into shards in `out`; returns a summary."""
    folder = Path(out)
    if not folder.parent.is_dir():
        raise UserError(f"the output folder's parent {str(folder.parent)!r} does not exist: create it "
                        f"(mkdir -p {folder.parent}) or pass another output folder")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"the output {out!r} is a file: pass a folder for the shards (the last path)")
    if shard_tokens <= 0:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer, "--tokenizer")
    files = readers.expand_inputs(inputs)
    eos_id = resolve_special(tok, eos, tok.default_eos, "--eos")
    if eos is None and eos_id is None:
        raise UserError(f"{tokenizer} has none of the usual end-of-text tokens ({', '.join(EOS_NAMES)}): "
                        f"pass --eos TOKEN (or --eos none to write no separator)")
    opts = Options(files=[os.path.abspath(f) for f in files], file_sizes=[os.path.getsize(f) for f in files],
                   tokenizer=tok.fingerprint, text_field=text_field, bos=resolve_special(tok, bos, None, "--bos"),
                   eos=eos_id, shard_tokens=shard_tokens, unit_bytes=unit_bytes)
    run = hashlib.sha256(msgspec.json.encode(opts)).hexdigest()[:16]
    folder.mkdir(exist_ok=True)
    done = shards.finished_shards(folder)
    if done and done[0].run != run:
        raise UserError(f"{out} holds shards of another tokenize run (other inputs, tokenizer or options): pass a "
                        f"new output folder, or delete {out}")
    for stale in folder.glob("*.tmp"):  # an interrupted write; its shard is redone
        stale.unlink()
    if done and done[-1].last:
        return summarize(out, len(done))
    start_unit, skip = (done[-1].end_unit, done[-1].end_skip) if done else (0, 0)
    writer = ShardWriter(folder, opts, run, tok, files, len(done))
    units = (u for u in readers.read_units(files, text_field, unit_bytes) if u.index >= start_unit)
    progress = Progress(sum(opts.file_sizes), progress_every)
    n_workers = len(os.sched_getaffinity(0)) if workers is None else workers
    pool_args = (tokenizer, files, text_field, opts.bos, opts.eos)
    last_unit = start_unit - 1
    if n_workers == 0:
        init_worker(*pool_args, in_process=True)
        results = ordered_results(InlinePool(), units, 1)
        pool = None
    else:
        # spawn: fresh interpreters (no forked threads); a worker that dies fails the run, never hangs it
        pool = concurrent.futures.ProcessPoolExecutor(n_workers, multiprocessing.get_context("spawn"), init_worker,
                                                      pool_args)
        results = ordered_results(pool, units, 4 * n_workers)
    try:
        for unit, (tokens, starts, n_docs) in results:
            writer.add(unit, tokens, starts, skip if unit.index == start_unit else 0)
            last_unit = unit.index
            progress.add(n_docs, len(tokens), unit.input_bytes)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    if not done and writer.shard == 0 and writer.file is None:
        raise UserError(f"the inputs hold no text ({len(files)} file(s), every document empty): check the files "
                        f"and --text-field")
    writer.close((last_unit + 1, 0), last=True)
    progress.add(0, 0, 0, force=True)
    return summarize(out, len(done))


def summarize(out: str, resumed: int) -> dict:
    """Shards, tokens and documents of a finished folder (documents: those that start in it)."""
    indices = shards.finished_shards(Path(out))
    return {"out": out, "shards": len(indices), "resumed_shards": resumed, "tokens": sum(ix.tokens for ix in indices),
            "documents": sum(len(ix.doc_starts) for ix in indices)}


def tokenize_to_file(inputs: list[str], out: str, tokenizer: str = "byte", text_field: str = "text",
                     workers: int | None = None, bos: str | None = None, eos: str | None = "none") -> int:
    """One token file for data.dataset (the single-file form of `tokenize ... OUT.bin`): the same
    pipeline into one unbounded shard, moved to `out` (named .uint32.bin where ids need 32 bits)."""
    target = Path(out)
    if not target.parent.is_dir():
        raise UserError(f"the folder of {out!r} does not exist: create it (mkdir -p {target.parent}) or pass "
                        f"another output path")
    work = target.with_name(target.name + ".shards")
    tokenize_corpus(inputs, str(work), tokenizer, text_field, 2**62, workers, bos, "none" if eos is None else eos,
                    progress_every=2.0)
    index = work / f"{shards.shard_name(0)}.json"
    ix = shards.read_index(index)
    if ix.dtype == "uint32" and "uint32" not in target.name:
        target = target.with_name(target.stem + ".uint32" + target.suffix)
    index.unlink()  # first: a kill from here on leaves no index without its tokens, and a rerun redoes the work
    os.replace(work / f"{shards.shard_name(0)}.bin", target)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return ix.tokens
