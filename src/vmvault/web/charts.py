"""Charts drawn on the server as SVG: no JavaScript library, nothing fetched by the browser.

Every text that goes into a chart (labels, values, titles) is XML-escaped here; the SVG is
inlined into pages by the templates as markup that was built from escaped parts only.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup

__all__ = ["Series", "line_chart"]


@dataclass
class Series:
    label: str
    points: Sequence[tuple[dt.datetime, float]]
    css: str = "s1"  # the class the stylesheet colours
    dashed: bool = False


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    y_format: Callable[[float], str],
    width: int = 640,
    height: int = 220,
    marker: tuple[dt.datetime, str] | None = None,
) -> Markup:
    """A time-series line chart. ``marker`` draws a vertical line at a time with a label
    (e.g. the estimated "full" date)."""
    left, right, top, bottom = 64, 40, 24, 28
    pts = [p for s in series for p in s.points]
    if marker is not None:
        pts.append((marker[0], 0.0))
    if not pts:
        return Markup(
            f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">'
            f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" class="muted">'
            f"{_e(title)}: no data yet</text></svg>"
        )
    t0 = min(p[0] for p in pts).timestamp()
    t1 = max(p[0] for p in pts).timestamp()
    if t1 == t0:
        t0, t1 = t0 - 3600, t1 + 3600
    y1 = max(p[1] for p in pts)
    y0 = 0.0
    if y1 <= y0:
        y1 = y0 + 1
    y1 *= 1.05
    w, h = width - left - right, height - top - bottom

    def x(t: dt.datetime) -> float:
        return left + (t.timestamp() - t0) / (t1 - t0) * w

    def y(v: float) -> float:
        return top + h - (v - y0) / (y1 - y0) * h

    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" class="chart-title">{_e(title)}</text>',
    ]
    for v in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="axis">{_e(y_format(v))}</text>')
    stamp = "%Y-%m-%d" if t1 - t0 > 3 * 86400 else "%m-%d %H:%M" if t1 - t0 > 3 * 3600 else "%H:%M:%S"
    for t in _ticks(t0, t1, 3):
        when = dt.datetime.fromtimestamp(t, dt.UTC)
        out.append(
            f'<text x="{left + (t - t0) / (t1 - t0) * w:.1f}" y="{height - 8}" text-anchor="middle" class="axis">'
            f"{_e(when.strftime(stamp))}</text>"
        )
    legend_x = left + 8
    for s in series:
        if not s.points:
            continue
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in sorted(s.points))
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        out.append(f'<polyline points="{path}" class="line {_e(s.css)}" fill="none"{dash}/>')
        if len(s.points) == 1:
            ((when, value),) = s.points
            out.append(f'<circle cx="{x(when):.1f}" cy="{y(value):.1f}" r="3" class="dot {_e(s.css)}"/>')
        out.append(f'<text x="{legend_x}" y="{top + 12}" class="legend {_e(s.css)}">{_e(s.label)}</text>')
        legend_x += 8 + 7 * len(s.label)
    if marker is not None:
        mx = x(marker[0])
        out.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top}" y2="{top + h}" class="marker"/>')
        anchor = "end" if mx > left + w / 2 else "start"
        out.append(f'<text x="{mx:.1f}" y="{top + h - 4}" text-anchor="{anchor}" class="marker">{_e(marker[1])}</text>')
    out.append("</svg>")
    return Markup("".join(out))
