"""Reading a corpus as a stream of work units: files, folders and globs of .txt, .jsonl(.gz), .parquet.

    files = expand_inputs(["data/", "extra/*.jsonl.gz"])      # sorted, one list, checked
    for unit in read_units(files, text_field="text"): ...     # ~UNIT_BYTES of text each, in order
    docs = unit_documents(unit, "text")                       # (in a worker) [(text, starts, ends)]

The main process only cuts files into units of about UNIT_BYTES (whole lines of jsonl, line-aligned
pieces of text, one parquet row group each); the workers decode and parse them. The cut depends
only on the files, never on the number of workers, so the token stream is the same for any count.

A .jsonl line is a document (its `text_field`); a parquet row is a document (the column of that
name); a .txt file is one document, cut at line breaks into several units when large (a unit
that continues a document does not start a new one).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterator

import msgspec

from minititan.core.config import UserError
from minititan.data.tokenizer import first_line

UNIT_BYTES = 1 << 20  # text per work unit: big enough to amortise a worker round trip
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


@dataclasses.dataclass
class Unit:
    index: int  # position in the stream (resume skips units before the first unfinished shard)
    file: int  # index into the file list
    kind: str  # "text" | "jsonl" | "parquet"
    payload: bytes | int  # raw bytes, or the parquet row group
    first_line: int = 1  # jsonl: line number of the payload's first line, for errors
    starts_doc: bool = True  # text: this piece begins its file's document
    ends_doc: bool = True  # text: this piece ends it
    input_bytes: int = 0  # bytes of the input file this unit accounts for (progress)


def kind_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    return None


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, folders (every readable file below them) and globs -> a sorted list of files."""
    files: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                raise UserError(f"{item!r} matches no file: check the pattern (quote it so the shell leaves it)")
            files += [m for m in matched if os.path.isfile(m)]
        elif os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and kind_of(str(p)))
            if not found:
                raise UserError(f"folder {item} holds no {', '.join(SUFFIXES)} file: point at the folder of "
                                f"the corpus")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise UserError(f"input {item!r} does not exist: pass files, folders or globs of "
                            f"{', '.join(SUFFIXES)}")
    for f in files:
        if kind_of(f) is None:
            raise UserError(f"{f} is not one of {', '.join(SUFFIXES)}: rename it or leave it out")
    return list(dict.fromkeys(files))  # a file named twice is read once


def read_units(files: list[str], text_field: str, unit_bytes: int = UNIT_BYTES) -> Iterator[Unit]:
    index = 0
    for file_index, path in enumerate(files):
        for unit in file_units(path, kind_of(path), text_field, unit_bytes):
            unit.index, unit.file = index, file_index
            index += 1
            yield unit


def file_units(path: str, kind: str, text_field: str, unit_bytes: int) -> Iterator[Unit]:
    if kind == "parquet":
        groups = parquet_file(path).metadata.num_row_groups
        for group in range(groups):
            yield Unit(0, 0, "parquet", group, input_bytes=os.path.getsize(path) // max(groups, 1))
        return
    with open(path, "rb") as raw:
        f = gzip.open(raw) if path.endswith(".gz") else raw
        pending, line, first, consumed = b"", 1, True, 0
        block = read_block(f, path, unit_bytes)
        while block:
            next_block = read_block(f, path, unit_bytes)  # read ahead: the last unit of a text ends its document
            data, last = pending + block, not next_block
            cut = len(data) if last else cut_point(data, kind, unit_bytes)
            pending, block = data[cut:], next_block
            if cut == 0:  # no place to cut yet: read on
                continue
            done = raw.tell()
            yield Unit(0, 0, kind, data[:cut], first_line=line, starts_doc=first, ends_doc=last,
                       input_bytes=done - consumed)
            consumed, line, first = done, line + data[:cut].count(b"\n"), False


def read_block(f, path: str, size: int) -> bytes:
    try:
        return f.read(size)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is not a readable gzip file ({first_line(e)}): re-create or remove it") from None


def cut_point(data: bytes, kind: str, unit_bytes: int) -> int:
    """Where to end a unit: after the last complete line (jsonl); for text, after the last run of
    line breaks that is followed by a non-space (a place no tokenizer merges across). 0: not yet."""
    if kind == "jsonl":
        return data.rfind(b"\n") + 1
    end = len(data) - 1
    while True:
        nl = data.rfind(b"\n", 0, end)
        if nl < 0:
            break
        if data[nl + 1:nl + 2] not in (b"\n", b"\r", b" ", b"\t", b""):
            return nl + 1
        end = nl
    if len(data) < 8 * unit_bytes:
        return 0
    cut = len(data) - 1  # no line break in 8 units: cut anywhere between two UTF-8 characters
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # not inside one (continuation bytes are 10xxxxxx)
        cut -= 1
    return cut


def parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs the optional package `pyarrow`: pip install pyarrow") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({first_line(e)}): re-download or remove it") from None


def unit_documents(unit: Unit, path: str, text_field: str) -> list[tuple[str, bool, bool]]:
    """The unit's documents as (text, starts a document, ends it). Runs in a worker."""
    if unit.kind == "parquet":
        try:
            table = parquet_file(path).read_row_group(unit.payload, columns=[text_field])
        except UserError:
            raise
        except KeyError:
            raise UserError(f"{path} has no column {text_field!r}: pass --text-field with the column that "
                            f"holds the text") from None
        except Exception as e:
            msg = first_line(e)
            if "No match for FieldRef" in msg or text_field in msg:
                raise UserError(f"{path} has no column {text_field!r}: pass --text-field with the column that "
                                f"holds the text") from None
            raise UserError(f"{path} is not a readable parquet file ({msg}): re-download or remove it") from None
        return [(t, True, True) for t in table.column(0).to_pylist() if t]
    if unit.kind == "text":
        return [(decode_utf8(unit.payload, path, unit.first_line), unit.starts_doc, unit.ends_doc)]
    docs, fast = [], document_decoder(text_field)
    for n, line in enumerate(unit.payload.splitlines(), start=unit.first_line):
        if not line.strip():
            continue
        try:  # msgspec reads only the text field; anything it refuses takes the checked path below
            text = fast.decode(line).text
        except (msgspec.DecodeError, msgspec.ValidationError):
            text = checked_text(line, path, n, text_field)
        if text:
            docs.append((text, True, True))
    return docs


@functools.lru_cache
def document_decoder(text_field: str) -> msgspec.json.Decoder:
    """A JSON object's string field `text_field`, the other fields skipped unparsed."""
    return msgspec.json.Decoder(msgspec.defstruct("Document", [("text", str)], rename={"text": text_field}))


def checked_text(line: bytes, path: str, n: int, text_field: str) -> str:
    """The line's text by the standard library, or the one-line error that says what is wrong."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        decode_utf8(line, path, n)
        raise
    except ValueError as e:
        raise UserError(f"{path} line {n} is not JSON ({first_line(e)}): fix or remove that line") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path} line {n} has no string field {text_field!r} (it has: {fields}): pass "
                        f"--text-field with the field that holds the text")
    return text


def decode_utf8(data: bytes, path: str, line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad_line = line + data[:e.start].count(b"\n")
        raise UserError(f"{path} line {bad_line} is not UTF-8 (byte {data[e.start]:#04x}): convert the file, "
                        f"e.g. iconv -f latin1 -t utf-8 IN > OUT, then tokenize that") from None
