"""Tokenizers: text -> token ids, and the end-of-document token written between documents.

    tok = load_tokenizer("byte")                   # built in: UTF-8 bytes, vocab 256
    tok = load_tokenizer("path/tokenizer.json")    # Hugging Face (optional package `tokenizers`)
    tok = load_tokenizer("path/tokenizer.model")   # tiktoken-style BPE ranks (optional package `tiktoken`)
    ids = tok.encode_batch(["some text", "more"])  # id sequences (lists or arrays), no BOS/EOS: tokenize adds them

Every tokenizer has a `fingerprint`: its kind, vocabulary size and a hash of its file. Shards record
it, and training refuses shards whose fingerprint differs from data.tokenizer's, so ids are never
read with another vocabulary than the one that wrote them.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np

from minititan.core.config import UserError

# Llama 3's 256 special tokens follow its 128,000 BPE ranks (tiktoken format, tokenizer.model).
LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                   + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)])
# Llama 3's pre-tokenizer split (how tiktoken cuts text into words before merging)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# the names end-of-text goes by in common tokenizer.json files, tried in this order
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes are the tokens: vocab 256, nothing to download, exact round trip. Its end of
    document is byte 0 (NUL), which text does not contain."""
    vocab_size = 256
    fingerprint = "byte"
    default_eos = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]  # no list of Python ints

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return int(token) if token.isdigit() and int(token) < 256 else None


class HFTokenizer:
    """A Hugging Face tokenizer.json through the optional `tokenizers` package."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("a tokenizer.json needs the optional package `tokenizers`: pip install tokenizers "
                            "(or use the tokenizer \"byte\")") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise UserError(f"{path} is not a valid Hugging Face tokenizer.json ({first_line(e)}): pass the "
                            f"tokenizer.json of a model, or use the tokenizer \"byte\"") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size()
        self.fingerprint = f"hf:{self.vocab_size}:{file_hash(path)}"
        self.default_eos = next((i for i in map(self._tok.token_to_id, EOS_NAMES) if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        return int(token) if token.isdigit() else self._tok.token_to_id(token)

    def __reduce__(self):  # worker processes rebuild it from its file
        return HFTokenizer, (self.path,)


class TiktokenTokenizer:
    """A tiktoken-style BPE file (one `base64(token) rank` per line, as Llama 3's tokenizer.model)
    through the optional `tiktoken` package, with Llama 3's special tokens after the ranks."""

    def __init__(self, path: str):
        try:
            import tiktoken
        except ImportError:
            raise UserError(f"{path} is read as a tiktoken BPE file, which needs the optional package `tiktoken`: "
                            f"pip install tiktoken (or pass a tokenizer.json, or \"byte\")") from None
        try:
            ranks = {}
            for line in Path(path).read_bytes().splitlines():
                if line.strip():
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
            specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIALS)}
            self._enc = tiktoken.Encoding(Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)
        except Exception as e:
            raise UserError(f"{path} is not a tiktoken BPE file (lines of `base64-token rank`: {first_line(e)}): "
                            f"pass a tokenizer.model of that format, a tokenizer.json, or \"byte\"") from None
        self.path, self._specials = path, specials
        self.vocab_size = self._enc.n_vocab
        self.fingerprint = f"tiktoken:{self.vocab_size}:{file_hash(path)}"
        self.default_eos = specials["<|end_of_text|>"]

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)  # parallelism is the workers'

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int | None:
        return int(token) if token.isdigit() else self._specials.get(token)

    def __reduce__(self):
        return TiktokenTokenizer, (self.path,)


def load_tokenizer(name: str, key: str = "data.tokenizer"):
    """"byte", a tokenizer.json, or a tiktoken BPE file. key: the config key or flag that named it."""
    if name == "byte":
        return ByteTokenizer()
    if not Path(name).is_file():
        raise UserError(f"{key} = {name!r} is not \"byte\" nor an existing tokenizer file: pass the path of a "
                        f"tokenizer.json (or a tiktoken tokenizer.model), or \"byte\"")
    return HFTokenizer(name) if name.endswith(".json") else TiktokenTokenizer(name)


def file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
