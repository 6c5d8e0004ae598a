"""What is alive at the peak of a CUDA memory snapshot, grouped by where it was allocated.

    minititan train ... --profiling.memory_snapshot=true      # writes memory_snapshot_rank0.pickle
    python benchmarks/memory_peak.py outputs/profiling/memory_snapshot_rank0.pickle [--top 25]

The snapshot (torch.cuda.memory._dump_snapshot) holds the blocks alive when it was written and the
allocator's recent events. Walking the events backwards from that state rebuilds the live set at
every moment; the moment with the most live bytes is the peak. Its blocks are grouped by the first
stack frame in minititan or in inductor's generated code (the line that asked for the memory), and
the largest single blocks are listed with their stacks.
"""
from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

GiB = 2**30


def where(frames: list[dict], depth: int = 1) -> str:
    """The first `depth` frames that belong to the program (minititan, inductor's output), innermost first."""
    mine = [f for f in frames if "minititan" in f["filename"] or "torchinductor" in f["filename"]
            or "benchmarks" in f["filename"]]
    picked = (mine or frames)[:depth]
    return " <- ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in picked) or "?"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, dict[int, dict], int]:
    """(peak live bytes, {addr: block} at the peak, live bytes at the snapshot's end)."""
    live = {}
    for seg in snapshot["segments"]:
        if seg.get("device", 0) != device:
            continue
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                live[addr] = {"size": block["size"], "frames": block.get("frames", [])}
            addr += block["size"]
    total = end = sum(b["size"] for b in live.values())
    peak, peak_live = total, dict(live)
    for event in reversed(snapshot["device_traces"][device]):
        action = event["action"]
        if action == "alloc" and event["addr"] in live:  # before it was allocated, it was not alive
            total -= live.pop(event["addr"])["size"]
        elif action == "free_completed":  # before it was freed, it was alive
            live[event["addr"]] = {"size": event["size"], "frames": event.get("frames", [])}
            total += event["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
    return peak, peak_live, end


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.snapshot, "rb") as f:
        snap = pickle.load(f)
    peak, blocks, end = live_at_peak(snap)
    reserved = sum(s["total_size"] for s in snap["segments"])
    print(f"peak live {peak / GiB:.2f} GiB (at the end {end / GiB:.2f}; segments reserved {reserved / GiB:.2f}); "
          f"{len(snap['device_traces'][0])} events in the trace")
    groups = defaultdict(lambda: [0, 0])
    for b in blocks.values():
        g = groups[where(b["frames"])]
        g[0] += b["size"]
        g[1] += 1
    print(f"\n{'GiB':>7} {'blocks':>6}  allocated at")
    for name, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{size / GiB:7.2f} {n:6d}  {name}")
    print("\nlargest blocks:")
    for b in sorted(blocks.values(), key=lambda b: -b["size"])[:12]:
        print(f"{b['size'] / GiB:7.2f}  {where(b['frames'], depth=4)}")


if __name__ == "__main__":
    main()
