"""What the checkpoint's CRC-32s cost, next to the write and the read they guard, on the Llama 3.1 8B shapes.

    python benchmarks/checkpoint_checksum.py OUT_DIR [--device cuda] [--layers 4] [--repeats 2] [--config C]

One rank's file as an 8-way pipeline job saves it: the fp32 weights and both AdamW moments of
`--layers` of the 8B model's 32 blocks (4 layers: 0.87 B parameters, 10.5 GB), made on the device.
For each repeat it saves them the way the trainer does (copy to the host, CRC-32 of every chunk on
a thread pool while safetensors writes the file, fsync) and again with the checksums stubbed out,
then reads every tensor back from a cold page cache (posix_fadvise drops the file's pages) with
and without verifying them, and times the CRC-32s alone over the host copies. Prints a markdown
table (medians) and writes it to OUT_DIR/checkpoint_checksum.md. Needs about 3x the file size in
host memory and once the file size on disk. (--config configs/debug.toml: a quick run on the CPU.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "llama3_8b.toml"


def rank_tensors(config: str, layers: int, device: torch.device) -> dict[str, torch.Tensor]:
    shapes = model.param_shapes(load_config(config).model)
    mine = {n: s for n, s in shapes.items() if n.startswith(tuple(f"layers.{i}." for i in range(layers)))}
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for prefix in ("", "optim.exp_avg.", "optim.exp_avg_sq."):
        out |= {prefix + n: torch.randn(s, generator=gen, device=device) for n, s in mine.items()}
    return out


def drop_page_cache(folder: Path) -> None:
    """Evict the files' pages (clean after the fsync of the save), so the next read comes from the disk."""
    os.sync()
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def save(out: Path, tensors: dict, checksums: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    real = ckpt.crc32
    if not checksums:
        ckpt.crc32 = lambda t: 0
    try:
        if tensors and next(iter(tensors.values())).is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        ckpt.save(out, 1, {n: (t, ckpt.full_slice(t.shape)) for n, t in tensors.items()})
        return time.perf_counter() - start
    finally:
        ckpt.crc32 = real


def read(path: Path, verify: bool) -> float:
    drop_page_cache(path)
    start = time.perf_counter()
    c = ckpt.Checkpoint(path)
    if not verify:
        for entry in c.manifest.tensors.values():
            for chunk in entry.chunks:
                chunk.crc32 = None
    for name in c.names():
        c.read(name)
    c.verify()
    return time.perf_counter() - start


def crc_alone(tensors: dict) -> float:
    host = {n: t.cpu() for n, t in tensors.items()}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # as many threads as the save's
        start = time.perf_counter()
        list(pool.map(ckpt.crc32, host.values()))
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default=str(CONFIG), help="the model whose shapes to save (default: Llama 3.1 8B)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tensors = rank_tensors(args.config, args.layers, torch.device(args.device))
    gb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    times = {k: [] for k in ("save", "save_no_crc", "read_verify", "read_no_verify", "crc_alone")}
    path = args.out / "ckpt" / "step-00000001"
    for i in range(args.repeats):  # each pair in alternating order: the first save of a pair also deletes the last read's files
        for crc in (False, True) if i % 2 == 0 else (True, False):
            times["save" if crc else "save_no_crc"].append(save(args.out / "ckpt", tensors, checksums=crc))
        if not crc:  # the reads verify: they need the files of a save with checksums
            save(args.out / "ckpt", tensors, checksums=True)
        for verify in (False, True) if i % 2 == 0 else (True, False):
            times["read_verify" if verify else "read_no_verify"].append(read(path, verify=verify))
        times["crc_alone"].append(crc_alone(tensors))
    shutil.rmtree(args.out / "ckpt", ignore_errors=True)
    m = {k: statistics.median(v) for k, v in times.items()}
    table = (f"{Path(args.config).stem} shapes, {args.layers} layers x (weights + 2 AdamW moments) = {gb:.1f} GB, device "
             f"{args.device}, {min(8, os.cpu_count() or 1)} checksum threads, median of {args.repeats}\n\n"
             "| | seconds | GB/s |\n|---|---|---|\n"
             f"| save, no checksums (copy to host + write + fsync) | {m['save_no_crc']:.2f} | {gb / m['save_no_crc']:.2f} |\n"
             f"| save with CRC-32s (computed while the file is written) | {m['save']:.2f} | {gb / m['save']:.2f} |\n"
             f"| read from a cold cache, not verified | {m['read_no_verify']:.2f} | {gb / m['read_no_verify']:.2f} |\n"
             f"| read from a cold cache, every chunk verified | {m['read_verify']:.2f} | {gb / m['read_verify']:.2f} |\n"
             f"| CRC-32s alone over the host copies | {m['crc_alone']:.2f} | {gb / m['crc_alone']:.2f} |\n\n"
             f"checksum cost: save +{100 * (m['save'] / m['save_no_crc'] - 1):.1f}%, "
             f"read +{100 * (m['read_verify'] / m['read_no_verify'] - 1):.1f}%\n")
    print(table)
    (args.out / "checkpoint_checksum.md").write_text(table)


if __name__ == "__main__":
    main()
