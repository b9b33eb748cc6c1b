"""The preprocessing contract (shared with the trainer) and the series-completion rules."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import send_datasets
from dicom_factory import classic_series, phantom

from qc_daemon.assembler import Assembler
from qc_daemon.intake import Arrival
from qc_daemon.model_contract import Normalisation, ScoreCalibration
from qc_daemon.preprocess import (
    VolumeError,
    extract_patches,
    normalise,
    patch_grid,
    patch_origins,
    prepare_volume,
    resample_to_spacing,
)
from qc_daemon.store import SeriesStatus, revisions


@pytest.mark.parametrize(("extent", "expected"), [(96, [0]), (100, [0, 4]), (144, [0, 48]), (150, [0, 48, 54])])
def test_patch_origins_cover_every_voxel_with_the_last_patch_flush(extent, expected):
    origins = patch_origins(extent, 96, 48)
    assert origins == expected
    covered = np.zeros(extent, bool)
    for start in origins:
        covered[start : start + 96] = True
    assert covered.all()


def test_patch_origins_refuse_a_short_axis():
    with pytest.raises(VolumeError, match="shorter than the patch size"):
        patch_origins(95, 96, 48)


def test_normalisation_maps_into_the_half_open_unit_interval():
    volume = np.random.default_rng(0).normal(100, 30, (20, 20, 20)).astype(np.float32)
    out = normalise(volume, Normalisation())
    assert out.dtype == np.float32
    assert out.min() == pytest.approx(1e-3, rel=1e-4) and out.max() == pytest.approx(1.0)
    assert np.all(out > 0)
    assert np.all(normalise(np.zeros((4, 4, 4)), Normalisation()) == np.float32(1e-3))


def test_normalisation_refuses_non_finite_values():
    volume = np.ones((4, 4, 4), np.float32)
    volume[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        normalise(volume, Normalisation())


def test_resampling_keeps_the_field_of_view():
    out = resample_to_spacing(np.ones((256, 256, 176), np.float32), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0))
    assert out.shape == (128, 128, 88)


def test_prepared_volume_is_padded_so_a_patch_fits_and_patches_are_cut_exactly():
    prepared = prepare_volume(np.ones((256, 256, 176), np.float32), (1, 1, 1), (2, 2, 2), Normalisation(), 96)
    assert prepared.shape == (128, 128, 96)
    origins = patch_grid(prepared.shape, 96, 48)
    assert origins == [(0, 0, 0), (0, 32, 0), (32, 0, 0), (32, 32, 0)]
    prepared[32, 32, 0] = 7.0
    patches = extract_patches(prepared, origins, 96)
    assert patches.shape == (4, 1, 96, 96, 96) and patches[3, 0, 0, 0, 0] == 7.0


def test_score_calibration_round_trips_and_clips():
    calibration = ScoreCalibration("snr_total", label_at_0=2.0, label_at_1=12.0)
    assert calibration.score_from_label(7.0) == pytest.approx(0.5)
    assert calibration.label_from_score(calibration.score_from_label(9.5)) == pytest.approx(9.5)
    assert calibration.score_from_label(50.0) == 1.0 and calibration.score_from_label(-3.0) == 0.0
    assert ScoreCalibration.from_json(calibration.to_json()) == calibration


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_assembler_waits_for_the_quiet_period_and_respects_back_pressure():
    clock, accepted, queue_open = _Clock(), [], [False]
    assembler = Assembler(10.0, True, submit=lambda uid: queue_open[0] and not accepted.append(uid),
                          count_spooled=lambda uid: 0, min_slices=16, clock=clock)
    assembler.instance_arrived(Arrival("1.2.3", "1.2.3.1", None))
    clock.now = 9.9
    assert assembler.tick() == []
    clock.now = 10.0
    assert assembler.tick() == []  # queue full: kept, not dropped
    assert assembler.receiving() == ["1.2.3"]
    queue_open[0] = True
    assert assembler.tick() == ["1.2.3"] and accepted == ["1.2.3"]
    assert assembler.receiving() == []


def test_assembler_completes_early_when_the_announced_count_is_in_the_spool():
    clock, spooled = _Clock(), {"1.2.3": 2}
    assembler = Assembler(60.0, True, submit=lambda uid: True, count_spooled=spooled.get, min_slices=16,
                          clock=clock)
    for i in range(2):
        assembler.instance_arrived(Arrival("1.2.3", f"1.2.3.{i}", 3))
    assert assembler.tick() == []
    spooled["1.2.3"] = 3
    assert assembler.tick() == ["1.2.3"]


def test_a_series_sent_back_for_a_retry_is_handed_over_again_after_its_delay():
    clock, accepted = _Clock(), []
    assembler = Assembler(10.0, True, submit=lambda uid: not accepted.append(uid), count_spooled=lambda uid: 5,
                          min_slices=16, clock=clock)
    assembler.retry_later("1.2.3", delay_s=4.0)
    assert assembler.receiving() == ["1.2.3"]  # tracked (so the daemon is not idle), not yet due
    clock.now = 3.9
    assert assembler.tick() == []
    clock.now = 4.0
    assert assembler.tick() == ["1.2.3"] and accepted == ["1.2.3"]
    assert assembler.receiving() == []


def test_images_in_acquisition_completes_a_series_without_waiting(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": 3600.0})
    series = classic_series(phantom((40, 40, 20)), images_in_acquisition=True)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    with daemon.store.session() as session:
        (row,) = revisions(session, str(series[0].SeriesInstanceUID))
    assert row.status is SeriesStatus.SCORED and row.instances == 20
