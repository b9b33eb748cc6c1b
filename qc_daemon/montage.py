"""The montage: one PNG per scored series revision that a technologist reads at a glance.

Two rows of orthogonal slices of the model input (sagittal, coronal, axial; radiological convention: the
patient's right on the left of the screen, anterior on the left of the sagittal view): the first through the
worst region of the quality map (marked), the second through the centre of the volume. The quality map is
overlaid inside the head with a colour scale whose legend marks the threshold. A banner gives PASS or ALERT
with the score and the threshold; the caption below names the series, station, date, UIDs and the model hash.
Nothing identifies the patient: :class:`MontageCaption` has no field for a name, ID or birth date.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display): safe in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

FIGURE_SIZE_IN = (12.0, 9.0)
DPI = 100  # the PNG is 1200 x 900 pixels
QUALITY_COLOURS = "RdYlGn"  # red = low quality, green = high
OVERLAY_ALPHA = 0.35
PASS_COLOUR, ALERT_COLOUR = "#1a7f37", "#c62828"


@dataclass(frozen=True)
class MontageCaption:
    """What the montage says about the series: study and series facts only, never patient identity."""

    series_instance_uid: str
    study_instance_uid: str | None
    revision: int
    series_description: str | None
    station_name: str | None
    completed_at: dt.datetime  # naive UTC
    score: float
    threshold: float
    model_sha256: str


def verdict(caption: MontageCaption) -> str:
    if caption.score < caption.threshold:
        return f"ALERT  score {caption.score:.3f} < threshold {caption.threshold:.2f}"
    return f"PASS  score {caption.score:.3f} \u2265 threshold {caption.threshold:.2f}"


def caption_lines(caption: MontageCaption) -> list[str]:
    """The caption under the slices, one string per line."""
    return [
        f"Series: {caption.series_description or '-'}    Station: {caption.station_name or '-'}    "
        f"Date: {caption.completed_at:%Y-%m-%d %H:%M} UTC",
        f"Series UID: {caption.series_instance_uid}  (revision {caption.revision})",
        f"Study UID:  {caption.study_instance_uid or '-'}",
        f"Model sha256: {caption.model_sha256}",
        "Score: mean of all 96\u00b3-voxel patch scores, in [0, 1], 1 = best. Colour: quality map "
        "(each voxel the mean score of the patches covering it).",
    ]


def _views(point: tuple[int, int, int]) -> list[tuple[str, Callable[[np.ndarray], np.ndarray], tuple[str, str]]]:
    """(title, slicer of an (X, Y, Z) RAS array -> 2D array for imshow with origin='lower', side labels)."""
    x, y, z = point
    return [
        (f"sagittal x={x}", lambda a: a[x, ::-1, :].T, ("A", "P")),
        (f"coronal y={y}", lambda a: a[::-1, y, :].T, ("R", "L")),
        (f"axial z={z}", lambda a: a[::-1, :, z].T, ("R", "L")),
    ]


def _marker(point: tuple[int, int, int], shape: tuple[int, int, int]) -> list[tuple[float, float]]:
    """Where ``point`` falls in each view of :func:`_views` (column, row)."""
    x, y, z = point
    nx, ny, _ = shape
    return [(ny - 1 - y, z), (nx - 1 - x, z), (nx - 1 - x, y)]


def render_montage(
    image: np.ndarray,
    qmap: np.ndarray,
    head: np.ndarray | None,
    spacing_mm: tuple[float, float, float],
    worst: tuple[int, int, int],
    caption: MontageCaption,
    path: Path,
) -> Path:
    """Write the montage PNG (1200 x 900) atomically; returns the path."""
    shape = image.shape
    centre = tuple(n // 2 for n in shape)
    low, high = np.percentile(image, [1, 99.5])
    overlay = np.ma.masked_invalid(qmap) if head is None else np.ma.masked_where(~head | ~np.isfinite(qmap), qmap)
    norm = Normalize(0.0, 1.0)
    sx, sy, sz = spacing_mm
    aspects = [sz / sy, sz / sx, sy / sx]

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI)
    FigureCanvasAgg(figure)
    alert = caption.score < caption.threshold
    figure.text(
        0.5, 0.965, verdict(caption), ha="center", va="center", fontsize=20, weight="bold", color="white",
        bbox={"boxstyle": "round,pad=0.4", "facecolor": ALERT_COLOUR if alert else PASS_COLOUR, "edgecolor": "none"},
    )
    grid = figure.add_gridspec(2, 4, left=0.05, right=0.95, top=0.9, bottom=0.22, width_ratios=[1, 1, 1, 0.06],
                               wspace=0.08, hspace=0.18)
    rows = (("worst region", worst), ("centre", centre))
    mappable = None
    for r, (label, point) in enumerate(rows):
        for c, (title, cut, (left, right)) in enumerate(_views(point)):
            axes = figure.add_subplot(grid[r, c])
            axes.imshow(cut(image), cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspects[c],
                        interpolation="nearest")
            mappable = axes.imshow(cut(overlay), cmap=QUALITY_COLOURS, norm=norm, alpha=OVERLAY_ALPHA,
                                   origin="lower", aspect=aspects[c], interpolation="nearest")
            if r == 0:
                col, row = _marker(point, shape)[c]
                axes.plot([col], [row], marker="+", markersize=22, markeredgewidth=2, color="cyan")
                axes.plot([col], [row], marker="o", markersize=22, fillstyle="none", markeredgewidth=1.5,
                          color="cyan")
            axes.set_title(f"{label}: {title}", fontsize=10)
            axes.text(0.02, 0.5, left, transform=axes.transAxes, color="yellow", fontsize=11, weight="bold",
                      va="center")
            axes.text(0.98, 0.5, right, transform=axes.transAxes, color="yellow", fontsize=11, weight="bold",
                      va="center", ha="right")
            axes.set_xticks([])
            axes.set_yticks([])
    legend_axes = figure.add_subplot(grid[:, 3])
    bar = figure.colorbar(mappable, cax=legend_axes)
    bar.solids.set_alpha(1.0)
    bar.set_label("local quality (quality map), 1 = best", fontsize=10)
    bar.ax.axhline(caption.threshold, color="black", linewidth=2)
    bar.ax.text(-0.3, caption.threshold, "threshold", transform=bar.ax.get_yaxis_transform(), va="center",
                ha="right", fontsize=9, weight="bold")
    figure.text(0.05, 0.02, "\n".join(caption_lines(caption)), ha="left", va="bottom", fontsize=10,
                family="monospace", linespacing=1.5)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".part-{os.getpid()}-{path.name}")
    figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None, "Title": "qc-daemon quality montage"})
    tmp.replace(path)
    return path
