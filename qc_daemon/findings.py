"""What follows a score: classical IQMs, the quality map and the montage of one scored series revision.

Computed after the score's row is committed and its alert enqueued (never delaying either), by the same worker.
Files go under ``<results_dir>/<series_uid>/r<revision>/`` (``quality_map.nii.gz``, ``montage.png``) and are
removed by retention with the spool (:func:`remove_results_older_than`). Never raises for a bad volume: an IQM
that cannot be computed is None with its reason, a map or montage that cannot be drawn is None and logged.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qc_daemon.iqms import IqmError, compute_iqms, head_mask
from qc_daemon.logs import get_logger
from qc_daemon.montage import MontageCaption, render_montage
from qc_daemon.quality_map import quality_map, save_quality_map, worst_region
from qc_daemon.scorer import Score
from qc_daemon.volume import Volume

log = get_logger(__name__)
QUALITY_MAP_FILE = "quality_map.nii.gz"
MONTAGE_FILE = "montage.png"


@dataclass
class Findings:
    iqms: dict[str, float | None]
    iqm_errors: dict[str, str]
    quality_map_path: Path | None = None
    montage_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # iqms_s, quality_map_s, montage_s


def results_folder(results_dir: Path, series_uid: str, revision: int) -> Path:
    """``<results_dir>/<series_uid>/r<revision>``; the UID was checked at intake (digits and dots only)."""
    return results_dir / series_uid / f"r{revision}"


def compute_findings(volume: Volume, score: Score, caption: MontageCaption, folder: Path) -> Findings:
    """IQMs of the native volume, then the map and montage on the model grid, written into ``folder``."""
    started = time.perf_counter()
    report = compute_iqms(volume.data, volume.spacing_mm)
    findings = Findings(iqms=report.values, iqm_errors=report.errors)
    findings.seconds["iqms_s"] = time.perf_counter() - started
    bound = log.bind(series_instance_uid=caption.series_instance_uid, revision=caption.revision)
    try:
        started = time.perf_counter()
        qmap = quality_map(score.volume_shape, score.patch_origins, score.patch_size, score.patch_scores)
        findings.quality_map_path = save_quality_map(qmap, score.model_affine, folder / QUALITY_MAP_FILE)
        findings.seconds["quality_map_s"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            head = head_mask(score.model_input)
        except IqmError:
            head = None  # the overlay then covers the whole field of view
        spacing = tuple(float(s) for s in np.linalg.norm(score.model_affine[:3, :3], axis=0))
        findings.montage_path = render_montage(
            score.model_input, qmap, head, spacing, worst_region(qmap, head), caption, folder / MONTAGE_FILE
        )
        findings.seconds["montage_s"] = time.perf_counter() - started
    except Exception:  # noqa: BLE001 - a drawing failure must not touch the stored score
        bound.exception("montage_failed")
    return findings


def remove_results_older_than(results_dir: Path, max_age_s: float, now: float | None = None) -> int:
    """Delete revision folders whose newest file is older than ``max_age_s`` (and emptied series folders);
    returns how many revision folders were removed."""
    if not results_dir.is_dir():
        return 0
    now = time.time() if now is None else now
    removed = 0
    for series_dir in results_dir.iterdir():
        if not series_dir.is_dir() or series_dir.is_symlink():
            continue
        for revision_dir in series_dir.iterdir():
            if not revision_dir.is_dir() or revision_dir.is_symlink():
                continue
            newest = max((p.stat().st_mtime for p in revision_dir.iterdir()), default=revision_dir.stat().st_mtime)
            if now - newest > max_age_s:
                shutil.rmtree(revision_dir, ignore_errors=True)
                removed += 1
        if not any(series_dir.iterdir()):
            series_dir.rmdir()
    return removed
