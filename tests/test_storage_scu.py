"""``qc-daemon send``: a folder's files to a real running daemon, each proposed in its own transfer syntax."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from conftest import SHARED_DATA
from dicom_factory import classic_series, phantom, write_series
from pydicom.encaps import encapsulate
from pydicom.filereader import read_file_meta_info
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, RLELossless

from qc_daemon.cli import main
from qc_daemon.storage_scu import DicomFile, group_for_associations, read_dicom_files, send_files
from qc_daemon.store import SeriesStatus, history

JPEG_LOSSLESS_SERIES = SHARED_DATA / "dicom" / "siemens_xa30_t1_tfl_jpeglossless_phantom"


def _rows(daemon):
    with daemon.store.session() as session:
        return {row.series_instance_uid: row for row in history(session)}


def _spooled_syntaxes(daemon, series_uid: str) -> set[str]:
    return {str(read_file_meta_info(p).TransferSyntaxUID) for p in daemon.spool.instance_paths(series_uid)}


def _rle_series(folder: Path) -> list[Path]:
    datasets = classic_series(phantom((64, 64, 40)), spacing_mm=(2.0, 2.0, 2.0), images_in_acquisition=True)
    for ds in datasets:
        ds.compress(RLELossless)
    return write_series(datasets, folder)


@pytest.mark.shared_data
@pytest.mark.skipif(not JPEG_LOSSLESS_SERIES.is_dir(), reason=f"{JPEG_LOSSLESS_SERIES} not present")
def test_jpeg_lossless_series_is_sent_as_stored(daemon_factory, capsys):
    daemon = daemon_factory()
    files, _ = read_dicom_files(JPEG_LOSSLESS_SERIES, recursive=True)

    code = main(["send", str(JPEG_LOSSLESS_SERIES), "-r", "--port", str(daemon.port), "--calling-aet", "MR_SCANNER"])

    assert code == 0
    assert f"sent {len(files)} of {len(files)} instances to QC_DAEMON@127.0.0.1:{daemon.port}" in capsys.readouterr().out
    assert daemon.wait_idle(120)
    (row,) = _rows(daemon).values()
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.instances == len(files)
    assert row.calling_ae == "MR_SCANNER"
    assert _spooled_syntaxes(daemon, row.series_instance_uid) == {f.transfer_syntax_uid for f in files}


def test_two_transfer_syntaxes_in_one_folder(daemon_factory, tmp_path, capsys):
    plain = write_series(classic_series(phantom((64, 64, 40)), spacing_mm=(2.0, 2.0, 2.0), images_in_acquisition=True),
                         tmp_path / "plain")
    rle = _rle_series(tmp_path / "sub" / "rle")
    # Complete on the announced count, the quiet period only a fallback: on a loaded machine the sender, in this
    # process, can pause longer than a short quiet period mid-series (a series split in two revisions).
    daemon = daemon_factory(assembly={"quiet_period_s": 10.0, "min_slices": 16})

    assert main(["send", str(tmp_path), "-r", "--port", str(daemon.port)]) == 0

    assert "sent 80 of 80 instances" in capsys.readouterr().out
    assert daemon.wait_idle(120)
    rows = _rows(daemon)
    for paths, syntax in ((plain, ExplicitVRLittleEndian), (rle, RLELossless)):
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        assert rows[uid].status is SeriesStatus.SCORED, rows[uid].reason
        assert rows[uid].instances == 40
        assert _spooled_syntaxes(daemon, uid) == {syntax}
        # as stored: the spooled instance carries the sender's pixel data bytes unchanged
        spooled = pydicom.dcmread(daemon.spool.instance_paths(uid)[0])
        assert spooled.PixelData in {pydicom.dcmread(p).PixelData for p in paths}


def test_without_recursion_only_the_folder_itself_is_sent(daemon_factory, tmp_path, capsys):
    write_series(classic_series(phantom((32, 32, 4))), tmp_path)
    _rle_series(tmp_path / "sub")
    (tmp_path / "notes.txt").write_text("not DICOM")
    daemon = daemon_factory()

    assert main(["send", str(tmp_path), "--port", str(daemon.port)]) == 0

    out = capsys.readouterr().out
    assert "sent 4 of 4 instances" in out
    assert "skipped 1 files that are not DICOM instances" in out and "notes.txt" in out


def test_more_pairs_than_one_association_carries_are_split(daemon_factory, tmp_path):
    plain = write_series(classic_series(phantom((32, 32, 3))), tmp_path / "plain")
    rle = _rle_series(tmp_path / "rle")[:3]
    files, _ = read_dicom_files(tmp_path, recursive=True)
    files = [f for f in files if f.path in set(plain + rle)]
    daemon = daemon_factory()

    report = send_files(files, "127.0.0.1", daemon.port, "QC_DAEMON", "QC_SEND", max_contexts=1)

    assert report.ok and sorted(report.sent) == sorted(plain + rle)


def test_grouping_keeps_each_group_within_the_context_limit():
    files = [DicomFile(Path(f"{i}"), f"1.2.3.{i % 5}", f"1.9.{i}", f"1.2.840.10008.1.2.{i % 2 + 1}") for i in range(40)]
    groups = group_for_associations(files, max_contexts=3)
    assert [len({f.context for f in group}) for group in groups] == [3, 3, 3, 1]
    assert sorted(f.path for group in groups for f in group) == sorted(f.path for f in files)


def test_a_refused_transfer_syntax_fails_the_command(daemon_factory, tmp_path, capsys):
    write_series(classic_series(phantom((32, 32, 3))), tmp_path)
    odd = pydicom.dcmread(tmp_path / "IM00000.dcm")
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    odd.file_meta.TransferSyntaxUID = MPEG2MPML  # encapsulated video: the daemon does not accept it
    odd.PixelData = encapsulate([odd.PixelData])
    odd.save_as(tmp_path / "video.dcm")
    daemon = daemon_factory()

    assert main(["send", str(tmp_path), "--port", str(daemon.port)]) == 1

    out = capsys.readouterr().out
    assert "sent 3 of 4 instances" in out and "1 failed" in out
    assert f"FAILED {tmp_path / 'video.dcm'}: the peer refused SOP class" in out


def test_no_listener_fails_every_file(tmp_path, capsys):
    import socket

    write_series(classic_series(phantom((16, 16, 2))), tmp_path)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    assert main(["send", str(tmp_path), "--port", str(port)]) == 1
    assert "sent 0 of 2 instances" in capsys.readouterr().out


def test_a_folder_without_dicom_is_an_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    assert main(["send", str(tmp_path)]) == 1
    assert "no DICOM instances" in capsys.readouterr().err
