"""trainer.generalisation: the unseen-site metrics a technologist cares about, on hand-made observations."""

from __future__ import annotations

import math

import numpy as np

import pytest

from trainer.artifacts import REPEAT_SEVERITY
from trainer.generalisation import SEVERE, Observation, report_markdown, site_report, to_json


def _obs(subject: str, clean: float, by_severity: dict[int, float], kind: str = "noise") -> list[Observation]:
    return [Observation("siteA", subject, "clean", 0, clean)] + [
        Observation("siteA", subject, kind, s, v) for s, v in by_severity.items()
    ]


def test_a_perfect_score_detects_everything_and_never_false_alarms():
    obs = []
    for i in range(6):
        obs += _obs(str(i), 0.95 - 0.01 * i, {s: 0.9 - 0.2 * s for s in range(1, 6)})
    report = site_report(obs, threshold=0.5, n_boot=50)
    assert report["false_alarm"].value == 0.0
    assert report["pooled"][f"detect_sev{SEVERE}"].value == 1.0
    assert report["pooled"]["spearman"].value == pytest.approx(1.0, abs=0.05)
    assert report["pooled"]["within_head"] == pytest.approx(1.0)
    assert report["kinds"]["noise"]["auc_severe"].value == 1.0
    assert "noise" in report_markdown("A", report) and '"false_alarm"' in to_json(report)


def test_false_alarms_and_missed_detections_are_counted():
    obs = _obs("a", 0.4, {REPEAT_SEVERITY: 0.6, SEVERE: 0.45}) + _obs("b", 0.9, {REPEAT_SEVERITY: 0.3, SEVERE: 0.7})
    report = site_report(obs, threshold=0.5, n_boot=50)
    assert report["false_alarm"].value == 0.5  # subject a's clean scan is below the threshold
    assert report["pooled"][f"detect_sev{SEVERE}"].value == 0.5
    assert report["pooled"][f"detect_sev{REPEAT_SEVERITY}"].value == 0.5
    # AUC clean vs severe: pairs (0.4, 0.45) lost, (0.4, 0.7) lost, (0.9, 0.45) won, (0.9, 0.7) won
    assert report["pooled"][f"auc_sev{SEVERE}"].value == 0.5
    assert math.isnan(report["pooled"]["auc_sev1"].value)  # no scan at severity 1


def test_clean_variants_keep_the_head_and_describe_their_grid():
    from qc_daemon.volume import Volume
    from trainer.generalisation import clean_variants

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (60, 52, 40)], indexing="ij"))
    data = np.where(np.sqrt((grid**2).sum(axis=0)) < 0.6, 800.0, 0.0).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    variants = dict(clean_variants(Volume(data, (1.0, 1.0, 1.2), affine)))
    assert list(variants) == ["as acquired", "1.3x coarser voxels", "background floor 1 %", "tight field of view"]
    coarse = variants["1.3x coarser voxels"]
    assert np.allclose(np.asarray(coarse.spacing_mm) * coarse.data.shape, np.asarray((1.0, 1.0, 1.2)) * data.shape)
    assert np.allclose(np.abs(np.diag(coarse.affine)[:3]), coarse.spacing_mm)
    floor = variants["background floor 1 %"].data
    assert floor[0, 0, 0] > 0 and abs(float(floor[30, 26, 20]) - 800) < 50  # noise in the air, the head kept
    tight = variants["tight field of view"].data
    assert tight.shape < data.shape and tight.sum() == pytest.approx(data.sum())  # only air was cut


def test_ghost_directions_score_an_n2_ghost_along_each_axis():
    from qc_daemon.scorer import Scorer
    from qc_daemon.settings import ScoringSettings
    from qc_daemon.volume import Volume
    from trainer import artifacts
    from trainer.generalisation import ghost_directions, ghost_directions_markdown

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 64, 56)], indexing="ij"))
    data = np.where(np.sqrt((grid**2).sum(axis=0)) < 0.5, 800.0, 20.0).astype(np.float32)
    volume = Volume(data, (2.0, 2.0, 2.0), np.diag([2.0, 2.0, 2.0, 1.0]))
    scorer = Scorer(ScoringSettings())  # the bundled model, run by ONNX Runtime
    rows = ghost_directions(scorer, {"sphere": volume}, amplitudes=(0.3,))
    assert [(r["axis"], r["phase_error"]) for r in rows] == [(a, p) for a in range(3) for p in (True, False)]
    # each row is the daemon's score of that ghost: the same volume scored directly gives the same number
    params = {"axis": 1, "period": 2, "amplitude": 0.3, "phase_error": False}
    ghost = artifacts.apply_params(data, (2.0, 2.0, 2.0), "ghosting", params)
    direct = scorer.score_volume(Volume(ghost, (2.0, 2.0, 2.0), volume.affine))
    assert rows[3]["scores"] == [pytest.approx(direct.score)]
    table = ghost_directions_markdown(rows, amplitudes=(0.3,))
    assert "| sphere | 1 | amplitude | " in table and "30%" in table and table.count("| sphere |") == 6
