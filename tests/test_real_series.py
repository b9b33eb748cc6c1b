"""Real scanner series (../shared/data/dicom, skipped when absent) sent by real clients: pynetdicom and DCMTK."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import send_datasets, shared_data
from dcmtk_tools import dcmtk_tool

from qc_daemon.store import SeriesStatus, history

pytestmark = pytest.mark.shared_data
STORESCU = dcmtk_tool("storescu")  # not pynetdicom's storescu, which an activated .venv puts first on PATH

EXPECTED = {
    "philips_elitionx_t1_mprage_3d": (SeriesStatus.SCORED, None),
    "siemens_xa30_t1_tfl_jpeglossless_phantom": (SeriesStatus.SCORED, None),
    "siemens_xa30_t1_tfl_enhanced_phantom": (SeriesStatus.SCORED, None),
    "siemens_prisma_t1_2d_sag": (SeriesStatus.SCORED, None),
    "siemens_trio_mosaic_transfer_syntaxes": (SeriesStatus.SKIPPED, "mosaic"),
    "philips_raw_data_storage": (SeriesStatus.SKIPPED, "not an MR image series (SOP class Raw Data Storage)"),
}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _all_rows(daemon):
    with daemon.store.session() as session:
        return list(history(session))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_series_over_pynetdicom(daemon_factory, name):
    folder = shared_data("dicom", name)
    daemon = daemon_factory()
    datasets = [pydicom.dcmread(p) for p in _files(folder)]
    # Compressed instances go out in their own transfer syntax: request exactly those contexts.
    statuses = _send_as_is(datasets, daemon.port)
    assert statuses == [0] * len(datasets)
    assert daemon.wait_idle(120)
    (row,) = _all_rows(daemon)
    status, reason = EXPECTED[name]
    assert row.status is status, row.reason
    if reason:
        assert reason in row.reason
    else:
        assert 0.0 <= row.score <= 1.0
    assert row.instances == len({str(ds.SOPInstanceUID) for ds in datasets})


def _send_as_is(datasets, port):
    from pynetdicom import AE

    ae = AE(ae_title="REAL_SCU")
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="QC_DAEMON")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.dcmtk
@pytest.mark.skipif(STORESCU is None, reason="DCMTK storescu not installed")
def test_philips_t1_from_dcmtk_storescu(daemon_factory):
    folder = shared_data("dicom", "philips_elitionx_t1_mprage_3d")
    daemon = daemon_factory()
    done = subprocess.run(
        [STORESCU, "-aet", "MR_SCANNER", "-aec", "QC_DAEMON", "127.0.0.1", str(daemon.port), "+sd", str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert daemon.wait_idle(120)
    (row,) = _all_rows(daemon)
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.instances == 170
    assert row.calling_ae == "MR_SCANNER"


# storescu proposes a compressed transfer syntax only when told which one.
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.2": "-xb",  # Explicit VR Big Endian
}


@pytest.mark.dcmtk
@pytest.mark.skipif(STORESCU is None, reason="DCMTK storescu not installed")
def test_transfer_syntaxes_from_dcmtk(daemon_factory):
    """The mosaic image in all nine transfer syntaxes is accepted as sent (and the series is skipped)."""
    folder = shared_data("dicom", "siemens_trio_mosaic_transfer_syntaxes")
    daemon = daemon_factory()
    sent = 0
    for path in _files(folder):
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        flag = STORESCU_PROPOSAL.get(syntax, "-R")
        done = subprocess.run(
            [STORESCU, flag, "-aec", "QC_DAEMON", "127.0.0.1", str(daemon.port), str(path)],
            capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, (syntax, done.stderr)
        sent += 1
    assert sent == 9
    assert daemon.wait_idle(60)
    (row,) = _all_rows(daemon)
    assert row.instances == sent
    assert row.status is SeriesStatus.SKIPPED and "mosaic" in row.reason


def test_synthetic_series_over_pynetdicom_default_contexts(daemon_factory):
    """The conftest sender (explicit/implicit little endian) works without shared data too."""
    from dicom_factory import classic_series, phantom

    daemon = daemon_factory()
    assert set(send_datasets(classic_series(phantom((32, 32, 16))), daemon.port)) == {0}
