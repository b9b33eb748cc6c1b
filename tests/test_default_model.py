"""The bundled default model on scans from sites and scanners it never saw: it must alert for a scan a
technologist would repeat, and stay silent for a good one.

The scans: the shared human DICOM series (Philips Ingenia Elition X 3D T1 MPRAGE, Siemens Prisma 2D T1 FLASH with
4.8 mm slices), built into volumes by the daemon's own code; neither site is in the training data (MODEL_CARD.md).
The degradations (``degradations.py``) are written with numpy only, independently of ``trainer/artifacts.py``, and
applied on each scan's own grid, as a scanner would make them.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data
from degradations import MODERATE, NON_DIAGNOSTIC, degrade

from qc_daemon.scorer import Scorer
from qc_daemon.settings import AlertSettings, ScoringSettings
from qc_daemon.volume import Volume

UNSEEN = ["philips_elitionx_t1_mprage_3d", "siemens_prisma_t1_2d_sag"]
THRESHOLD = AlertSettings().threshold


def _require_trained(scorer: Scorer) -> None:
    # ``python -m export bundle`` writes an untrained placeholder (calibration "untrained"): never ship one.
    assert scorer.info.calibration.label_name != "untrained", f"{scorer.path} is the untrained placeholder"
    assert not scorer.info.training_data.startswith("none"), f"{scorer.path}: {scorer.info.training_data}"


def test_bundled_model_is_trained():
    _require_trained(Scorer(ScoringSettings()))


@pytest.fixture(scope="module")
def scorer():
    scorer = Scorer(ScoringSettings())
    _require_trained(scorer)
    return scorer


@pytest.fixture(scope="module")
def volumes():
    from qc_daemon.cli import _pick_series
    from qc_daemon.series import classify, read_series
    from qc_daemon.volume import build_volume

    out = {}
    for name in UNSEEN:
        folder = shared_data("dicom", name)
        out[name] = build_volume(classify(read_series(name, _pick_series(folder, None)), min_slices=5))
    return out


def _score(scorer, volume: Volume, data: np.ndarray) -> float:
    return scorer.score_volume(Volume(data.astype(np.float32), volume.spacing_mm, volume.affine)).score


@pytest.mark.shared_data
@pytest.mark.parametrize("name", UNSEEN)
def test_clean_scans_from_unseen_sites_do_not_alert(scorer, volumes, name):
    assert _score(scorer, volumes[name], volumes[name].data) > 0.7


@pytest.mark.shared_data
@pytest.mark.parametrize("kind", sorted(NON_DIAGNOSTIC))
@pytest.mark.parametrize("name", UNSEEN)
def test_non_diagnostic_scans_alert(scorer, volumes, name, kind):
    volume = volumes[name]
    clean = _score(scorer, volume, volume.data)
    moderate = _score(scorer, volume, degrade(volume.data, kind, MODERATE[kind], volume.spacing_mm))
    severe = _score(scorer, volume, degrade(volume.data, kind, NON_DIAGNOSTIC[kind], volume.spacing_mm))
    assert severe < THRESHOLD, (clean, moderate, severe)
    assert clean > moderate > severe, (clean, moderate, severe)
