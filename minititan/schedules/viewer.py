"""Draw a simulated schedule: ranks down, time across.

    print(render_text(simulate_schedule("1f1b", pp=4, microbatches=8)))

    rank 0 |F0 F1 F2 F3 .  .  .  B0    F4 B1    F5 B2    ...

A cell is one time unit (a forward); a label is the kind and the microbatch; '.' is idle.
When ranks hold two chunks, chunk 1 is in lowercase (f3 = forward of microbatch 3 on a
rank's second chunk); with more, the chunk follows a dot (F3.2).
`render_svg` draws the same as a standalone SVG document, one colored box per action.
`main` is what `minititan schedule` runs.
"""
from __future__ import annotations

from .schedule import COSTS
from .simulate import Timeline, simulate_schedule, textbook_bubble

COLORS = {"F": "#4c78a8", "B": "#54a24b", "I": "#f58518", "W": "#b279a2"}  # chunk 0; later chunks lighter
ANSI = {"F": "34", "B": "32", "I": "33", "W": "35"}


def label(action, pp_size: int, n_chunks: int) -> str:
    chunk = action.stage // pp_size
    if n_chunks == 2 and chunk == 1:
        return f"{action.kind.lower()}{action.microbatch}"
    return f"{action.kind}{action.microbatch}" + (f".{chunk}" if n_chunks > 2 else "")


def chunks(timeline: Timeline) -> int:
    pp = len(timeline.rows)
    return 1 + max((s.action.stage // pp for row in timeline.rows for s in row), default=0)


def render_text(timeline: Timeline, color: bool = False) -> str:
    pp = len(timeline.rows)
    n_chunks = chunks(timeline)
    unit = min((s.end - s.start for row in timeline.rows for s in row), default=1.0)
    width = 1 + max((len(label(s.action, pp, n_chunks)) for row in timeline.rows for s in row), default=2)
    lines = []
    for r, row in enumerate(timeline.rows):
        cells, t = [], 0.0
        for s in row:
            cells += [".".ljust(width)] * round((s.start - t) / unit)
            text = label(s.action, pp, n_chunks).ljust(round((s.end - s.start) / unit) * width)
            cells.append(f"\x1b[{ANSI[s.action.kind]}m{text}\x1b[0m" if color else text)
            t = s.end
        cells += [".".ljust(width)] * round((timeline.makespan - t) / unit)
        lines.append(f"rank {r} |" + "".join(cells).rstrip())
    return "\n".join(lines)


def render_svg(timeline: Timeline, title: str = "") -> str:
    pp = len(timeline.rows)
    scale, row_h, left, top = 28.0, 26, 64, 30 if title else 8
    width = left + timeline.makespan * scale + 8
    height = top + pp * row_h + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']
    if title:
        out.append(f'<text x="{left}" y="18" font-size="13">{_escape(title)}</text>')
    n_chunks = chunks(timeline)
    for r, row in enumerate(timeline.rows):
        y = top + r * row_h
        out.append(f'<text x="4" y="{y + 17}">rank {r}</text>')
        out.append(f'<rect x="{left}" y="{y + 2}" width="{timeline.makespan * scale:.1f}" height="{row_h - 4}" '
                   f'fill="#eeeeee"/>')
        for s in row:
            a = s.action
            x, w = left + s.start * scale, (s.end - s.start) * scale
            opacity = 1.0 if a.stage < pp else 0.6  # later chunks lighter
            out.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w - 1:.1f}" height="{row_h - 4}" '
                       f'fill="{COLORS[a.kind]}" fill-opacity="{opacity}"/>')
            out.append(f'<text x="{x + w / 2:.1f}" y="{y + 17}" fill="white" text-anchor="middle">'
                       f'{label(a, pp, n_chunks)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main(pp: int, microbatches: int, schedule: str = "1f1b", virtual: int = 1, svg_path: str | None = None,
         costs: dict[str, float] | None = None) -> Timeline:
    """Print the timeline of a schedule, its simulated bubble and the textbook formula's;
    write the SVG too when svg_path is given. Raises ValueError on bad arguments."""
    timeline = simulate_schedule(schedule, pp, microbatches, virtual, costs)
    c = {**COSTS, **(costs or {})}
    head = f"{schedule}: pp={pp} microbatches={microbatches}" + (f" virtual={virtual}" if virtual > 1 else "")
    print(head + "   costs " + " ".join(f"{k}={v:g}" for k, v in c.items()))
    print(render_text(timeline))
    print(f"makespan {timeline.makespan:g}   bubble {timeline.bubble:.1%} simulated, "
          f"{textbook_bubble(schedule, pp, microbatches, virtual, costs):.1%} textbook")
    if svg_path:
        with open(svg_path, "w") as f:
            f.write(render_svg(timeline, f"{head}, bubble {timeline.bubble:.1%}"))
        print(f"wrote {svg_path}")
    return timeline
