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
    threshold_y: float
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
    score: float
    label: str  # series description, for the tooltip
    url: str
    alert: bool


def score_chart(title: str, samples: Iterable[Sample], threshold: float, start: dt.datetime,
                end: dt.datetime) -> Chart:
    """Scores in [0, 1] over [start, end], one line per group (at most :data:`PALETTE` groups, the busiest)."""
    span_s = max((end - start).total_seconds(), 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(when: dt.datetime) -> float:
        return LEFT + plot_w * min(max((when - start).total_seconds() / span_s, 0.0), 1.0)

    def y(score: float) -> float:
        return TOP + plot_h * (1.0 - min(max(score, 0.0), 1.0))

    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.group, []).append(sample)
    busiest = sorted(groups, key=lambda name: (-len(groups[name]), name))[: len(PALETTE)]
    lines = tuple(
        Line(name, color, tuple(
            Point(x(s.when), y(s.score), f"{s.when:%Y-%m-%d %H:%M} {s.score:.3f} {s.label}", s.url, s.alert)
            for s in sorted(groups[name], key=lambda s: s.when)
        ))
        for name, color in zip(busiest, PALETTE)
    )
    anchors = ("start", "middle", "middle", "middle", "end")  # the outer labels stay inside the picture
    x_ticks = tuple((x(start + (end - start) * i / 4), f"{start + (end - start) * i / 4:%Y-%m-%d %H:%M}", anchor)
                    for i, anchor in enumerate(anchors))
    y_ticks = tuple((y(v), f"{v:.2f}") for v in (0.0, 0.25, 0.5, 0.75, 1.0))
    return Chart(title, lines, y(threshold), x_ticks, y_ticks)
