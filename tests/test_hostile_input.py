"""Hostile and broken input, over a real DICOM association and through the drop folder.

One daemon takes the whole corpus (:mod:`hostile_corpus`). For every case it must answer the right C-STORE status
(refused: nothing spooled) or accept the instance and record the series as skipped/failed with its reason;
memory stays far below what the headers claim (tracemalloc traces every thread, numpy included), nothing is
written outside its state folder, and afterwards the same daemon still scores a good series.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings, send_datasets
from dicom_factory import classic_series, phantom
from hostile_corpus import MAX_INSTANCE_MB, Case, drop_folder_cases, encode, network_cases, small_series, sop_class_of
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config

from qc_daemon.intake import InstanceRejected, StoreStatus
from qc_daemon.spool import check_uid
from qc_daemon.store import SeriesStatus, revisions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every invalid value

NETWORK = {case.name: case for case in network_cases()}
# Whatever a case claims, handling it may cost this much traced memory at most (the corpus' largest file is
# 4.3 MiB; its smallest lie claims 640 MiB, its largest 8e13 bytes).
MEMORY_CEILING = 48 * 2**20


class Hostile:
    def __init__(self, root: Path):
        from qc_daemon.service import Daemon

        self.root = root
        self.corpus = root.parent / (root.name + "-corpus")  # what the senders read: outside the daemon's tree
        self.corpus.mkdir()
        self.drop = root / "drop"
        self.settings = make_settings(
            root,
            dicom={"max_instance_mb": MAX_INSTANCE_MB},
            watch={"folder": str(self.drop), "settle_s": 0.1},
        )
        self.daemon = Daemon(self.settings, tick_s=0.05)
        self.daemon.start()
        self.rss_start_kib = _reset_peak_rss_kib()

    @property
    def state(self) -> Path:
        return self.settings.storage.state_dir

    def spool_entries(self) -> set[str]:
        """What the spool holds, but for the empty files it makes ahead (their stock changes on its own)."""
        spool = self.daemon.spool
        entries = set()
        for path in spool.root.rglob("*"):
            try:
                if path.parent == spool.incoming and path.stat().st_size == 0:
                    continue
            except FileNotFoundError:  # taken for an instance meanwhile
                continue
            entries.add(str(path.relative_to(spool.root)))
        return entries

    def rows(self, series_uid: str):
        with self.daemon.store.session() as session:
            return list(revisions(session, series_uid))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    node = Hostile(tmp_path_factory.mktemp("hostile"))
    yield node
    node.daemon.stop()
    shutil.rmtree(node.corpus, ignore_errors=True)


def send_files(files: Sequence[bytes], port: int, folder: Path, name: str) -> list[int]:
    """Send Part 10 files byte for byte (pynetdicom's chunked sending: the dataset is not re-encoded)."""
    paths = []
    for i, data in enumerate(files):
        path = folder / f"{name}-{i:03d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    ae = AE(ae_title="HOSTILE_SCU")
    for sop_class, syntax in sorted({sop_class_of(data) for data in files}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="QC_DAEMON")
    assert assoc.is_established, "association was not established"
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    statuses = []
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return statuses


def assert_recorded(node: Hostile, case: Case) -> None:
    (row,) = node.rows(case.series_uid)
    status, reason = case.outcome
    assert row.status is SeriesStatus(status), row.reason
    assert reason in row.reason
    if case.instances is not None:
        assert row.instances == case.instances


@pytest.mark.parametrize("name", list(NETWORK))
def test_network_case(hostile, name):
    case = NETWORK[name]
    before = hostile.spool_entries()
    tracemalloc.start()
    try:
        statuses = send_files(case.files, hostile.daemon.port, hostile.corpus, name)
        assert hostile.daemon.wait_idle(60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert [f"0x{s:04X}" for s in statuses] == [f"0x{case.status:04X}"] * len(case.files)
    if case.status != StoreStatus.SUCCESS:
        assert hostile.spool_entries() == before, "a refused instance left something in the spool"
    else:
        assert_recorded(hostile, case)
    assert peak < MEMORY_CEILING, f"{peak / 2**20:.1f} MiB traced"
    if case.claimed_bytes:
        assert peak < case.claimed_bytes / 5


def test_drop_folder_corpus(hostile):
    """Every file dropped at once: refused files move to rejected/ with a reason beside them, the others are
    recorded exactly as over the network, and nothing refused reaches the spool."""
    cases = drop_folder_cases()
    before = hostile.spool_entries()
    staging = hostile.corpus / "drop-staging"
    staging.mkdir()
    for case in cases:
        for i, data in enumerate(case.files):
            (staging / f"{case.name}-{i:03d}.dcm").write_bytes(data)
    for path in sorted(staging.iterdir()):
        path.rename(hostile.drop / path.name)  # same file system: each file appears complete

    deadline = time.monotonic() + 120
    while any(p.is_file() for p in hostile.drop.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p.name for p in hostile.drop.iterdir() if p.is_file()], "dropped files left unprocessed"
    assert hostile.daemon.wait_idle(60)

    rejected = hostile.drop / "rejected"
    failures = []
    for case in cases:
        for i in range(len(case.files)):
            file_name = f"{case.name}-{i:03d}.dcm"
            reason_file = rejected / (file_name + ".reason.txt")
            if case.drop.startswith("rejected"):
                # The reason itself is checked through Intake.accept_file below: DropFolder.ingest still parses
                # with pydicom first, and pydicom's refusal wins where it comes first.
                if not (reason_file.is_file() and (rejected / file_name).is_file()):
                    failures.append(f"{file_name}: not moved to rejected/ with a reason")
            elif reason_file.exists():
                failures.append(f"{file_name}: rejected ({reason_file.read_text().strip()}), expected accepted")
        if case.drop == "accepted":
            try:
                assert_recorded(hostile, case)
            except AssertionError as exc:
                failures.append(f"{case.name}: {exc}")
    assert not failures, "\n".join(failures)
    new_series = {e for e in hostile.spool_entries() - before if "/" not in e and not e.startswith(".")}
    assert new_series == {c.series_uid for c in cases if c.drop == "accepted"}


@pytest.mark.parametrize("case", drop_folder_cases("file"), ids=lambda c: c.name)
def test_intake_accept_file(hostile, case):
    """Intake.accept_file (what the drop folder is to call): the size is checked before reading, the structure
    before parsing; no allocation from a lying length or a deflate bomb; the reason says what is wrong."""
    paths = []
    for i, data in enumerate(case.files):
        paths.append(hostile.corpus / f"file-{case.name}-{i:03d}.dcm")
        paths[-1].write_bytes(data)
    before = hostile.spool_entries()
    outcomes = []
    tracemalloc.start()
    try:
        for path in paths:
            try:
                hostile.daemon.intake.accept_file(path)
                outcomes.append("accepted")
            except InstanceRejected as exc:
                outcomes.append(f"rejected: {exc.reason}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (outcome,) = set(outcomes)
    if case.drop == "accepted":
        assert outcome == "accepted"
        assert hostile.daemon.wait_idle(60)
        assert_recorded(hostile, case)
    else:
        assert outcome.startswith("rejected") and case.drop.removeprefix("rejected: ") in outcome, outcome
        assert hostile.spool_entries() == before
    assert peak < MEMORY_CEILING, f"{peak / 2**20:.1f} MiB traced"
    if case.claimed_bytes:
        assert peak < case.claimed_bytes / 5
    assert hostile.daemon.wait_idle(60)


def test_drop_folder_reads_files_within_bounds(hostile):
    cases = {c.name: c for c in drop_folder_cases("bounds")}
    folder = hostile.drop
    tracemalloc.start()
    try:
        for name in ("huge_length_private_ob", "deflate_bomb"):
            hostile.daemon.drop_folder.ingest(_write(folder / "bounds" / f"{name}.dcm", cases[name].files[0]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_CEILING, f"{peak / 2**20:.0f} MiB traced"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_well_formed_instances_in_every_little_endian_syntax_pass_the_checks(hostile, syntax):
    """The encoding checks refuse nothing well formed: a deflated dataset within the limit, implicit VR."""
    series = small_series(f"syntax-{syntax}", "ok", slices=3)
    files = []
    for ds in series:
        ds.file_meta.TransferSyntaxUID = syntax
        files.append(encode(ds, deflated=syntax == DeflatedExplicitVRLittleEndian))
    assert send_files(files, hostile.daemon.port, hostile.corpus, f"syntax-{syntax}") == [0, 0, 0]
    assert hostile.daemon.wait_idle(60)
    (row,) = hostile.rows(str(series[0].SeriesInstanceUID))
    assert row.status is SeriesStatus.SKIPPED and "only 3 slices" in row.reason and row.instances == 3


def test_walker_limits(monkeypatch):
    """The element-count and nesting caps, and a few encodings pydicom tolerates that must not be refused."""
    import struct

    from qc_daemon import dicom_bytes

    element = struct.pack("<HH", 0x0009, 0x1001) + b"LO" + struct.pack("<H", 2) + b"ab"
    dicom_bytes.check_dataset(element * 1000, implicit=False, little=True)
    monkeypatch.setattr(dicom_bytes, "MAX_ELEMENTS", 999)
    with pytest.raises(dicom_bytes.MalformedDataset, match="more than 999 elements"):
        dicom_bytes.check_dataset(element * 1000, implicit=False, little=True)
    dicom_bytes.check_dataset(element + b"\x00\x00\x00", implicit=False, little=True)  # trailing zero padding
    with pytest.raises(dicom_bytes.MalformedDataset, match="truncated"):
        dicom_bytes.check_dataset(element + b"\x01\x00\x00", implicit=False, little=True)
    # Explicit VR expected, implicit found in the first element: pydicom switches, and so does the walker.
    implicit = struct.pack("<HHI", 0x0008, 0x0060, 2) + b"MR"
    dicom_bytes.check_dataset(implicit, implicit=False, little=True)
    with pytest.raises(dicom_bytes.DatasetTooLarge):
        dicom_bytes.inflate(zlib_raw(bytes(10_000)), limit=9_999)
    assert dicom_bytes.inflate(zlib_raw(bytes(10_000)), limit=10_000) == bytes(10_000)


def test_series_pixel_data_stays_on_disk_and_oversized_series_fail(tmp_path, monkeypatch):
    """Reading a spooled series parses headers only (native pixel data is read when the volume is built), and a
    series whose files are too large is read without pixel data and fails with the reason."""
    from dicom_factory import write_series

    from qc_daemon import series as series_module
    from qc_daemon.series import SeriesFailed, classify, read_series

    paths = write_series(classic_series(phantom((256, 256, 16))), tmp_path / "s")  # 128 KiB slices
    spooled = read_series("1.2.3", paths)
    assert not spooled.unreadable and spooled.too_large is None
    assert all(ds.get_item("PixelData", keep_deferred=True).value is None for ds in spooled.datasets)

    monkeypatch.setattr(series_module, "MAX_SERIES_FILE_BYTES", 10 * 2**10)
    spooled = read_series("1.2.3", paths)
    assert all("PixelData" not in ds for ds in spooled.datasets)
    with pytest.raises(SeriesFailed, match="the series' 16 files hold"):
        classify(spooled, min_slices=16)


def zlib_raw(data: bytes) -> bytes:
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss_kib() -> int:
    """Reset this process's peak resident size (VmHWM) to its current size; returns that size in KiB.

    (``getrusage``'s ``ru_maxrss`` is the lifetime peak: a bigger earlier test would hide any growth here.)
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def test_resident_memory_stayed_bounded(hostile):
    grown_mib = (_status_kib("VmHWM") - hostile.rss_start_kib) / 1024
    assert grown_mib < 512, f"max RSS grew by {grown_mib:.0f} MiB while taking the corpus"


def test_still_scores_a_good_series_and_wrote_nothing_outside_its_state(hostile):
    series = classic_series(phantom((48, 48, 20)), spacing_mm=(2.0, 2.0, 2.0))
    assert send_datasets(series, hostile.daemon.port) == [0] * 20
    assert hostile.daemon.wait_idle(120)
    (row,) = hostile.rows(str(series[0].SeriesInstanceUID))
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.score == pytest.approx(min(1.0, max(0.0, float(np.mean(row.patch_scores)))))

    # Every file under the daemon's tree is in its state folder, or a refused file kept in drop/rejected/.
    outside = [p for p in hostile.root.rglob("*") if p.is_file()
               and not p.is_relative_to(hostile.state) and not p.is_relative_to(hostile.drop / "rejected")]
    assert not outside
    assert {p.name for p in hostile.state.iterdir()} <= {"spool", "archive", "results", "qc.sqlite3", "qc.sqlite3-wal",
                                                         "qc.sqlite3-shm"}
    spool = hostile.daemon.spool.root
    assert not any(p.stat().st_size for p in hostile.daemon.spool.incoming.iterdir())  # only files made ahead
    for entry in spool.iterdir():
        if entry.name == ".incoming":
            continue
        assert entry.is_dir() and not entry.is_symlink() and check_uid(entry.name, "dir") == entry.name
        for instance in entry.iterdir():
            assert instance.is_file() and instance.suffix == ".dcm" and check_uid(instance.stem, "file")
    for crafted in ("/tmp/qc-hostile-absolute-net", "/tmp/qc-hostile-absolute-drop", "/tmp/qc-hostile-sop",
                    "/tmp/qc-hostile-sop2", "/tmp/qc-hostile-sop.dcm", "/tmp/qc-hostile-sop2.dcm"):
        assert not Path(crafted).exists()


def test_receiving_to_disk_answers_as_from_memory_and_keeps_a_large_instance_out_of_memory(daemon_factory, tmp_path):
    """``dicom.receive_to_disk``: pynetdicom writes each dataset to a temporary file as it arrives and the intake
    reads it through a map. The statuses are those of the in-memory path, the spooled file is the one sent (with
    the calling AE in its meta), and an 18 MiB instance costs the daemon a small fraction of its size in traced
    memory (sent by DCMTK from another process: pynetdicom's own sender reads the whole file)."""
    import subprocess

    from dcmtk_tools import dcmtk_tool
    from hostile_corpus import split
    from pydicom import dcmread

    daemon = daemon_factory(dicom={"max_instance_mb": 32, "receive_to_disk": True})
    try:
        for name in ("truncated_in_pixel_data", "huge_length_pixel_data", "series_uid_dotdot", "sop_instance_mismatch",
                     "deflate_bomb", "duplicates"):
            case = NETWORK[name]
            assert send_files(case.files, daemon.port, tmp_path, name) == [case.status] * len(case.files), name

        storescu = dcmtk_tool("storescu")
        if storescu is None:
            pytest.skip("DCMTK storescu not installed")
        (big,) = small_series("received_to_disk", "disk", slices=1)
        big.Rows = big.Columns = 3000
        big.PixelData = np.full((3000, 3000), 7, np.uint16).tobytes()
        sent = tmp_path / "big.dcm"
        sent.write_bytes(encode(big))
        tracemalloc.start()
        try:
            subprocess.run([storescu, "-aet", "BIG_SCU", "-aec", "QC_DAEMON", "127.0.0.1", str(daemon.port), str(sent)],
                           check=True, capture_output=True, timeout=120)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        size = sent.stat().st_size
        assert peak < size / 4, f"{peak / 2**20:.1f} MiB traced for a {size / 2**20:.0f} MiB instance"
        spooled = daemon.spool.series_dir(str(big.SeriesInstanceUID)) / f"{big.SOPInstanceUID}.dcm"
        assert split(spooled.read_bytes())[1] == split(sent.read_bytes())[1]
        assert dcmread(spooled, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle == "BIG_SCU"
    finally:
        _config.STORE_RECV_CHUNKED_DATASET = False  # pynetdicom's switch is process-wide: back to the default


def test_odd_patient_values_never_reach_the_log_when_a_series_is_read(tmp_path):
    """pydicom quotes a value it doubts in its warning (and its logger): reading a series and judging it (the
    phantom check reads the patient name and ID) must not emit one, to the log or to stderr (the journal)."""
    import subprocess
    import sys

    from dicom_factory import write_series
    from pydicom import config

    datasets = classic_series(phantom((16, 16, 4)))
    with config.disable_value_validation():
        for ds in datasets:
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = "NAME\x02CTRL^X", "ID\x01CTRL", "19991399"
    paths = write_series(datasets, tmp_path / "s")
    child = f"""
import datetime as dt, sys
from pathlib import Path
from qc_daemon.logs import configure_logging
from qc_daemon.settings import LoggingSettings
configure_logging(LoggingSettings(format="json", level="debug"), stream=sys.stdout)
from qc_daemon.series import classify, read_series, series_facts
paths = [Path(p) for p in {[str(p) for p in paths]!r}]
series = read_series("1.2.3", paths)
print("modality=" + series_facts(series, len(paths), dt.datetime(2024, 1, 1)).modality)
for ds in series.datasets:
    str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)
try:
    classify(series, min_slices=2, phantom_keywords=["phantom"])
except Exception as exc:
    print(type(exc).__name__)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "modality=MR" in done.stdout.splitlines()
    for secret in ("CTRL", "19991399"):
        assert secret not in done.stdout + done.stderr
