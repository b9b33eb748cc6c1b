"""trainer.generalisation: the unseen-site metrics a technologist cares about, on hand-made observations."""

from __future__ import annotations

import math

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
