"""Completing a series without waiting: announced counts, the 3D-grid check, and the association's release."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import send_datasets, shared_data
from dicom_factory import classic_series, enhanced_series, phantom
from pynetdicom import AE, StoragePresentationContexts
from pydicom.uid import ExplicitVRLittleEndian

from qc_daemon.completeness import SliceFacts, announced_count, forms_complete_grid, slice_facts
from qc_daemon.store import FINAL_STATUSES, SeriesStatus, revisions

DCMTK_STORESCU = Path("/usr/bin/storescu")  # the venv's pynetdicom storescu would shadow it on PATH
LONG_QUIET_PERIOD_S = 3600.0  # completing by the quiet period would take an hour: any earlier row is an early completion
GENEROUS_BOUND_S = 120.0  # a behaviour bound (a loaded 2-core machine), far below the quiet period: not a timing benchmark


def _facts(series) -> list[SliceFacts]:
    return [slice_facts(ds) for ds in series]


def _rows(daemon, series_uid: str):
    with daemon.store.session() as session:
        return list(revisions(session, series_uid))


def _wait_for_rows(daemon, series_uid: str, count: int, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _rows(daemon, series_uid)
        if len(rows) >= count and all(row.status in FINAL_STATUSES for row in rows):
            return rows
        time.sleep(0.05)
    return _rows(daemon, series_uid)


# --- the pure check ---------------------------------------------------------------------------------------


def test_grid_check_accepts_a_complete_stack_in_any_order_and_refuses_gaps_repeats_and_mixtures():
    series = classic_series(phantom((8, 8, 20)), spacing_mm=(1.0, 1.0, 1.2))
    facts = _facts(series)
    assert forms_complete_grid(facts[::-1], min_slices=16)
    assert not forms_complete_grid(facts[:9] + facts[10:], min_slices=16), "a missing slice is a gap"
    assert not forms_complete_grid(facts + facts[:1], min_slices=16), "a repeated position is a time series"
    assert not forms_complete_grid(facts, min_slices=21), "fewer slices than a volume needs"
    assert not forms_complete_grid(facts, min_slices=16, announced=21), "fewer than the scanner announced"
    tilted = pydicom.Dataset()
    tilted.update(series[0])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0, 1]
    assert not forms_complete_grid(facts[1:] + [slice_facts(tilted)], min_slices=16), "two orientations"


def test_grid_check_takes_one_multiframe_instance_with_all_its_frames_and_ignores_non_images():
    (enhanced,) = enhanced_series(phantom((8, 8, 20)))
    assert forms_complete_grid([slice_facts(enhanced)], min_slices=16)
    assert not forms_complete_grid([slice_facts(enhanced)] * 2, min_slices=16)
    raw = SliceFacts(is_image=False, frames=1, orientation=None, position=None)
    assert forms_complete_grid(_facts(classic_series(phantom((8, 8, 20)))) + [raw], min_slices=16)
    assert not forms_complete_grid([raw], min_slices=1)


@pytest.mark.shared_data
@pytest.mark.parametrize(("name", "count"), [
    ("philips_elitionx_t1_mprage_3d", 170),  # Philips Number of Slices MR (2001,xx18), one stack
    ("siemens_xa30_t1_tfl_jpeglossless_phantom", 96),  # XA ASCCONV in (0021,xx19): 3D, lImagesPerSlab
    ("siemens_prisma_t1_2d_sag", 35),  # CSA series header ASCCONV in (0029,xx20): 2D, sSliceArray.lSize
    ("siemens_trio_mosaic_transfer_syntaxes", None),  # nothing trustworthy announced
])
def test_announced_count_of_the_real_shared_series_is_their_instance_count(name, count):
    folder = shared_data("dicom", name)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    assert {announced_count(ds) for ds in datasets} == {count}
    if count is not None:
        assert len(datasets) == count and forms_complete_grid([slice_facts(ds) for ds in datasets], 16, count)


@pytest.mark.shared_data
def test_vendor_counts_are_not_trusted_for_derived_images_or_several_stacks():
    ds = pydicom.dcmread(sorted(shared_data("dicom", "philips_elitionx_t1_mprage_3d").iterdir())[0])
    ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    assert announced_count(ds) is None
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
    ds.private_block(0x2001, "Philips Imaging DD 001")[0x60].value = 3  # Number of Stacks
    assert announced_count(ds) is None


# --- the running daemon -----------------------------------------------------------------------------------


def test_a_complete_series_in_one_association_is_scored_at_release_not_after_the_quiet_period(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": LONG_QUIET_PERIOD_S})
    series = classic_series(phantom((40, 40, 20)))  # no ImagesInAcquisition: only the release can tell
    assert send_datasets(series, daemon.port) == [0] * 20
    (row,) = _wait_for_rows(daemon, str(series[0].SeriesInstanceUID), 1, GENEROUS_BOUND_S)
    assert row.status is SeriesStatus.SCORED and row.instances == 20


def test_a_series_with_a_missing_slice_waits_for_the_quiet_period(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": 3.0})
    series = classic_series(phantom((40, 40, 20)))
    del series[10]
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    time.sleep(1.0)
    assert _rows(daemon, uid) == [] and daemon.assembler.receiving() == [uid]
    (row,) = _wait_for_rows(daemon, uid, 1, GENEROUS_BOUND_S)
    assert row.instances == 19


def test_an_aborted_association_does_not_complete_its_series_early(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": 3.0})
    series = classic_series(phantom((40, 40, 20)))
    uid = str(series[0].SeriesInstanceUID)
    ae = AE(ae_title="TEST_SCU")
    for context in StoragePresentationContexts:
        ae.add_requested_context(context.abstract_syntax, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", daemon.port, ae_title="QC_DAEMON")
    assert assoc.is_established
    assert [int(assoc.send_c_store(ds).Status) for ds in series] == [0] * 20
    assoc.abort()
    time.sleep(1.0)
    assert _rows(daemon, uid) == [] and daemon.assembler.receiving() == [uid]
    (row,) = _wait_for_rows(daemon, uid, 1, GENEROUS_BOUND_S)
    assert row.status is SeriesStatus.SCORED and row.instances == 20


def test_a_late_instance_after_an_early_completion_opens_a_new_revision(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": LONG_QUIET_PERIOD_S})
    series = classic_series(phantom((40, 40, 21)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series[:20], daemon.port)  # slices 0..19 form a complete grid of their own
    (first,) = _wait_for_rows(daemon, uid, 1, GENEROUS_BOUND_S)
    assert first.instances == 20
    send_datasets(series[20:], daemon.port)
    first, second = _wait_for_rows(daemon, uid, 2, GENEROUS_BOUND_S)
    assert (second.revision, second.instances, second.status) == (first.revision + 1, 21, SeriesStatus.SCORED)


@pytest.mark.dcmtk
@pytest.mark.shared_data
@pytest.mark.skipif(not DCMTK_STORESCU.exists(), reason="DCMTK storescu not installed")
@pytest.mark.parametrize(("use_expected_count", "trigger"), [
    (True, "expected_count"),  # Philips' Number of Slices MR is reached with the last instance
    (False, "association_released"),  # without it, storescu's release and the slices' grid decide
])
def test_the_real_philips_series_from_dcmtk_storescu_completes_without_the_quiet_period(
    daemon_factory, log_stream, use_expected_count, trigger
):
    folder = shared_data("dicom", "philips_elitionx_t1_mprage_3d")
    daemon = daemon_factory(
        assembly={"quiet_period_s": LONG_QUIET_PERIOD_S, "use_expected_count": use_expected_count}
    )
    subprocess.run(
        [str(DCMTK_STORESCU), "-aet", "MR_SCANNER", "-aec", "QC_DAEMON", "127.0.0.1", str(daemon.port),
         "+sd", str(folder)],
        check=True, capture_output=True, timeout=120,
    )
    uid = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    (row,) = _wait_for_rows(daemon, uid, 1, GENEROUS_BOUND_S)
    assert row.status is SeriesStatus.SCORED and row.instances == 170
    assert f'"trigger": "{trigger}"' in log_stream.getvalue()


def test_a_series_still_arriving_over_another_association_is_not_completed_at_the_first_release():
    from qc_daemon.assembler import Assembler
    from qc_daemon.intake import Arrival

    series = classic_series(phantom((8, 8, 20)))
    uid = str(series[0].SeriesInstanceUID)
    spooled, handed = [0], []
    assembler = Assembler(LONG_QUIET_PERIOD_S, True, submit=lambda u: not handed.append(u),
                          count_spooled=lambda u: spooled[0], min_slices=16)
    for index, ds in enumerate(series):  # slices 0..9 over association 1, 10..19 over association 2, interleaved
        spooled[0] += 1
        assembler.instance_arrived(Arrival(uid, str(ds.SOPInstanceUID), None, slice_facts(ds), 1 + (index >= 10)))
    assembler.association_released(1)
    assert handed == [] and assembler.receiving() == [uid]
    assembler.association_released(2)
    assert handed == [uid] and assembler.receiving() == []
