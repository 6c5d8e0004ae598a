"""The expert-load heat-map `minititan plot` adds for a mixture of experts: one row per MoE layer, one
column per logged step (neighbouring steps averaged when there are more than fit), two panels:

  busiest expert / mean load    1 = perfectly balanced (white), darker red = one expert takes more
  idlest expert / mean load     1 = balanced (white), darker blue = an expert starves (0: no token)

from the `moe/max_load_over_mean_by_layer` and `moe/min_load_over_mean_by_layer` tables the trainer
writes to metrics.jsonl. Plain SVG, no plotting library.
"""
from __future__ import annotations

import math
from pathlib import Path

BUSIEST, IDLEST = "moe/max_load_over_mean_by_layer", "moe/min_load_over_mean_by_layer"
LEFT, TOP, PLOT_W, LEGEND_W = 80, 40, 600, 90
MAX_COLUMNS = 300


def write_load_heatmap(rows: list[dict], chart_path: str) -> str | None:
    """Write <chart>_moe_load.svg beside the chart when the rows hold MoE load tables; its path, or None."""
    svg = load_heatmap_svg(rows)
    if svg is None:
        return None
    path = Path(chart_path)
    out = path.with_name(path.stem + "_moe_load.svg")
    out.write_text(svg)
    return str(out)


def load_heatmap_svg(rows: list[dict]) -> str | None:
    rows = [r for r in rows if isinstance(r.get(BUSIEST), dict) and isinstance(r.get(IDLEST), dict)]
    if not rows:
        return None
    layers = sorted(rows[-1][BUSIEST], key=int)
    steps, busiest, idlest = _binned(rows, layers)
    cell_h = max(3.0, min(16.0, 320 / len(layers)))
    panel_h = cell_h * len(layers)
    worst = max(2.0, max(max(col) for col in busiest))
    panels = [(f"busiest expert / mean load (1 = balanced; up to {worst:.3g})", busiest, _red,
               lambda v: math.log(max(v, 1.0)) / math.log(worst), ("1", f"{worst:.3g}")),
              ("idlest expert / mean load (1 = balanced, 0 = an expert got no token)", idlest, _blue,
               lambda v: 1 - v, ("1", "0"))]
    body, top = [], TOP
    for title, columns, palette, shade, labels in panels:
        body.append(_panel(title, columns, lambda v: palette(shade(v)), palette, layers, steps, top, cell_h, labels))
        top += panel_h + 70
    width, height = LEFT + PLOT_W + LEGEND_W, top
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n')


def _binned(rows: list[dict], layers: list[str]) -> tuple[list[tuple[int, int]], list[list[float]], list[list[float]]]:
    """Columns of at most MAX_COLUMNS: each the mean of consecutive rows, with its (first, last) step."""
    per_bin = math.ceil(len(rows) / MAX_COLUMNS)
    steps, busiest, idlest = [], [], []
    for start in range(0, len(rows), per_bin):
        chunk = rows[start:start + per_bin]
        steps.append((chunk[0]["step"], chunk[-1]["step"]))
        for out, key in ((busiest, BUSIEST), (idlest, IDLEST)):
            out.append([sum(r[key].get(layer, 1.0) for r in chunk) / len(chunk) for layer in layers])
    return steps, busiest, idlest


def _panel(title, columns, color, palette, layers, steps, top, cell_h, labels) -> str:
    """One heat-map: color(value) per cell, a scale of palette(0 = balanced .. 1) beside it."""
    cell_w = PLOT_W / len(columns)
    parts = [f'<text x="{LEFT}" y="{top - 10}" font-size="13" font-weight="bold">{title}</text>']
    for c, (column, (first, last)) in enumerate(zip(columns, steps)):
        for r, value in enumerate(column):
            step = f"step {first}" if first == last else f"steps {first}-{last}"
            parts.append(f'<rect x="{LEFT + c * cell_w:.2f}" y="{top + r * cell_h:.2f}" width="{cell_w + 0.05:.2f}" '
                         f'height="{cell_h + 0.05:.2f}" fill="{color(value)}"><title>layer {layers[r]}, {step}: '
                         f'{value:.3f}</title></rect>')
    label_every = math.ceil(11 / cell_h)  # layer labels at least 11 px apart
    for r in range(0, len(layers), label_every):
        parts.append(f'<text x="{LEFT - 6}" y="{top + (r + 0.5) * cell_h + 4:.1f}" font-size="10" '
                     f'text-anchor="end">layer {layers[r]}</text>')
    bottom = top + cell_h * len(layers)
    parts.append(f'<rect x="{LEFT}" y="{top}" width="{PLOT_W}" height="{bottom - top:.2f}" fill="none" stroke="#999"/>'
                 f'<text x="{LEFT}" y="{bottom + 14:.1f}" font-size="11">step {steps[0][0]}</text>'
                 f'<text x="{LEFT + PLOT_W}" y="{bottom + 14:.1f}" font-size="11" text-anchor="end">'
                 f'step {steps[-1][1]}</text>')
    x, band = LEFT + PLOT_W + 20, (bottom - top) / 20
    for i in range(20):
        parts.append(f'<rect x="{x}" y="{top + i * band:.2f}" width="14" height="{band + 0.05:.2f}" '
                     f'fill="{palette(i / 19)}"/>')
    parts.append(f'<text x="{x + 18}" y="{top + 9}" font-size="10">{labels[0]}</text>'
                 f'<text x="{x + 18}" y="{bottom:.1f}" font-size="10">{labels[1]}</text>')
    return "<g>" + "".join(parts) + "</g>"


def _red(t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    return f"rgb(255,{round(255 * (1 - 0.85 * t))},{round(255 * (1 - 0.9 * t))})"


def _blue(t: float) -> str:
    t = min(max(t, 0.0), 1.0)
    return f"rgb({round(255 * (1 - 0.9 * t))},{round(255 * (1 - 0.75 * t))},255)"
