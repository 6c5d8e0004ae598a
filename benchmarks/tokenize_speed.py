"""Tokens/s of `minititan tokenize` against a plain `tokenizers` batch-encode loop over the same jsonl.

    python benchmarks/tokenize_speed.py OUT_DIR [--megabytes 200] [--workers 1,2,4,8,16] [--repeat 3] [--tokenizer T]

The corpus is the shipped Shakespeare, one paragraph per jsonl document, repeated to the size asked
for; the tokenizer a byte-level BPE (vocab 32,000) trained on it, unless --tokenizer names a
tokenizer.json. The baseline is what a user would write: read the lines, json-parse, call
`Tokenizer.encode_batch` on 1,000 documents at a time (which runs on every core through the
library's own thread pool). Ours runs the whole command (`python -m minititan.cli tokenize`, its own
process, shards written), once per worker count.
Both count the same tokens (no separators: --eos none). The rows run in turn, --repeat times, and
each keeps its fastest run (on a shared machine the others' load only ever slows a run down).
Prints one JSON line per row and writes them to OUT_DIR/tokenize_speed.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minititan.core.data import shakespeare_text  # noqa: E402
from minititan.data.tokenize_corpus import summarize  # noqa: E402


def make_corpus(folder: Path, megabytes: float) -> Path:
    paragraphs = [p for p in shakespeare_text().split("\n\n") if p.strip()]
    path = folder / "corpus.jsonl"
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 1e6:
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                written += len(line)
    return path


def train_tokenizer(folder: Path, vocab_size: int = 32_000) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = shakespeare_text()
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def baseline(corpus: Path, tokenizer: str, batch: int = 1000) -> tuple[int, float]:
    """The plain loop: tokens and seconds."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer)
    start, tokens, texts = time.perf_counter(), 0, []
    with open(corpus) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == batch:
                tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
                texts = []
    tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens, time.perf_counter() - start


def run_tokenize(corpus: Path, out: Path, *flags: str) -> tuple[int, float]:
    """`minititan tokenize corpus out flags` as a user runs it, in its own process (spawned workers
    import the parent's main module, which in-process would be the calling script and torch):
    (tokens written, seconds). A folder left in `out` by an earlier run is removed first."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minititan.cli", "tokenize", str(corpus), str(out), *flags], check=True,
                   capture_output=True, cwd=REPO,
                   env=os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    seconds = time.perf_counter() - start
    return summarize(str(out), 0)["tokens"], seconds


def ours(corpus: Path, tokenizer: str, out: Path, workers: int | None) -> tuple[int, float]:
    tokens, seconds = run_tokenize(corpus, out, "--tokenizer", tokenizer, "--eos", "none",
                                   *(["--workers", str(workers)] if workers is not None else []))
    shutil.rmtree(out, ignore_errors=True)
    return tokens, seconds


def compare(folder: Path, tokenizer: str, megabytes: float, workers: int | None, repeat: int = 1) -> dict:
    """Both sides over one corpus, in turn, `repeat` times; each keeps its fastest run."""
    corpus = make_corpus(Path(folder), megabytes)
    base_s = our_s = float("inf")
    for _ in range(repeat):
        base_tokens, seconds = baseline(corpus, tokenizer)
        base_s = min(base_s, seconds)
        our_tokens, seconds = ours(corpus, tokenizer, Path(folder) / "shards", workers)
        our_s = min(our_s, seconds)
    return {"megabytes": megabytes, "cores": len(os.sched_getaffinity(0)), "workers": workers,
            "baseline_tokens": base_tokens, "baseline_tokens_per_s": base_tokens / base_s,
            "ours_tokens": our_tokens, "ours_tokens_per_s": our_tokens / our_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--megabytes", type=float, default=200)
    ap.add_argument("--workers", default="", help="comma-separated worker counts (default: one per core)")
    ap.add_argument("--tokenizer", default="")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or train_tokenizer(out)
    corpus = make_corpus(out, args.megabytes)
    runs = {"tokenizers encode_batch loop": lambda: baseline(corpus, tokenizer)}
    for w in [int(x) for x in args.workers.split(",") if x] or [None]:
        runs[f"minititan tokenize --workers {w if w is not None else 'all'}"] = (
            lambda w=w: ours(corpus, tokenizer, out / "shards", w))
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeat):
        for name, run in runs.items():
            tokens, seconds = run()
            if name not in best or seconds < best[name][1]:
                best[name] = tokens, seconds
    rows = [{"run": name, "tokens": tokens, "seconds": seconds} for name, (tokens, seconds) in best.items()]
    with open(out / "tokenize_speed.jsonl", "w") as f:
        for r in rows:
            r |= {"tokens_per_s": round(r["tokens"] / r["seconds"]), "cores": len(os.sched_getaffinity(0)),
                  "megabytes": args.megabytes}
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")
    (out / corpus.name).unlink()


if __name__ == "__main__":
    main()
