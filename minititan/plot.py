"""`minititan plot metrics.jsonl`: an SVG chart of loss and throughput, no plotting library needed.

Each panel has axes with round-number ticks (1, 2 or 5 times a power of ten) and grid lines at
them; tick labels are short (21k, not 2.1e+04) and the left margin is wide enough for them. A
step whose value is missing or not finite (null in the file: a skipped step) leaves a gap in the line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from minititan.core.config import UserError

W, H = 760, 280  # one panel
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 45  # margins: tick labels on the left, axis label below


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; one line naming the problem for an empty or malformed file."""
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file: pass the metrics.jsonl a run writes in its job.dump_folder") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not JSON ({e.msg}): pass the metrics.jsonl a run writes, "
                            f"one JSON object a line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise UserError(f"{path} line {number} has no \"step\": pass the metrics.jsonl a run writes") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows: a run writes one every metrics.log_freq steps (with metrics.jsonl = "
                        f"true); plot it once a step has been logged")
    return rows


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values covering [lo, hi]: multiples of 1, 2 or 5 times a power of ten."""
    if hi <= lo:
        lo, hi = lo - (abs(lo) or 1) / 2, hi + (abs(hi) or 1) / 2
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [i * step for i in range(first, last + 1)]


def tick_labels(ticks: list[float]) -> list[str]:
    """Short labels: 210k, 2.15M (a suffix once the largest reaches 10,000), with as many decimals as
    the spacing of the ticks needs."""
    top = max(abs(t) for t in ticks)
    unit, suffix = next(((u, s) for u, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= 1e4 and top >= u),
                        (1.0, ""))
    spacing = (ticks[1] - ticks[0]) / unit if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(spacing)))
    return [f"{t / unit:.{decimals}f}{suffix}" if t else "0" for t in ticks]


def panel(rows: list[dict], key: str, title: str, color: str, top: float) -> str:
    """One chart of `key` against step, its top edge at y = top; "" when no row has the key."""
    pts = [(r["step"], r.get(key)) for r in rows]
    pts = [(x, y) for x, y in pts if isinstance(y, (int, float)) and math.isfinite(y)]
    if not pts:
        return ""
    xs, ys = zip(*pts)
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x_ticks = [t for t in x_ticks if t == int(t)] or x_ticks  # steps are whole numbers
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    left, right, upper, lower = LEFT, W - RIGHT, top + TOP, top + H - BOTTOM

    def px(x):
        return left + (x - x0) / ((x1 - x0) or 1) * (right - left)

    def py(y):
        return lower - (y - y0) / ((y1 - y0) or 1) * (lower - upper)

    out = [f'<text x="{left}" y="{upper - 12}" font-size="14" font-weight="bold">{title}</text>']
    for t, label in zip(y_ticks, tick_labels(y_ticks)):
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{right}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    for t, label in zip(x_ticks, tick_labels(x_ticks)):
        out.append(f'<line x1="{px(t):.1f}" y1="{upper}" x2="{px(t):.1f}" y2="{lower}" stroke="#e5e5e5"/>'
                   f'<text x="{px(t):.1f}" y="{lower + 16}" text-anchor="middle" font-size="11">{label}</text>')
    out.append(f'<rect x="{left}" y="{upper}" width="{right - left}" height="{lower - upper}" fill="none" '
               f'stroke="#888"/>')
    out.append(f'<text x="{(left + right) / 2}" y="{lower + 34}" text-anchor="middle" font-size="12">step</text>')
    for segment in _segments(rows, key):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
    return "<g>" + "".join(out) + "</g>"


def _segments(rows: list[dict], key: str) -> list[list[tuple[float, float]]]:
    """The runs of rows with a finite value: a missing or non-finite one breaks the line."""
    segments, current = [], []
    for r in rows:
        y = r.get(key)
        if isinstance(y, (int, float)) and math.isfinite(y):
            current.append((r["step"], y))
        elif current:
            segments.append(current)
            current = []
    return segments + ([current] if current else [])


def to_svg(rows: list[dict]) -> str:
    body = panel(rows, "loss", "loss", "#c0392b", 0) + panel(rows, "tokens_per_sec_per_device", "tokens/s per device",
                                                                   "#2471a3", H)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>{body}</svg>\n')
