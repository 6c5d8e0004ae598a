"""Training data: the sampling scheme, mixing, per-rank reads, the prefetch thread, bad input."""
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from minititan.core.config import ConfigError, Source, UserError, load_config
from minititan.core.data import TokenSource, rank_slice, token_source
from minititan.data import tokenize_corpus as tc
from minititan.data.loader import Prefetcher
from minititan.data.sampling import Sampler, document_layout, permute
from tests.harness import assert_one_line_error, assert_same_losses, run_cli, train_runs


def make_shards(folder: Path, docs: int = 300, seed: int = 0, shard_tokens: int = 4000, letter: str = "a") -> str:
    """A small jsonl corpus tokenized (byte) into shards; documents of 20-200 bytes of one letter
    family, so a test can tell sources apart by their bytes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = ord(letter)
    with open(folder / "c.jsonl", "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": "".join(chr(base + int(i)) for i in rng.integers(0, 5, rng.integers(20, 200)))})
                    + "\n")
    out = folder / "tokens"
    tc.tokenize_corpus([str(folder / "c.jsonl")], str(out), shard_tokens=shard_tokens, workers=0, unit_bytes=2048,
                       progress_every=0)
    return str(out)


def test_permute_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 5, 16, 17, 1000, 4097):
        for key in (0, 12345):
            assert sorted(permute(np.arange(n), n, key).tolist()) == list(range(n))
    assert permute(np.arange(1000), 1000, 1).tolist() != permute(np.arange(1000), 1000, 2).tolist()


def test_each_epoch_reads_every_chunk_once(tmp_path):
    data = TokenSource(make_shards(tmp_path), 256)
    seq, batch = 16, 8
    part = data.parts("train", seq)[0]
    sampler = data.sampler("train", seq, batch, seed=3)
    chunks = np.concatenate([sampler.rows(step)[1] for step in range(3 * part.count // batch + 1)])
    for e in range(3):
        epoch = chunks[e * part.count:(e + 1) * part.count]
        assert sorted(epoch.tolist()) == list(range(part.count))  # without replacement, all of them
    assert data.epochs(3, 10, batch, seq)[data.train_parts[0][0]] == pytest.approx(11 * batch / part.count)


def test_global_batch_is_a_pure_function_of_seed_and_step_and_ranks_read_their_rows_only(tmp_path):
    folder = make_shards(tmp_path)
    sources = [Source(folder, 2.0), Source("shakespeare", 1.0)]
    data = TokenSource("", 256, sources=sources, holdout=0.05)
    whole = data.read(0, 17, 8, 32, documents=True)
    again = TokenSource("", 256, sources=sources, holdout=0.05).read(0, 17, 8, 32, documents=True)  # fresh: a resume
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    assert torch.equal(whole.inputs[:, 1:], whole.labels[:, :-1])
    assert not torch.equal(whole.inputs, data.read(0, 18, 8, 32).inputs)
    for ranks in (2, 4, 8):
        reads = []
        for part in data.sampler("train", 32, 8, 0).parts:
            tokens = part.stream.tokens
            part.stream.tokens = lambda a, b, _t=tokens: reads.append((a, b)) or _t(a, b)
        rows = [data.read(0, 17, 8, 32, rows=rank_slice(r, ranks, 8), documents=True) for r in range(ranks)]
        for part in data.sampler("train", 32, 8, 0).parts:
            del part.stream.tokens
        assert len(reads) == 8  # each rank read its rows' tokens, nobody read the global batch
        for i, field in enumerate(whole):
            assert torch.equal(torch.cat([r[i] for r in rows]), field)


def test_mixing_proportions_hold_within_statistical_tolerance(tmp_path):
    a, b = make_shards(tmp_path / "a", letter="a"), make_shards(tmp_path / "b", letter="p")
    data = TokenSource("", 256, sources=[Source(a, 0.75), Source(b, 0.25), Source(a, 0.0)])
    batch, steps = 16, 400
    sampler = data.sampler("train", 16, batch, 0)
    counts = np.zeros(3)
    for step in range(1, steps + 1):
        counts += np.bincount(sampler.rows(step)[0], minlength=3)
    n = batch * steps
    for share, weight in zip(counts / n, (0.75, 0.25, 0.0)):
        assert abs(share - weight) < 4 * (weight * (1 - weight) / n) ** 0.5 + 1e-12  # 4 sigma of the multinomial
    x = data.read(0, 5, batch, 16).inputs  # rows really come from their source (by their letters)
    part = sampler.rows(5)[0]
    assert all((x[part == 1] >= ord("p")).all(dim=1)) and all((x[part == 0] < ord("p")).all(dim=1))
    # a resumed sampler (no blocks summed yet) agrees with one that walked there
    assert np.array_equal(Sampler(sampler.parts, 16, batch, 0, 0).rows(3000)[1], sampler.rows(3000)[1])


def test_holdout_is_never_trained_on(tmp_path):
    data = TokenSource(make_shards(tmp_path), 256, holdout=0.2)
    train, val = data.parts("train", 16)[0], data.parts("val", 16)[0]
    assert val.first == train.count and val.count == int((train.count + val.count) * 0.2)
    sampler = data.sampler("train", 16, 8, 0)
    seen = np.concatenate([sampler.rows(s)[1] for s in range(200)])
    assert seen.max() < train.count
    assert (data.sampler("val", 16, 8, 0).rows(1)[1] >= train.count).all()


def test_document_layout_restarts_positions():
    docs, pos = document_layout(np.array([0, 5, 9, 30]), start=3, length=10)
    assert docs.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert pos.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 2, 3]


def test_shard_documents_reach_the_batch(tmp_path):
    data = TokenSource(make_shards(tmp_path), 256)
    b = data.read(0, 1, 4, 64, documents=True)
    eos = b.inputs == 0  # the byte tokenizer's end of document
    # a new document starts right after each EOS, and only there
    starts = torch.zeros_like(eos)
    starts[:, 1:] = eos[:, :-1]
    assert torch.equal(b.documents[:, 1:] != b.documents[:, :-1], starts[:, 1:])
    assert torch.equal(b.positions == 0, starts | (torch.arange(64) == 0))


def test_prefetcher_hands_out_batches_in_order_and_raises_in_the_loop():
    def read(step):
        if step == 4:
            raise UserError("bad token")
        return (torch.full((2,), step),)

    p = Prefetcher(read, 1, 10, depth=2, pin=False)
    assert [int(p.get(s)[0][0]) for s in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(UserError, match="bad token"):
        p.get(4)
    p.close()


def test_training_on_a_mix_matches_across_data_parallel_ranks(tmp_path):
    folder = make_shards(tmp_path / "corpus")
    sources = f'data.sources=[{{path="{folder}", weight=3}}, {{path="shakespeare", weight=1}}]'
    runs = train_runs(tmp_path / "one", 1, {"one": [sources, "data.prefetch=0"]})
    runs |= train_runs(tmp_path / "dp", 2, {"dp": [sources, "parallelism.dp_replicate=2"]})
    assert_same_losses(runs["dp"][0], runs["one"][0])


def bad_folder(tmp_path, damage) -> str:
    folder = make_shards(tmp_path / "c")
    damage(Path(folder))
    return folder


def truncate_bin(folder: Path):
    b = folder / "shard-00001.bin"
    b.write_bytes(b.read_bytes()[:-2])


def index_says(folder: Path, **changes):
    for p in folder.glob("shard-*.json"):
        p.write_bytes(msgspec.json.encode(json.loads(p.read_bytes()) | changes))


def put(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


BAD = {
    "empty folder": (lambda p: (p / "e").mkdir() or [f"data.dataset={p / 'e'}"], ["no shards", "minititan tokenize"]),
    "shard index does not match its .bin": (lambda p: [f"data.dataset={bad_folder(p, truncate_bin)}"],
                                            ["shard-00001.bin", "index says", "re-run"]),
    "token id >= vocab size": (lambda p: [f"data.dataset={make_shards(p / 'c')}", "model.vocab_size=100"],
                               ["token id", "model.vocab_size"]),
    "tokenizer mismatch": (lambda p: [f"data.dataset={bad_folder(p, lambda f: index_says(f, tokenizer='hf:9:x'))}"],
                           ["data.tokenizer", "tokenized with"]),
    "negative weight": (lambda p: ['data.sources=[{path="shakespeare", weight=-1}]'], ["weights", ">= 0"]),
    "all weights zero": (lambda p: ['data.sources=[{path="shakespeare", weight=0}]'], ["not all zero"]),
    "empty token file": (lambda p: put(p / "t.bin", b"") or [f"data.dataset={p / 't.bin'}"], ["empty"]),
    "odd-sized token file": (lambda p: put(p / "t.bin", b"abc") or [f"data.dataset={p / 't.bin'}"],
                             ["3 bytes", "whole number"]),
    "garbage .npy": (lambda p: put(p / "t.npy", b"oops") or [f"data.dataset={p / 't.npy'}"],
                     ["not a readable .npy", "numpy.save"]),
    "float .npy": (lambda p: np.save(p / "t.npy", np.ones(999)) or [f"data.dataset={p / 't.npy'}"],
                   ["float64", "1-D integer"]),
    "negative ids in a .npy": (lambda p: np.save(p / "t.npy", -np.ones(999, np.int32)) or
                               [f"data.dataset={p / 't.npy'}"], ["negative token ids"]),
    "text given as data.dataset": (lambda p: put(p / "t.txt", "hi") or [f"data.dataset={p / 't.txt'}"],
                                   ["tokenize it first", "minititan tokenize"]),
    "missing tokenizer": (lambda p: [f"data.tokenizer={p / 'tokenizer.json'}"], ["not \"byte\"", "tokenizer.json"]),
    "garbage tokenizer": (lambda p: put(p / "tokenizer.json", "{oops") or [f"data.tokenizer={p / 'tokenizer.json'}"],
                          ["tokenizer.json"]),
    "interrupted tokenize": (lambda p: [f"data.dataset={bad_folder(p, lambda f: index_says(f, last=False))}"],
                             ["unfinished", "again"]),
    "holdout fraction 1": (lambda p: ["data.holdout_fraction=1.0"], ["[0, 1)"]),
    "nothing held out for validation": (lambda p: [f"data.dataset={make_shards(p / 'c')}", "validation.enable=true"],
                                        ["holdout_fraction"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_input_is_one_line_and_exit_2(tmp_path, case):
    make, words = BAD[case]
    if case == "garbage tokenizer":
        pytest.importorskip("tokenizers")
    overrides = make(tmp_path) + ["training.steps=1", "checkpoint.enable=false", "training.device=cpu",
                                  f"job.dump_folder={tmp_path / 'run'}", "model.max_seq_len=256"]
    assert_one_line_error(run_cli("train", *[f"--{o}" for o in overrides]), words)


def test_following_the_advice_works(tmp_path):
    """The text-as-dataset error says `minititan tokenize X tokens/`; doing it makes data.dataset work."""
    (tmp_path / "t.txt").write_text("to be or not to be\n" * 400)
    assert run_cli("tokenize", tmp_path / "t.txt", tmp_path / "tokens", "--workers", "0").exit_code == 0
    cfg = load_config(None, [f"data.dataset={tmp_path / 'tokens'}", "training.seq_len=32"])
    assert token_source(cfg).read(0, 1, 4, 32).inputs.shape == (4, 32)
    with pytest.raises(ConfigError):
        load_config(None, ['data.sources=[{path="a", weight=nan}]'])
