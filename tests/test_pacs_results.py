"""Results back in PACS: the SR and the montage SC (read back by pydicom and DCMTK), and their delivery from the
outbox to a real storage SCP (pynetdicom) that is up, down, refusing, restarted around, or behind mutual TLS.
The end to end test with a real Orthanc is in test_orthanc.py."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings, send_datasets
from dcmtk_tools import dcmtk_tool
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, classic_series, phantom, tissue_phantom
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt

from qc_daemon.cli import main
from qc_daemon.pacs_report import (
    MANUFACTURER,
    BuiltResult,
    ModelIdentity,
    ResultBuildError,
    ResultFacts,
    ResultKind,
    build_results,
    own_result_kind,
    reference_dataset,
    scrub_patient_data,
)
from qc_daemon.pacs_sender import PermanentDeliveryError, ResultSender, TransientDeliveryError, classify_status
from qc_daemon.series import SeriesSkipped, classify, read_series
from qc_daemon.service import Daemon
from qc_daemon.settings import SettingsError, settings_from_dict
from qc_daemon.store import (
    ALERT_CHANNELS,
    RESULT_CHANNELS,
    AlertChannel,
    AlertState,
    SeriesStatus,
    Store,
    alerts_for,
    revisions,
    utcnow,
)

SCORE_CODE = "QC-SCORE"
# highdicom's doubt about a one-component name (the real series' "HFS"): silenced in the daemon, shown by pytest
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


# ---- the objects ---------------------------------------------------------------------------------------------


def _facts(series, score=0.42, scored_at=dt.datetime(2024, 5, 6, 7, 8, 9), iqms=None) -> ResultFacts:
    return ResultFacts(
        series_instance_uid=str(series[0].SeriesInstanceUID),
        revision=1,
        scored_at=scored_at,
        series_description="T1 MPRAGE SAG",
        score=score,
        threshold=0.5,
        iqms={"snr_total": 12.5, "cnr": None, "noise_sigma": 3.25} if iqms is None else iqms,
        model=ModelIdentity("hysnet-r18-3d-hyper", "ab" * 32, "motion artefacts"),
        device_name="QC_DAEMON",
        model_score=0.61,
        ghost_ratio=0.0825,
        spike_amplitude=0.041,
    )


def _png(path: Path, seed: int = 0) -> Path:
    rgba = np.random.default_rng(seed).integers(0, 256, (90, 120, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(path)
    return path


def _built(tmp_path, series, facts=None, folder="out") -> dict[ResultKind, BuiltResult]:
    facts = facts or _facts(series)
    built = build_results(list(ResultKind), series, facts, _png(tmp_path / "montage.png"), tmp_path / folder)
    assert all(isinstance(b, BuiltResult) for b in built.values()), built
    return built


def _items(content, found=None) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    found = [] if found is None else found
    for item in content:
        found.append(item)
        _items(item.get("ContentSequence", []), found)
    return found


def test_report_is_a_tid1500_enhanced_sr_in_the_scored_study(tmp_path):
    series = classic_series(phantom((32, 32, 20)))
    built = _built(tmp_path, series)[ResultKind.REPORT]
    sr = dcmread(built.path)
    source = series[0]

    assert sr.SOPClassUID == EnhancedSRStorage and sr.Modality == "SR"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (built.sop_instance_uid, built.series_instance_uid)
    assert sr.StudyInstanceUID == source.StudyInstanceUID != sr.SeriesInstanceUID
    # The patient and study modules come from the scored series: the PACS files the report with its images.
    assert (sr.PatientName, sr.PatientID, sr.PatientBirthDate) == (PATIENT_NAME, PATIENT_ID, BIRTH_DATE)
    assert (sr.Manufacturer, sr.ManufacturerModelName) == (MANUFACTURER, MANUFACTURER)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # The evidence names the scored series and each of its instances.
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (referenced,) = study.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedSOPSequence} == {ds.SOPInstanceUID
                                                                                       for ds in series}
    items = _items(sr.ContentSequence)
    numbers = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
               for i in items if i.ValueType == "NUM"}
    assert numbers == {SCORE_CODE: 0.42, "QC-THRESHOLD": 0.5, "QC-MODEL-SCORE": 0.61, "QC-N2-GHOST": 0.0825,
                       "QC-SPIKE": 0.041, "SNR-TOTAL": 12.5, "NOISE-SIGMA": 3.25}  # cnr: null
    (verdict,) = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "QC-RESULT"]
    assert verdict.ConceptCodeSequence[0].CodeValue == "QC-BELOW"  # 0.42 < 0.5
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in items if i.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == "hysnet-r18-3d-hyper"
    assert texts["Algorithm Version"] == "sha256:" + "ab" * 32
    # No patient identity anywhere in the content tree (only in the patient module).
    tree = str(sr.ContentSequence)
    assert not any(secret in tree for secret in (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE))
    assert all(len(i.ConceptNameCodeSequence[0].CodeMeaning) <= 64 for i in items)


@pytest.mark.dcmtk
def test_dcmtk_reads_the_report(tmp_path):
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump is None:
        pytest.skip("DCMTK's dsrdump is not installed")
    series = classic_series(phantom((32, 32, 20)))
    report = _built(tmp_path, series, _facts(series, score=0.91))[ResultKind.REPORT]
    done = subprocess.run([dsrdump, "-Ec", str(report.path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Enhanced SR Document" in done.stdout
    assert '"Image quality score (0 to 1, 1 = best)")="0.91"' in done.stdout
    assert 'QC-PASSED,99QCD,"Passed: score at or above the threshold"' in done.stdout
    assert "error" not in done.stderr.lower()


def test_montage_is_a_secondary_capture_of_the_png_in_the_scored_study(tmp_path):
    series = classic_series(phantom((32, 32, 20)))
    built = _built(tmp_path, series)[ResultKind.MONTAGE]
    sc = dcmread(built.path)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SOPInstanceUID == built.sop_instance_uid
    assert sc.StudyInstanceUID == series[0].StudyInstanceUID
    assert (sc.PatientName, sc.PatientID) == (PATIENT_NAME, PATIENT_ID)
    assert (sc.Manufacturer, sc.ManufacturerModelName) == (MANUFACTURER, MANUFACTURER)
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SeriesDescription == "QC montage T1 MPRAGE SAG"
    expected = np.asarray(Image.open(tmp_path / "montage.png").convert("RGB"))
    assert np.array_equal(sc.pixel_array, expected)


def test_uids_are_derived_from_the_result_row(tmp_path):
    series = classic_series(phantom((32, 32, 20)))
    first = _built(tmp_path, series, folder="a")
    again = _built(tmp_path, series, folder="b")
    rescored = _built(tmp_path, series, _facts(series, scored_at=dt.datetime(2024, 5, 6, 7, 8, 10)), folder="c")
    for kind in ResultKind:
        assert first[kind].sop_instance_uid == again[kind].sop_instance_uid != rescored[kind].sop_instance_uid
        assert first[kind].series_instance_uid == again[kind].series_instance_uid
        assert first[kind].sop_instance_uid.startswith("2.25.") and len(first[kind].sop_instance_uid) <= 64
    assert first[ResultKind.REPORT].series_instance_uid != first[ResultKind.MONTAGE].series_instance_uid


def test_a_sloppy_header_still_gives_results_and_a_missing_study_does_not(tmp_path):
    series = classic_series(phantom((32, 32, 20)))
    for ds in series:  # the factory leaves out PatientSex, AccessionNumber, StudyTime...; these two are invalid
        ds.PatientSex = "X"
        ds.PatientBirthDate = "1970-13-45"
    built = _built(tmp_path, series)
    sr = dcmread(built[ResultKind.REPORT].path)
    assert sr.PatientSex == "" and sr.PatientBirthDate == "" and sr.AccessionNumber == ""
    assert series[0].PatientSex == "X"  # the source is not changed

    del series[0].StudyInstanceUID
    with pytest.raises(ResultBuildError, match="no StudyInstanceUID"):
        reference_dataset(series[0])
    failed = build_results(list(ResultKind), series, _facts(series), None, tmp_path / "none")
    assert "no StudyInstanceUID" in str(failed[ResultKind.REPORT])
    assert all(isinstance(v, ResultBuildError) for v in failed.values())


def test_errors_are_scrubbed_of_patient_identity():
    source = classic_series(phantom((8, 8, 2)))[0]
    message = f"cannot convert '{BIRTH_DATE}' for Doe^Jane^Secret ({PATIENT_ID}); Jane said"
    scrubbed = scrub_patient_data(message, source)
    assert not any(secret in scrubbed for secret in (BIRTH_DATE, "Doe", "Jane", PATIENT_ID))
    assert scrubbed.startswith("cannot convert '<patient data>' for <patient data>")


def test_own_results_are_recognised_and_never_scored(tmp_path):
    series = classic_series(phantom((32, 32, 20)))
    built = _built(tmp_path, series)
    report, montage = dcmread(built[ResultKind.REPORT].path), dcmread(built[ResultKind.MONTAGE].path)
    assert (own_result_kind(report), own_result_kind(montage), own_result_kind(series[0])) == ("SR", "SC", None)
    for kind, result in built.items():
        name = "SR" if kind is ResultKind.REPORT else "SC"
        with pytest.raises(SeriesSkipped, match=rf"^own result \(qc-daemon {name}\): never scored or sent again$"):
            classify(read_series(result.series_instance_uid, [result.path]), min_slices=16)

    montage.Manufacturer = "Other Vendor"  # someone else's secondary capture: skipped for its SOP class
    other = tmp_path / "other.dcm"
    montage.save_as(other)
    assert own_result_kind(montage) is None
    with pytest.raises(SeriesSkipped, match="not an MR image series"):
        classify(read_series(str(montage.SeriesInstanceUID), [other]), min_slices=16)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0x0000, None), (0xB000, "stored with warning 0xB000"), (0x0107, "stored with warning 0x0107"),
     (0xA700, TransientDeliveryError), (0xA7FF, TransientDeliveryError), (0x0110, TransientDeliveryError),
     (None, TransientDeliveryError), (0xA900, PermanentDeliveryError), (0xC000, PermanentDeliveryError),
     (0xC123, PermanentDeliveryError), (0x0122, PermanentDeliveryError)],
)
def test_c_store_statuses_decide_delivered_retry_or_failed(status, outcome):
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            classify_status(status)
    else:
        assert classify_status(status) == outcome


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"destination": "PACS"}, "results.destination = 'PACS': expected AE_TITLE@host:port"),
        ({"destination": "PACS@pacs"}, "results.destination = 'PACS@pacs'"),
        ({"destination": "PACS@pacs:0"}, "port '0': expected 1 to 65535"),
        ({"destination": "PACS@pacs:70000"}, "port '70000'"),
        ({"destination": "A_TITLE_THAT_IS_TOO_LONG@pacs:104"}, "AE title 'A_TITLE_THAT_IS_TOO_LONG'"),
        ({"destination": "PACS@pacs:104", "send_report": False, "send_montage": False}, "nothing to send"),
        ({"calling_ae_title": " QC"}, "results.calling_ae_title = ' QC'"),
        ({"retry_initial_s": 10.0, "retry_max_s": 1.0}, "results.retry_initial_s = 10.0"),
        ({"tls_ca_file": "/etc/hostname"}, "results.tls_ca_file = '/etc/hostname': needs results.tls = true"),
        ({"tls": True, "tls_ca_file": "/etc/hostname"}, "results.tls_ca_file = '/etc/hostname': cannot load"),
        ({"tls": True, "tls_cert_file": "/etc/hostname"}, "must be set together"),
        ({"tls": True, "tls_ca_file": "/nonexistent/ca.pem"}, "no such file"),
        ({"timeout_s": 0}, "results.timeout_s = 0"),
    ],
)
def test_results_settings_name_key_and_value(values, named):
    with pytest.raises(SettingsError) as info:
        settings_from_dict({"results": values})
    assert named in str(info.value)


def test_results_settings_accept_a_destination():
    results = settings_from_dict({"results": {"destination": "PACS_1@[fd00::5]:104"}}).results
    assert results.enabled and not settings_from_dict({}).results.enabled
    target = results.target
    assert (target.ae_title, target.host, target.port, str(target)) == ("PACS_1", "fd00::5", 104,
                                                                        "PACS_1@[fd00::5]:104")


# ---- delivery ------------------------------------------------------------------------------------------------


class StorageScp:
    """A pynetdicom storage SCP on loopback standing in for the PACS: keeps what it stores, answers ``status``."""

    def __init__(self, port: int = 0, status: int = 0x0000, ssl_context: ssl.SSLContext | None = None):
        self.status = status
        self.received: list[Dataset] = []
        self.calling_aets: list[str] = []
        ae = AE("PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.calling_aets.append(event.assoc.requestor.ae_title)
        if self.status == 0x0000:
            self.received.append(event.dataset)
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scp():
    servers: list[StorageScp] = []

    def start(**kwargs) -> StorageScp:
        servers.append(StorageScp(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _results(port: int, **more) -> dict:
    return {"destination": f"PACS@127.0.0.1:{port}", "retry_initial_s": 0.1, "retry_max_s": 0.3, "timeout_s": 5.0,
            **more}


def _wait_for(condition, timeout_s: float = 60.0):
    """Poll until ``condition()`` is truthy (returns it) or the deadline passes (returns the last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _outbox(daemon, uid: str, channels=RESULT_CHANNELS) -> dict[AlertChannel, object]:
    return _outbox_in(daemon.store, uid, channels)


def _outbox_in(store, uid: str, channels=RESULT_CHANNELS) -> dict[AlertChannel, object]:
    with store.session() as session:
        (row,) = revisions(session, uid)
        return {a.channel: a for a in alerts_for(session, row.id, channels)}


def _states(daemon, uid: str) -> dict[str, str]:
    return {channel.value: alert.state.value for channel, alert in _outbox(daemon, uid).items()}


def _score_series(daemon, volume_shape=(48, 48, 20), **kwargs) -> str:
    series = classic_series(tissue_phantom(volume_shape), **kwargs)
    assert send_datasets(series, daemon.port) == [0] * len(series)
    assert daemon.wait_idle(60)
    return str(series[0].SeriesInstanceUID)


def _metric(daemon, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(daemon.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_results_are_stored_once_in_the_scored_study(daemon_factory, scp, tmp_path, capsys, log_stream):
    pacs = scp()
    daemon = daemon_factory(results=_results(pacs.port), alerts={"threshold": 1.0}, http={"enabled": True, "port": 0},
                            scoring={"threads": 1})
    uid = _score_series(daemon)

    assert _wait_for(lambda: _states(daemon, uid) == {"pacs_report": "delivered", "pacs_montage": "delivered"}), \
        _states(daemon, uid)
    outbox = _outbox(daemon, uid)
    sent = {ds.SOPInstanceUID: ds for ds in pacs.received}
    assert set(sent) == {row.payload["sop_instance_uid"] for row in outbox.values()} and len(pacs.received) == 2
    assert all(row.attempts == 1 and row.last_error is None for row in outbox.values())
    report = sent[outbox[AlertChannel.PACS_REPORT].payload["sop_instance_uid"]]
    montage = sent[outbox[AlertChannel.PACS_MONTAGE].payload["sop_instance_uid"]]
    with daemon.store.session() as session:
        (row,) = revisions(session, uid)
    assert row.status is SeriesStatus.SCORED and row.below_threshold
    assert report.SOPClassUID == EnhancedSRStorage and montage.SOPClassUID == SecondaryCaptureImageStorage
    assert report.StudyInstanceUID == montage.StudyInstanceUID == row.study_instance_uid
    assert report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert set(pacs.calling_aets) == {"QC_DAEMON"}
    items = _items(report.ContentSequence)
    (score,) = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == SCORE_CODE]
    assert float(score.MeasuredValueSequence[0].NumericValue) == pytest.approx(row.score, abs=1e-6)
    assert Path(outbox[AlertChannel.PACS_REPORT].payload["file"]).parent == Path(row.montage_path).parent

    # Once per revision: nothing is due any more, the SCP got the two instances and nothing else.
    assert daemon.results.deliver_due() == 0 and len(pacs.received) == 2
    # Alerts stay alerts: the PACS rows are neither counted nor listed as alert deliveries.
    assert _outbox(daemon, uid, ALERT_CHANNELS) == {}
    assert _metric(daemon, "qc_alerts_pending") == 0 and _metric(daemon, "qc_results_pending") == 0
    config = tmp_path / "show.toml"
    config.write_text(f'[storage]\nstate_dir = "{daemon.settings.storage.state_dir}"\n')
    assert main(["--config", str(config), "show", uid, "--json"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["alerts"] == []
    assert {(d["channel"], d["state"], d["sop_instance_uid"]) for d in shown["pacs_results"]} == {
        (c.value, "delivered", a.payload["sop_instance_uid"]) for c, a in outbox.items()}
    assert main(["--config", str(config), "show", uid]) == 0
    text = capsys.readouterr().out
    assert "pacs_results" in text and "pacs_report   delivered 1 attempt" in text
    with urllib.request.urlopen(f"{daemon.web.url}/series/{uid}", timeout=10) as response:
        page = response.read().decode()
    assert "report (SR)" in page and "montage (SC)" in page
    assert outbox[AlertChannel.PACS_MONTAGE].payload["sop_instance_uid"] in page
    logs = log_stream.getvalue()
    assert '"result_delivered"' in logs
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, BIRTH_DATE):
        assert secret not in logs


def test_a_destination_that_is_down_delays_delivery_never_scoring(daemon_factory, scp):
    port = _free_port()
    daemon = daemon_factory(results=_results(port), scoring={"threads": 1})
    uid = _score_series(daemon)

    with daemon.store.session() as session:
        (row,) = revisions(session, uid)
    assert row.status is SeriesStatus.SCORED and row.iqms is not None  # recorded while nothing is listening
    assert _wait_for(lambda: all(a.attempts >= 2 for a in _outbox(daemon, uid).values()))
    for alert in _outbox(daemon, uid).values():
        assert alert.state is AlertState.PENDING and "no association" in alert.last_error
    assert _metric(daemon, "qc_results_pending") == 2 and _metric(daemon, "qc_alerts_pending") == 0

    pacs = scp(port=port)
    assert _wait_for(lambda: set(_states(daemon, uid).values()) == {"delivered"}), _states(daemon, uid)
    assert sorted(ds.SOPClassUID for ds in pacs.received) == [SecondaryCaptureImageStorage, EnhancedSRStorage]


def test_pending_results_are_sent_after_a_restart_with_the_same_uids(tmp_path, scp):
    port = _free_port()
    settings = make_settings(tmp_path, results=_results(port), scoring={"threads": 1})
    first = Daemon(settings, tick_s=0.05)
    first.start()
    try:
        uid = _score_series(first)
        assert _wait_for(lambda: all(a.attempts >= 1 for a in _outbox(first, uid).values()))
        queued = {c: a.payload["sop_instance_uid"] for c, a in _outbox(first, uid).items()}
    finally:
        first.stop()

    # One pass stops at a destination that cannot be reached: the other result is not tried against it too.
    store = Store(settings.storage.database)
    try:
        before = {c: a.attempts for c, a in _outbox_in(store, uid).items()}
        sender = ResultSender(store, settings.results, settings.dicom.ae_title)
        assert sender.deliver_due(now=utcnow() + dt.timedelta(hours=1)) == 0
        after = {c: a.attempts for c, a in _outbox_in(store, uid).items()}
        assert sorted(after[c] - before[c] for c in after) == [0, 1]
    finally:
        store.close()

    pacs = scp(port=port)
    second = Daemon(settings, tick_s=0.05)
    second.start()
    try:
        assert _wait_for(lambda: set(_states(second, uid).values()) == {"delivered"}), _states(second, uid)
        assert sorted(ds.SOPInstanceUID for ds in pacs.received) == sorted(queued.values())
        with second.store.session() as session:
            assert [r.revision for r in revisions(session, uid)] == [1]  # not scored again
    finally:
        second.stop()


def test_out_of_resources_is_retried_and_a_refusal_fails_for_good(daemon_factory, scp):
    pacs = scp(status=0xA700)
    daemon = daemon_factory(results=_results(pacs.port), scoring={"threads": 1})
    uid = _score_series(daemon)
    assert _wait_for(lambda: all(a.attempts >= 2 for a in _outbox(daemon, uid).values()))
    assert {a.last_error for a in _outbox(daemon, uid).values()} == {"failed with status 0xA700"}
    pacs.status = 0x0000
    assert _wait_for(lambda: set(_states(daemon, uid).values()) == {"delivered"}), _states(daemon, uid)
    assert len(pacs.received) == 2

    pacs.status = 0xC000
    refused = _score_series(daemon)
    assert _wait_for(lambda: set(_states(daemon, refused).values()) == {"failed"}), _states(daemon, refused)
    assert daemon.results.deliver_due() == 0
    for alert in _outbox(daemon, refused).values():
        assert alert.attempts == 1 and alert.last_error == "refused with status 0xC000"
    assert _metric(daemon, "qc_results_failed") == 2


def test_only_the_enabled_objects_are_sent(daemon_factory, scp):
    pacs = scp()
    daemon = daemon_factory(results=_results(pacs.port, send_montage=False), scoring={"threads": 1})
    uid = _score_series(daemon)
    assert _wait_for(lambda: _states(daemon, uid) == {"pacs_report": "delivered"}), _states(daemon, uid)
    assert [ds.SOPClassUID for ds in pacs.received] == [EnhancedSRStorage]


def test_nothing_is_built_or_sent_by_default(daemon_factory):
    daemon = daemon_factory(scoring={"threads": 1})
    uid = _score_series(daemon)
    assert _outbox(daemon, uid) == {} and not daemon.results._thread.is_alive()
    with daemon.store.session() as session:
        (row,) = revisions(session, uid)
    assert row.montage_path and not list(Path(row.montage_path).parent.glob("*.dcm"))


def test_results_go_over_mutual_tls(daemon_factory, scp, tmp_path):
    pytest.importorskip("cryptography")
    from test_access_control import Pki

    pki = Pki(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=pki.ca_cert)
    pacs = scp(ssl_context=server)
    tls = {"tls": True, "tls_ca_file": str(pki.ca_cert)}
    mutual = {**tls, "tls_cert_file": str(pki.client_cert), "tls_key_file": str(pki.client_key)}

    without_certificate = Daemon(make_settings(tmp_path / "no-cert", results=_results(pacs.port, **tls),
                                               scoring={"threads": 1}), tick_s=0.05)
    without_certificate.start()
    try:
        refused = _score_series(without_certificate)
        assert _wait_for(lambda: all(a.attempts >= 1 for a in _outbox(without_certificate, refused).values()))
        assert set(_states(without_certificate, refused).values()) == {"pending"} and pacs.received == []
    finally:
        without_certificate.stop()

    daemon = daemon_factory(results=_results(pacs.port, **mutual), scoring={"threads": 1})
    uid = _score_series(daemon)
    assert _wait_for(lambda: set(_states(daemon, uid).values()) == {"delivered"}), _states(daemon, uid)
    assert len(pacs.received) == 2


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["philips_elitionx_t1_mprage_3d", "siemens_xa30_t1_tfl_jpeglossless_phantom",
                                  "siemens_xa30_t1_tfl_enhanced_phantom", "siemens_prisma_t1_2d_sag"])
def test_real_scanner_headers_give_both_objects(tmp_path, name):
    from conftest import shared_data

    folder = shared_data("dicom", name)
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    series = classify(read_series("real", paths), min_slices=16)
    facts = _facts(series.datasets)
    built = build_results(list(ResultKind), series.datasets, facts, _png(tmp_path / "montage.png"), tmp_path / "out")
    assert all(isinstance(b, BuiltResult) for b in built.values()), built
    sr = dcmread(built[ResultKind.REPORT].path)
    assert sr.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(referenced.ReferencedSOPSequence) == len(series.datasets)
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump is not None:
        done = subprocess.run([dsrdump, str(built[ResultKind.REPORT].path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr


def test_odd_patient_values_go_out_verbatim_and_never_into_logs(tmp_path):
    """Values pydicom or highdicom doubt (a one-component name, a control character in an ID, an impossible
    birth date) are quoted in their warnings: building the objects must not emit one, to the log or stderr."""
    from pydicom import config

    source = classic_series(phantom((16, 16, 2)))[0]
    with config.disable_value_validation():
        source.PatientName, source.PatientID, source.PatientBirthDate = "SINGLENAME", "ID\x01CTRL", "19991399"
        source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    child = f"""
import datetime as dt, io, sys
from pathlib import Path
from qc_daemon.logs import configure_logging
from qc_daemon.settings import LoggingSettings
configure_logging(LoggingSettings(format="json", level="debug"), stream=sys.stdout)
from qc_daemon.pacs_report import ModelIdentity, ResultFacts, ResultKind, build_results
from qc_daemon.series import read_instance
ds = read_instance(Path({str(tmp_path / "source.dcm")!r}))
facts = ResultFacts(str(ds.SeriesInstanceUID), 1, dt.datetime(2024, 1, 1), None, 0.5, 0.5, {{}},
                    ModelIdentity("m", "0" * 64, "l"), "QC")
built = build_results([ResultKind.REPORT], [ds], facts, None, Path({str(tmp_path / "out")!r}))
print(type(built[ResultKind.REPORT]).__name__)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "BuiltResult"
    for secret in ("SINGLENAME", "CTRL", "19991399"):
        assert secret not in done.stdout + done.stderr
    sr = dcmread(tmp_path / "out" / "report.dcm")
    assert (str(sr.PatientName), sr.PatientID) == ("SINGLENAME", "ID\x01CTRL")  # as the PACS knows them
    assert sr.PatientBirthDate == ""  # highdicom refuses an impossible date: left empty


def test_the_conformance_statement_lists_what_the_daemon_sends():
    from qc_daemon.pacs_sender import TRANSFER_SYNTAXES

    text = (Path(__file__).resolve().parents[1] / "deploy" / "CONFORMANCE.md").read_text()
    overview = text.split("## 2.", 1)[0]
    for sop_class in (EnhancedSRStorage, SecondaryCaptureImageStorage):
        assert re.search(rf"\| `{re.escape(sop_class)}` \| Yes \(`results\.send_", overview), sop_class.name
    scu = text.split("## 8. Storage SCU", 1)[1].split("## Appendix A", 1)[0]
    for uid in (*TRANSFER_SYNTAXES, EnhancedSRStorage, SecondaryCaptureImageStorage):
        assert f"`{uid}`" in scu, uid.name
    assert "own result (qc-daemon SR)" in scu


def test_check_config_says_where_results_go(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path}"\n[results]\ndestination = "PACS@10.1.2.3:104"\n'
                      'send_montage = false\ncalling_ae_title = "QC_RESULTS"\n')
    assert main(["--config", str(config), "check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == "SR to PACS@10.1.2.3:104 from QC_RESULTS"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path}"\n')
    assert main(["--config", str(config), "check-config"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == "disabled"


def test_a_node_sends_only_the_results_it_recorded(tmp_path):
    """Daemons sharing a database share the outbox, but a result's SR/SC files lie on the disk of the node that
    recorded it: only that node's sender may take the row (alerts, which carry their payload, stay shared)."""
    from qc_daemon.store import SeriesFacts, begin_revision, due_alerts, enqueue_alert

    store = Store(f"sqlite:///{tmp_path / 'qc.sqlite3'}")
    now = utcnow()
    with store.session() as session:
        for node in ("mr1:11112", "mr2:11112"):
            facts = SeriesFacts(f"1.2.3.{len(node)}{node[2]}", "1.2.3", None, None, "MR", None, None, None, 20, now)
            row = begin_revision(session, facts, node, now, now)
            enqueue_alert(session, row, AlertChannel.PACS_REPORT, {"file": f"/nowhere/{node}.dcm"})
            enqueue_alert(session, row, AlertChannel.WEBHOOK, {"series_instance_uid": facts.series_instance_uid})
        session.commit()
        later = now + dt.timedelta(seconds=1)
        mine = due_alerts(session, AlertChannel.PACS_REPORT, later, node_name="mr1:11112")
        assert [alert.payload["file"] for alert in mine] == ["/nowhere/mr1:11112.dcm"]
        assert len(due_alerts(session, AlertChannel.PACS_REPORT, later)) == 2
        assert len(due_alerts(session, AlertChannel.WEBHOOK, later)) == 2
    store.close()
