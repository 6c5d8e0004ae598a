"""`minititan tokenize`: shards from generated corpora; determinism, resume, flat memory, bad input."""
import base64
import gzip
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from minititan.data import tokenize_corpus as tc
from minititan.data.shards import ShardFolder, finished_shards
from minititan.data.tokenizer import load_tokenizer
from tests import harness
from tests.harness import assert_one_line_error

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum élan naïve".split()


def make_corpus(folder: Path, docs: int = 400, seed: int = 0) -> list[str]:
    """A jsonl, a jsonl.gz and a txt file; returns every document's text in stream order."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for _ in range(docs)]
    half = docs // 2
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts[:half])))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[half:])
    story = "\n".join(" ".join(rng.choices(WORDS, k=8)) for _ in range(300))
    (folder / "c.txt").write_text(story)
    return texts + [story]


def read_docs(out: Path, tok) -> list[str]:
    f = ShardFolder.open(str(out))
    tokens = f.tokens(0, f.size)
    bounds = list(f.doc_starts) + [f.size]
    return [tok.decode(tokens[a:b - 1]) for a, b in zip(bounds, bounds[1:])]  # each ends with EOS


def test_shards_hold_every_document_with_eos_and_an_index(tmp_path):
    texts = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    done = tc.tokenize_corpus([str(tmp_path / "corpus")], str(out), shard_tokens=5000, workers=0, unit_bytes=2048,
                              progress_every=0)
    shards = finished_shards(out)
    assert done["shards"] == len(shards) > 3 and all(s.tokens == 5000 for s in shards[:-1]) and shards[-1].last
    assert sum(s.tokens for s in shards) == done["tokens"] and done["documents"] == len(texts)
    assert read_docs(out, load_tokenizer("byte")) == texts  # the txt file is one document, cut into units
    ix = shards[0]
    assert (ix.tokenizer, ix.vocab_size, ix.dtype, ix.eos) == ("byte", 256, "uint16", 0)
    assert ix.sources and all(Path(s).name in ("a.jsonl", "b.jsonl.gz", "c.txt") for s in ix.sources)


def test_same_shards_for_any_worker_count(tmp_path):
    make_corpus(tmp_path / "corpus")
    outs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"out{workers}"
        tc.tokenize_corpus([str(tmp_path / "corpus")], str(out), shard_tokens=4000, workers=workers,
                           unit_bytes=1024, progress_every=0)
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) > 6


def test_jsonl_lines_read_as_the_standard_library_reads_them():
    """The workers decode a line with msgspec (the text field only) and fall back to `json` for
    whatever msgspec refuses: every kind of line gives the text `json.loads` gives."""
    from minititan.data import readers
    records = [{"text": "plain", "id": 1, "meta": {"nested": [1, 2, {"text": "not this"}]}},
               {"meta": None, "text": "caf\u00e9 \ud83d\ude00 \"quoted\" \\ back\nslash"},
               {"text": "", "note": "an empty document is skipped"},
               {"score": float("nan"), "text": "NaN elsewhere (json accepts it, msgspec does not)"},
               {"text": "first", "x": 1, "text2": "other field"}]
    lines = [json.dumps(r).encode() for r in records] + [b'{"text": "dup", "text": "last wins"}']
    unit = readers.Unit(0, 0, "jsonl", b"\n".join(lines) + b"\n")
    got = [text for text, _, _ in readers.unit_documents(unit, "x.jsonl", "text")]
    assert got == [t for t in (json.loads(line)["text"] for line in lines) if t]


def test_resume_redoes_no_finished_shard(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus")
    kw = dict(shard_tokens=3000, workers=0, unit_bytes=1024, progress_every=0)
    tc.tokenize_corpus([str(tmp_path / "corpus")], str(tmp_path / "clean"), **kw)

    close, encoded = tc.ShardWriter.close, []

    def crash_after_three(self, end, last):
        if self.shard == 3:
            self.file.write(b"half a shard")  # the kill lands mid-write
            raise KeyboardInterrupt
        close(self, end, last)

    monkeypatch.setattr(tc.ShardWriter, "close", crash_after_three)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tc.tokenize_corpus([str(tmp_path / "corpus")], str(out), **kw)
    assert sorted(p.name for p in out.iterdir())[-1] == "shard-00003.bin.tmp"  # no final name for the half shard
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[0-2].*")}
    monkeypatch.setattr(tc.ShardWriter, "close", close)
    encode = tc.encode_unit
    monkeypatch.setattr(tc, "encode_unit", lambda unit: encoded.append(unit.index) or encode(unit))
    done = tc.tokenize_corpus([str(tmp_path / "corpus")], str(out), **kw)
    assert done["resumed_shards"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[0-2].*")} == before
    assert min(encoded) == finished_shards(out)[2].end_unit  # units before the resume point: not tokenized again
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "clean").iterdir()}
    again = tc.tokenize_corpus([str(tmp_path / "corpus")], str(out), **kw)  # finished: nothing to do
    assert again["resumed_shards"] == done["shards"]


def test_memory_stays_flat_for_a_corpus_much_larger_than_a_shard(tmp_path):
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 20}) + "\n"
    corpus = tmp_path / "big.jsonl"
    corpus.write_text(line * 12_000)  # ~10 MB
    tracemalloc.start()
    try:
        done = tc.tokenize_corpus([str(corpus)], str(tmp_path / "out"), shard_tokens=50_000, workers=0,
                                  unit_bytes=16_384, progress_every=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert done["tokens"] > 100 * 50_000 // 10 and done["shards"] > 150
    assert peak < 3 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {corpus.stat().st_size / 2**20:.0f} MiB corpus"


def train_bpe(tmp_path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path


def tiktoken_file(tmp_path: Path) -> str:
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"ow", b"own"]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return str(path)


@pytest.mark.parametrize("kind", ["tokenizer.json", "tiktoken"])
def test_subword_tokenizers_and_parquet(tmp_path, kind):
    pytest.importorskip("tokenizers" if kind == "tokenizer.json" else "tiktoken")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    texts = make_corpus(tmp_path / "corpus", docs=60)[:60]
    pq.write_table(pa.table({"content": texts}), tmp_path / "corpus" / "d.parquet", row_group_size=16)
    path = train_bpe(tmp_path) if kind == "tokenizer.json" else tiktoken_file(tmp_path)
    tok = load_tokenizer(path)
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        tc.tokenize_corpus([str(tmp_path / "corpus" / "d.parquet")], str(out), tokenizer=path, text_field="content",
                           shard_tokens=500, workers=workers, progress_every=0)
        outs.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert outs[0] == outs[1]
    ix = finished_shards(tmp_path / "out0")[0]
    assert ix.tokenizer == tok.fingerprint and ix.eos == tok.default_eos and ix.vocab_size == tok.vocab_size
    assert read_docs(tmp_path / "out0", tok) == texts


def test_tokenize_is_not_slower_than_a_plain_batch_encode_loop(tmp_path):
    """Ours (workers, writing shards) against `tokenizers`' encode_batch over the same jsonl, at a
    size CI affords: the same tokens, and not far off in speed. Ours pays about half a second to
    start its process, so the corpus is big enough that the start is not most of the time, and each
    side keeps its faster of two runs (the suite's other worker shares the two cores, and its load
    only slows a run down); benchmarks/tokenize_speed.py measures it at size."""
    pytest.importorskip("tokenizers")
    from benchmarks.tokenize_speed import compare
    path = train_bpe(tmp_path)
    result = compare(tmp_path, path, megabytes=8, workers=None, repeat=2)
    assert result["ours_tokens"] == result["baseline_tokens"]
    assert result["ours_tokens_per_s"] > 0.5 * result["baseline_tokens_per_s"], result


def run_cli(*args):
    return harness.run_cli("tokenize", *args)


def bad_parquet(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    return [tmp_path / "x.parquet", tmp_path / "o"]


BAD = {
    "empty folder": (lambda p: (p / "empty").mkdir() or [p / "empty", p / "o"], ["holds no", "folder"]),
    "no such input": (lambda p: [p / "nope.jsonl", p / "o"], ["does not exist"]),
    "jsonl line without the text field": (
        lambda p: (p / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n') and [p / "x.jsonl", p / "o"],
        ["line 2", "'text'", "--text-field", "body"]),
    "jsonl line that is not json": (lambda p: (p / "x.jsonl").write_text('{"text": "a"\n') and [p / "x.jsonl", p / "o"],
                                    ["line 1", "not JSON"]),
    "non-UTF-8 text": (lambda p: (p / "x.txt").write_bytes(b"caf\xe9\n") and [p / "x.txt", p / "o"],
                       ["not UTF-8", "iconv"]),
    "corrupt gzip": (lambda p: (p / "x.jsonl.gz").write_bytes(b"\x1f\x8bgarbage") and [p / "x.jsonl.gz", p / "o"],
                     ["gzip"]),
    "corrupt parquet": (bad_parquet, ["not a readable parquet file"]),
    "output folder's parent missing": (lambda p: (p / "x.txt").write_text("hi") and [p / "x.txt", p / "no" / "o"],
                                       ["does not exist", "mkdir -p"]),
    "output is a file": (lambda p: (p / "x.txt").write_text("hi") and [p / "x.txt", p / "x.txt"], ["is a file"]),
    "unknown suffix": (lambda p: (p / "x.csv").write_text("hi") and [p / "x.csv", p / "o"], ["not one of"]),
    "garbage tokenizer.json": (lambda p: (p / "t.json").write_text("{nope") and (p / "x.txt").write_text("hi")
                               and [p / "x.txt", p / "o", "--tokenizer", p / "t.json"], ["not a valid", "tokenizer.json"]),
    "missing tokenizer": (lambda p: (p / "x.txt").write_text("hi") and [p / "x.txt", p / "o", "--tokenizer",
                                                                          p / "t.json"], ["not \"byte\""]),
    "unknown eos": (lambda p: (p / "x.txt").write_text("hi") and [p / "x.txt", p / "o", "--eos", "<nope>"],
                    ["--eos", "not a token"]),
    "only inputs": (lambda p: [p], ["output folder"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    make, words = BAD[case]
    if "parquet" in case:
        pytest.importorskip("pyarrow")
    if "tokenizer.json" in case:
        pytest.importorskip("tokenizers")
    assert_one_line_error(run_cli(*make(tmp_path), "--workers", "0"), words)


def test_another_runs_folder_is_refused(tmp_path):
    make_corpus(tmp_path / "corpus", docs=20)
    assert run_cli(tmp_path / "corpus", tmp_path / "o", "--workers", "0").exit_code == 0
    result = run_cli(tmp_path / "corpus", tmp_path / "o", "--workers", "0", "--shard-tokens", "99")
    assert result.exit_code == 2 and "another tokenize run" in result.output


def test_single_token_file_form(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    result = run_cli(tmp_path / "t.txt", tmp_path / "t.bin", "--workers", "0")
    assert result.exit_code == 0 and "600 tokens" in result.output, result.output
    assert bytes(np.fromfile(tmp_path / "t.bin", dtype=np.uint16).astype(np.uint8)) == b"hello world " * 50


def test_single_token_file_form_survives_a_kill_while_moving_it(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    unlink = Path.unlink

    def killed(self, *args, **kwargs):
        monkeypatch.setattr(Path, "unlink", unlink)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", killed)  # the kill lands at the first file tokenize_to_file removes
    with pytest.raises(KeyboardInterrupt):
        tc.tokenize_to_file([str(tmp_path / "t.txt")], str(tmp_path / "t.bin"), workers=0)
    result = run_cli(tmp_path / "t.txt", tmp_path / "t.bin", "--workers", "0")  # the same command again
    assert result.exit_code == 0 and "600 tokens" in result.output, result.output
    assert bytes(np.fromfile(tmp_path / "t.bin", dtype=np.uint16).astype(np.uint8)) == b"hello world " * 50
    assert not (tmp_path / "t.bin.shards").exists()


@pytest.mark.parametrize("flag, value", [("--shard-tokens", "0"), ("--workers", "-1")])
def test_counts_out_of_range_are_one_line(tmp_path, flag, value):
    """--shard-tokens 0 once meant the default, silently; a negative --workers is refused the same way."""
    (tmp_path / "t.txt").write_text("hello world " * 50)
    assert_one_line_error(run_cli(tmp_path / "t.txt", tmp_path / "tokens", flag, value), [flag, "range"])
