"""Interoperability with a real Orthanc (skipped when the Orthanc binary is absent).

Orthanc runs on loopback as a subprocess with the daemon registered as the DICOM modality "qcdaemon" (from
deploy/orthanc/qc-daemon.json): a series uploaded over REST is routed to the daemon by hand (REST store), by
the auto-routing Lua script from deploy/orthanc/, and Orthanc C-ECHOes the daemon. With [results] pointing at
Orthanc's DICOM port, the SR and montage come back into the study, and a study routed back is not rescored.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from dcmtk_tools import dcmtk_tool
from dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, classic_series, phantom, tissue_phantom
from pydicom.filebase import DicomBytesIO
from pydicom.uid import EnhancedSRStorage, SecondaryCaptureImageStorage

from qc_daemon.store import FINAL_STATUSES, SeriesStatus, alerts_for, revisions

pytestmark = pytest.mark.orthanc

ORTHANC = shutil.which("Orthanc")
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"
SNIPPET = DEPLOY / "qc-daemon.json"
LUA = DEPLOY / "qc-daemon-routing.lua"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

if ORTHANC is None:
    pytest.skip("Orthanc binary not installed", allow_module_level=True)


def load_snippet() -> dict:
    """deploy/orthanc/qc-daemon.json without its comment lines (Orthanc accepts them, json does not)."""
    lines = [line for line in SNIPPET.read_text().splitlines() if not line.lstrip().startswith("//")]
    return json.loads("\n".join(lines))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    def __init__(self, process: subprocess.Popen, http_port: int, log_path: Path, dicom_port: int):
        self.process = process
        self.url = f"http://127.0.0.1:{http_port}"
        self.log_path = log_path
        self.dicom_port = dicom_port

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, timeout: float = 60):
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/dicom" if path == "/instances" else "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def file(self, instance_id: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance_id}/file", timeout=60) as response:
            return response.read()

    def upload(self, datasets) -> str:
        """POST each instance to /instances; returns the Orthanc ID of their series."""
        series_ids = set()
        for ds in datasets:
            buffer = DicomBytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            answer = self.request("POST", "/instances", buffer.getvalue())
            assert answer["Status"] == "Success", answer
            series_ids.add(answer["ParentSeries"])
        (series_id,) = series_ids
        return series_id

    def jobs_settled(self) -> bool:
        jobs = self.request("GET", "/jobs?expand")
        return all(job["State"] in ("Success", "Failure") for job in jobs)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@pytest.fixture
def orthanc_factory(tmp_path):
    """start(daemon_port, lua=False, dicom_port=None): an Orthanc on loopback with the daemon as modality
    "qcdaemon", storing only from known modalities (DicomAlwaysAllowStore false) on ``dicom_port`` (None: any)."""
    started: list[Orthanc] = []

    def start(daemon_port: int, lua: bool = False, dicom_port: int | None = None) -> Orthanc:
        root = tmp_path / f"orthanc{len(started)}"
        root.mkdir()
        http_port = _free_port()
        modalities = load_snippet()["DicomModalities"]
        for entry in modalities.values():
            entry.update({"Host": "127.0.0.1", "Port": daemon_port})
        config = {
            "Name": "qc-daemon-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC",
            # Orthanc sends series to the daemon; its own DICOM port takes the daemon's results, from known
            # modalities only (the "qcdaemon" entry must allow it).
            "DicomPort": dicom_port or _free_port(),
            "DicomAlwaysAllowStore": False,
            "DicomModalities": modalities,
            "StableAge": 2,
            "LuaScripts": [str(LUA)] if lua else [],
            "Plugins": [],
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 1,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
        }
        config_path = root / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = root / "orthanc.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=root,
            )
        orthanc = Orthanc(process, http_port, log_path, config["DicomPort"])
        started.append(orthanc)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with {process.returncode}:\n{orthanc.log_tail()}")
            try:
                orthanc.request("GET", "/system", timeout=2)
                return orthanc
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc's REST API did not come up:\n{orthanc.log_tail()}")
                time.sleep(0.2)

    yield start
    for orthanc in started:
        if orthanc.process.poll() is None:
            orthanc.process.terminate()
            try:
                orthanc.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                orthanc.process.kill()
                orthanc.process.wait(timeout=15)


def _rows(daemon, uid: str):
    with daemon.store.session() as session:
        return list(revisions(session, uid))


def _wait_final_row(daemon, uid: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _rows(daemon, uid)
        if rows and rows[-1].status in FINAL_STATUSES:
            assert daemon.wait_idle(60)
            return _rows(daemon, uid)
        time.sleep(0.2)
    return _rows(daemon, uid)


def _light_daemon(daemon_factory):
    return daemon_factory(scoring={"threads": 1})


def test_rest_store_routes_a_series_to_the_daemon(daemon_factory, orthanc_factory):
    daemon = _light_daemon(daemon_factory)
    orthanc = orthanc_factory(daemon.port)
    series = classic_series(phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    series_id = orthanc.upload(series)

    try:
        answer = orthanc.request("POST", "/modalities/qcdaemon/store", {"Resources": [series_id], "Synchronous": True})
    except urllib.error.HTTPError as exc:
        pytest.fail(f"Orthanc store failed: {exc.read()!r}\n{orthanc.log_tail()}")
    assert answer["InstancesCount"] == 20 and answer["FailedInstancesCount"] == 0, answer

    assert len(daemon.spool.instance_paths(uid)) == 20
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, uid)
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.instances == 20
    assert row.calling_ae == "ORTHANC"
    assert 0.0 <= row.score <= 1.0


def test_lua_auto_routing_sends_stable_mr_series_only(daemon_factory, orthanc_factory):
    daemon = _light_daemon(daemon_factory)
    orthanc = orthanc_factory(daemon.port, lua=True)
    mr = classic_series(phantom((48, 48, 20)))
    ct = classic_series(phantom((48, 48, 20), seed=1))
    for ds in ct:
        ds.Modality = "CT"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    orthanc.upload(ct)
    orthanc.upload(mr)  # nothing else: the Lua script routes it once stable (StableAge 2 s)

    mr_uid, ct_uid = str(mr[0].SeriesInstanceUID), str(ct[0].SeriesInstanceUID)
    rows = _wait_final_row(daemon, mr_uid, timeout_s=90)
    assert rows, f"the daemon never received the MR series\n{orthanc.log_tail()}"
    (row,) = rows
    assert row.status is SeriesStatus.SCORED, row.reason
    assert row.instances == 20
    assert row.calling_ae == "ORTHANC"

    # Both series were stable at the same time; once Orthanc's jobs have settled the CT one must not be here.
    deadline = time.monotonic() + 30
    while not orthanc.jobs_settled() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert daemon.spool.instance_paths(ct_uid) == []
    assert _rows(daemon, ct_uid) == []


def test_orthanc_echoes_the_daemon(daemon_factory, orthanc_factory):
    daemon = _light_daemon(daemon_factory)
    orthanc = orthanc_factory(daemon.port)
    orthanc.request("POST", "/modalities/qcdaemon/echo", {})  # HTTP 200, else HTTPError

    # The daemon checks the called AE title (require_called_aet): a modality entry with the wrong AET fails.
    orthanc.request("PUT", "/modalities/wrongaet", {"AET": "NOT_QC_DAEMON", "Host": "127.0.0.1", "Port": daemon.port})
    with pytest.raises(urllib.error.HTTPError):
        orthanc.request("POST", "/modalities/wrongaet/echo", {})


def _outbox(daemon, uid: str) -> dict[str, object]:
    with daemon.store.session() as session:
        (row,) = revisions(session, uid)
        return {a.channel.value: a for a in alerts_for(session, row.id)}


def _wait(condition, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_results_land_in_the_study_and_a_study_routed_back_is_not_rescored(daemon_factory, orthanc_factory,
                                                                            tmp_path, log_stream):
    orthanc_dicom_port = _free_port()
    daemon = daemon_factory(scoring={"threads": 1}, results={
        "destination": f"ORTHANC@127.0.0.1:{orthanc_dicom_port}", "retry_initial_s": 0.5, "retry_max_s": 2.0})
    orthanc = orthanc_factory(daemon.port, dicom_port=orthanc_dicom_port)
    series = classic_series(tissue_phantom((48, 48, 20)))
    uid = str(series[0].SeriesInstanceUID)
    series_id = orthanc.upload(series)
    study_id = orthanc.request("GET", f"/series/{series_id}")["ParentStudy"]

    orthanc.request("POST", "/modalities/qcdaemon/store", {"Resources": [series_id], "Synchronous": True})
    delivered = _wait(lambda: bool(_rows(daemon, uid))
                      and {a.state.value for a in _outbox(daemon, uid).values()} == {"delivered"}, timeout_s=120)
    assert delivered, f"{ {c: (a.state, a.last_error) for c, a in _outbox(daemon, uid).items()} }\n{orthanc.log_tail()}"
    outbox = _outbox(daemon, uid)

    # In Orthanc: the MR series, and one SR and one SC instance, all in the one study.
    in_study = {s["MainDicomTags"]["Modality"]: s for s in orthanc.request("GET", f"/studies/{study_id}/series")}
    assert sorted(in_study) == ["MR", "OT", "SR"]
    sent = {}
    for modality in ("SR", "OT"):
        (instance_id,) = in_study[modality]["Instances"]
        tags = orthanc.request("GET", f"/instances/{instance_id}/simplified-tags")
        sent[tags["SOPClassUID"]] = (tags["SOPInstanceUID"], instance_id)
        assert tags["StudyInstanceUID"] == str(series[0].StudyInstanceUID)
        assert tags["PatientID"] == str(series[0].PatientID)  # filed under the patient of the scored series
    assert sent[EnhancedSRStorage][0] == outbox["pacs_report"].payload["sop_instance_uid"]
    assert sent[SecondaryCaptureImageStorage][0] == outbox["pacs_montage"].payload["sop_instance_uid"]
    dsrdump = dcmtk_tool("dsrdump")
    if dsrdump is not None:  # DCMTK reads the SR as Orthanc stored it
        report = tmp_path / "report.dcm"
        report.write_bytes(orthanc.file(sent[EnhancedSRStorage][1]))
        done = subprocess.run([dsrdump, str(report)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "Imaging Measurement Report" in done.stdout and "Image quality score" in done.stdout

    # Orthanc routes the whole study back: the T1 instances are duplicates, the SR and SC our own results.
    answer = orthanc.request("POST", "/modalities/qcdaemon/store", {"Resources": [study_id], "Synchronous": True})
    assert answer["InstancesCount"] == 22 and answer["FailedInstancesCount"] == 0, answer
    own = {outbox["pacs_report"].payload["result_series_instance_uid"]: "SR",
           outbox["pacs_montage"].payload["result_series_instance_uid"]: "SC"}
    for result_uid, kind in own.items():
        rows = _wait_final_row(daemon, result_uid, timeout_s=60)
        assert [(r.status, r.reason.split(":")[0]) for r in rows] == [(SeriesStatus.SKIPPED,
                                                                        f"own result (qc-daemon {kind})")]
        assert _outbox(daemon, result_uid) == {}  # skipped: no results of the results
    assert daemon.wait_idle(60)
    assert [r.revision for r in _rows(daemon, uid)] == [1]  # the T1 got no new revision
    assert daemon.results.deliver_due() == 0
    assert {c: a.attempts for c, a in _outbox(daemon, uid).items()} == {"pacs_report": 1, "pacs_montage": 1}
    in_study = orthanc.request("GET", f"/studies/{study_id}/series")
    assert sorted(len(s["Instances"]) for s in in_study) == [1, 1, 20]  # nothing was sent again
    logs = log_stream.getvalue()
    for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE):
        assert secret not in logs
