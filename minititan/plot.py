"""`minititan plot metrics.jsonl`: an SVG chart of loss and throughput, no plotting library needed."""
from __future__ import annotations

import json
from pathlib import Path

W, H, PAD = 720, 260, 50


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _polyline(xs, ys, x0, y0, w, h, color) -> str:
    lo, hi = min(ys), max(ys)
    span_x = (max(xs) - min(xs)) or 1
    span_y = (hi - lo) or 1
    pts = " ".join(f"{x0 + (x - min(xs)) / span_x * w:.1f},{y0 + h - (y - lo) / span_y * h:.1f}" for x, y in zip(xs, ys))
    return (f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'
            f'<text x="{x0 - 5}" y="{y0 + 4}" text-anchor="end" font-size="11">{hi:.3g}</text>'
            f'<text x="{x0 - 5}" y="{y0 + h + 4}" text-anchor="end" font-size="11">{lo:.3g}</text>')


def panel(rows, key, title, color, top) -> str:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if not pts:
        return ""
    xs, ys = zip(*pts)
    w, h = W - 2 * PAD, H - 2 * PAD
    return (f'<g><text x="{PAD}" y="{top + PAD - 12}" font-size="14" font-weight="bold">{title}</text>'
            f'<rect x="{PAD}" y="{top + PAD}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>'
            + _polyline(xs, ys, PAD, top + PAD, w, h, color)
            + f'<text x="{PAD}" y="{top + H - PAD + 16}" font-size="11">step {min(xs)}</text>'
            f'<text x="{W - PAD}" y="{top + H - PAD + 16}" font-size="11" text-anchor="end">step {max(xs)}</text></g>')


def to_svg(rows: list[dict]) -> str:
    body = panel(rows, "loss", "loss", "#c0392b", 0) + panel(rows, "tokens_per_sec_per_device", "tokens/s per device",
                                                                   "#2471a3", H)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>{body}</svg>\n')
