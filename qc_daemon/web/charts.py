"""Trend charts as SVG geometry computed on the server: no chart library, no script, works in any browser."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

WIDTH, HEIGHT = 900, 260
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 10, 28
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str  # the tooltip: when, score, description
    url: str
    alert: bool


@dataclass(frozen=True)
class Line:
    name: str
    color: str
    points: tuple[Point, ...]

    @property
    def path(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class Chart:
    title: str
    lines: tuple[Line, ...]
    threshold_y: float | None  # None: no threshold line (an IQM has none)
    x_ticks: tuple[tuple[float, str, str], ...]  # x, label, text-anchor
    y_ticks: tuple[tuple[float, str], ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right_edge: int = WIDTH - RIGHT
    top: int = TOP
    bottom_edge: int = HEIGHT - BOTTOM


@dataclass(frozen=True)
class Sample:
    group: str
    when: dt.datetime
    value: float  # the score, or an IQM
    label: str  # series description, for the tooltip
    url: str
    alert: bool


def score_chart(title: str, samples: Iterable[Sample], threshold: float, start: dt.datetime,
                end: dt.datetime) -> Chart:
    """Scores in [0, 1] over [start, end] with the alert threshold line."""
    return trend_chart(title, samples, start, end, (0.0, 1.0), threshold)


def value_range(samples: Iterable[Sample]) -> tuple[float, float]:
    """The samples' [min, max] padded by 5 % each side (a constant value gets +-1 or +-10 % of itself)."""
    values = [s.value for s in samples]
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 if high > low else max(abs(low) * 0.1, 1.0)
    return low - pad, high + pad


def trend_chart(title: str, samples: Iterable[Sample], start: dt.datetime, end: dt.datetime,
                y_range: tuple[float, float], threshold: float | None = None) -> Chart:
    """Values in ``y_range`` over [start, end], one line per group (at most :data:`PALETTE` groups, the busiest)."""
    span_s = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    low, high = y_range

    def x(when: dt.datetime) -> float:
        return LEFT + plot_w * min(max((when - start).total_seconds() / span_s, 0.0), 1.0)

    def y(value: float) -> float:
        return TOP + plot_h * (1.0 - min(max((value - low) / (high - low), 0.0), 1.0))

    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample)
    busiest = sorted(groups, key=lambda name: (-len(groups[name]), name))[: len(PALETTE)]
    lines = tuple(
        Line(name, color, tuple(
            Point(x(s.when), y(s.value), f"{s.when:%Y-%m-%d %H:%M} {s.value:.4g} {s.label}", s.url, s.alert)
            for s in sorted(groups[name], key=lambda s: s.when)
        ))
        for name, color in zip(busiest, PALETTE)
    )
    anchors = ("start", "middle", "middle", "middle", "end")  # the outer labels stay inside the picture
    x_ticks = tuple((x(start + (end - start) * i / 4), f"{start + (end - start) * i / 4:%Y-%m-%d %H:%M}", anchor)
                    for i, anchor in enumerate(anchors))
    y_ticks = tuple((y(v), f"{v:.3g}") for v in (low + (high - low) * i / 4 for i in range(5)))
    return Chart(title, lines, None if threshold is None else y(threshold), x_ticks, y_ticks)
