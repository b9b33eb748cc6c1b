"""Every kind of series that is not a 3D anatomical MR volume is recorded as skipped, with a readable reason."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import classic_series, enhanced_series, phantom
from pydicom.uid import generate_uid

from qc_daemon.store import SeriesStatus


def _series(n=20, shape=(40, 40)):
    return classic_series(phantom((*shape, n)))


def test_single_slice(pipeline):
    row = pipeline.process(_series(1))
    assert (row.status, row.reason) == (SeriesStatus.SKIPPED, "a single slice; a 3D volume needs at least 16")


def test_localizer(pipeline):
    series = _series()
    for ds in series:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    row = pipeline.process(series)
    assert row.status is SeriesStatus.SKIPPED and row.reason.startswith("localizer")


def test_mosaic(pipeline):
    series = _series()
    for ds in series:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    row = pipeline.process(series)
    assert row.status is SeriesStatus.SKIPPED and "mosaic" in row.reason


def test_mixed_orientations(pipeline):
    series = _series()
    for ds in series[10:]:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    row = pipeline.process(series)
    assert row.status is SeriesStatus.SKIPPED and "mixed slice orientations" in row.reason


def test_time_series_repeats_positions(pipeline):
    first = _series(18)
    second = copy.deepcopy(first)
    for ds in second:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    row = pipeline.process(first + second)
    assert row.status is SeriesStatus.SKIPPED and "same slice position" in row.reason


def test_non_image_sop_class(pipeline):
    series = _series()
    for ds in series:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data Storage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    row = pipeline.process(series)
    assert row.status is SeriesStatus.SKIPPED
    assert row.reason == "not an MR image series (SOP class Raw Data Storage)"


def test_ct_is_not_scored(pipeline):
    series = _series()
    for ds in series:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.Modality = "CT"
    row = pipeline.process(series)
    assert row.status is SeriesStatus.SKIPPED and "CT Image Storage" in row.reason


def test_enhanced_time_series(pipeline):
    (ds,) = enhanced_series(phantom((40, 40, 20)))
    ds.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence = [_timing(12)]
    row = pipeline.process([ds])
    assert row.status is SeriesStatus.SKIPPED and "12 temporal positions" in row.reason


def _timing(n):
    from pydicom.dataset import Dataset

    timing = Dataset()
    timing.NumberOfTemporalPositions = n
    return timing


def test_pixel_data_shorter_than_claimed_fails_without_decoding(pipeline):
    series = _series()
    series[3].PixelData = series[3].PixelData[:100]
    row = pipeline.process(series)
    assert row.status is SeriesStatus.FAILED
    assert "pixel data holds 100 bytes" in row.reason


def test_unreadable_instances_only(pipeline):
    uid = generate_uid()
    pipeline.spool.store(uid, generate_uid(), b"\x00" * 128 + b"DICM" + b"garbage" * 10)
    row = pipeline.processor.process(uid)
    assert row.status is SeriesStatus.FAILED and row.reason.startswith("no readable DICOM instance")


@pytest.mark.parametrize("axis_slices", [16, 24])
def test_good_series_is_scored(pipeline, axis_slices):
    row = pipeline.process(classic_series(phantom((40, 40, axis_slices))))
    assert row.status is SeriesStatus.SCORED, row.reason
    assert np.isfinite(row.score)


def test_qa_phantoms_are_recognised_by_their_headers_and_skipped():
    from qc_daemon.series import SeriesSkipped, SpooledSeries, classify, phantom_reason

    series = classic_series(phantom((32, 32, 20)))
    keywords = ("phantom", "qa", "fbirn", "acr")
    assert phantom_reason(series, keywords) is None  # a person's series
    for field, value in (
        ("PatientName", "PHANTOM^ACR"),
        ("SeriesDescription", "Daily QA T1"),
        ("BodyPartExamined", "PHANTOM"),
        ("ProtocolName", "fBIRN_stability"),
    ):
        tagged = [copy.deepcopy(ds) for ds in series]
        for ds in tagged:
            setattr(ds, field, value)
        reason = phantom_reason(tagged, keywords)
        assert reason and field in reason and value not in reason  # names the field, never its value
        with pytest.raises(SeriesSkipped, match="QA phantom"):
            classify(SpooledSeries("1.2", tuple(Path(f"{i}.dcm") for i in range(len(tagged))), tuple(tagged), ()), 16, keywords)
        assert classify(SpooledSeries("1.2", tuple(Path(f"{i}.dcm") for i in range(len(tagged))), tuple(tagged), ()), 16, ()) is not None  # [] scores phantoms too
    # whole words only: "aqua" or "acronym" in a description is not a phantom
    tagged = [copy.deepcopy(ds) for ds in series]
    for ds in tagged:
        ds.SeriesDescription = "T1 aquarius acronym"
    assert phantom_reason(tagged, keywords) is None
