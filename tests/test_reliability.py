"""Lose nothing: crashes at any point, restarts, unreachable alert endpoints, several scanners at once."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import make_settings, send_datasets, spool_datasets
from dicom_factory import classic_series, phantom
from pynetdicom import AE

from qc_daemon.service import Daemon
from qc_daemon.store import AlertState, SeriesStatus, alerts_for, history, open_revision, revisions
from qc_daemon.series import read_series, series_facts

import datetime as dt


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_config(tmp_path: Path, port: int, quiet_period_s: float) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[storage]\nstate_dir = "{tmp_path / "state"}"\nmin_free_mb = 1\n'
        f"[assembly]\nquiet_period_s = {quiet_period_s}\n"
        f'[logging]\nformat = "json"\n'
    )
    return config


def _start_process(config: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "qc_daemon", "--config", str(config), "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if '"daemon_ready"' in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("daemon did not become ready")


def _rows(daemon: Daemon, uid: str):
    with daemon.store.session() as session:
        return list(revisions(session, uid))


def test_sigkill_mid_association_loses_no_acknowledged_instance(tmp_path):
    """Kill -9 while a scanner is sending: every instance that got a success status is scored after restart."""
    port = _free_port()
    config = _write_config(tmp_path, port, quiet_period_s=60)  # long: nothing is scored before the kill
    proc = _start_process(config)
    series = classic_series(phantom((40, 40, 30)))
    uid = str(series[0].SeriesInstanceUID)
    acknowledged = []
    ae = AE(ae_title="MR_KILLED")
    ae.add_requested_context(series[0].SOPClassUID, series[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="QC_DAEMON")
    assert assoc.is_established
    for i, ds in enumerate(series):
        if i == 20:
            proc.send_signal(signal.SIGKILL)  # mid-association
            proc.wait()
        if not assoc.is_established:
            break
        status = assoc.send_c_store(ds)
        if "Status" in status and status.Status == 0x0000:
            acknowledged.append(str(ds.SOPInstanceUID))
    assoc.abort()
    assert 20 <= len(acknowledged) < 30

    daemon = Daemon(make_settings(tmp_path, assembly={"quiet_period_s": 0.2}), tick_s=0.05)
    daemon.start()
    try:
        assert daemon.wait_idle(60)
        (row,) = _rows(daemon, uid)
        assert row.status is SeriesStatus.SCORED, row.reason
        assert row.instances == len(acknowledged)
        spooled = {p.stem for p in daemon.spool.instance_paths(uid)}
        assert spooled == set(acknowledged)
        assert row.calling_ae == "MR_KILLED"  # rebuilt from the spool alone
    finally:
        daemon.stop()


def test_sigkill_after_receipt_then_restart_scores_once(tmp_path):
    port = _free_port()
    config = _write_config(tmp_path, port, quiet_period_s=60)
    proc = _start_process(config)
    series = classic_series(phantom((40, 40, 20)))
    assert send_datasets(series, port) == [0] * 20
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    for _ in range(2):  # two restarts: the series is recorded once, not once per start
        daemon = Daemon(make_settings(tmp_path, assembly={"quiet_period_s": 0.2}), tick_s=0.05)
        daemon.start()
        assert daemon.wait_idle(60)
        rows = _rows(daemon, str(series[0].SeriesInstanceUID))
        daemon.stop()
        assert [(r.revision, r.status, r.instances) for r in rows] == [(1, SeriesStatus.SCORED, 20)]


def test_crash_mid_scoring_is_redone_under_the_same_revision(tmp_path):
    """A PENDING row (the process died while scoring) is completed, not duplicated, on the next start."""
    settings = make_settings(tmp_path)
    daemon = Daemon(settings, tick_s=0.05)  # not started: only its spool and store are used here
    series = classic_series(phantom((40, 40, 20)))
    uid = spool_datasets(daemon.spool, series)
    (daemon.spool.incoming / "rx-crashed.part").write_bytes(b"half an instance")
    with daemon.store.session() as session:
        facts = series_facts(read_series(uid, daemon.spool.instance_paths(uid)), 20, dt.datetime(2026, 1, 1))
        open_revision(session, facts)  # ...and then the process "dies" before recording the outcome
        session.commit()
    daemon.work.stop()
    daemon.store.close()

    restarted = Daemon(settings, tick_s=0.05)
    restarted.start()
    try:
        assert restarted.wait_idle(60)
        assert [(r.revision, r.status, r.instances) for r in _rows(restarted, uid)] == [(1, SeriesStatus.SCORED, 20)]
        leftovers = list(restarted.spool.incoming.iterdir())  # the unacknowledged partial file is gone;
        assert not any(p.stat().st_size for p in leftovers)  # what is there is empty, made ahead
        assert restarted.spool.incoming / "rx-crashed.part" not in leftovers
    finally:
        restarted.stop()


def test_alerts_survive_an_unreachable_endpoint_and_a_restart(tmp_path):
    port = _free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}/hook"
    sections = {"alerts": {"threshold": 1.0, "webhook_url": url, "retry_initial_s": 0.1, "retry_max_s": 0.2}}
    daemon = Daemon(make_settings(tmp_path, **sections), tick_s=0.05)
    daemon.start()
    series = classic_series(phantom((40, 40, 20)))
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, str(series[0].SeriesInstanceUID))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # let the dispatcher fail a few times
        with daemon.store.session() as session:
            (alert,) = alerts_for(session, row.id)
        if alert.attempts >= 2:
            break
        time.sleep(0.05)
    assert alert.state is AlertState.PENDING and alert.attempts >= 2 and "refused" in alert.last_error
    daemon.stop()

    received = []
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    restarted = Daemon(make_settings(tmp_path, **sections), tick_s=0.05)
    restarted.start()
    try:
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a["series_instance_uid"] for a in received] == [row.series_instance_uid]
        time.sleep(0.3)
        assert len(received) == 1  # delivered once, not once per retry or restart
    finally:
        restarted.stop()
        server.shutdown()


def test_eight_scanners_at_once_while_history_is_queried(daemon_factory):
    daemon = daemon_factory(dicom={"max_associations": 16}, assembly={"quiet_period_s": 1.0})
    all_series = [classic_series(phantom((40, 40, 20), seed=i)) for i in range(8)]
    stop_reading = threading.Event()
    reads = []

    def read_history():
        while not stop_reading.is_set():
            with daemon.store.session() as session:
                reads.append(len(history(session)))
            time.sleep(0.02)

    reader = threading.Thread(target=read_history)
    reader.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda s: send_datasets(s, daemon.port, calling_aet="MR_LOAD"), all_series))
    assert all(statuses == [0] * 20 for statuses in results)
    assert daemon.wait_idle(180)
    stop_reading.set()
    reader.join()
    with daemon.store.session() as session:
        rows = history(session)
    assert sorted(r.series_instance_uid for r in rows) == sorted(str(s[0].SeriesInstanceUID) for s in all_series)
    assert all(r.status is SeriesStatus.SCORED and r.instances == 20 for r in rows)
    assert reads and reads[-1] == 8


def test_full_queue_holds_series_back_without_dropping_them(daemon_factory):
    daemon = daemon_factory(assembly={"quiet_period_s": 0.1, "max_queue": 1})
    all_series = [classic_series(phantom((40, 40, 16), seed=i)) for i in range(4)]
    for series in all_series:
        send_datasets(series, daemon.port)
    assert daemon.wait_idle(120)
    with daemon.store.session() as session:
        assert len(history(session, status=SeriesStatus.SCORED)) == 4


def test_retention_removes_old_instances_and_keeps_results(daemon_factory):
    daemon = daemon_factory(storage={"retention_days": 1.0, "keep_nifti": True})
    series = classic_series(phantom((40, 40, 20)))
    uid = str(series[0].SeriesInstanceUID)
    send_datasets(series, daemon.port)
    assert daemon.wait_idle(60)
    (row,) = _rows(daemon, uid)
    assert Path(row.nifti_path).is_file()
    old = time.time() - 2 * 86400
    waiting = classic_series(phantom((40, 40, 16)))  # spooled during an outage, never recorded yet
    waiting_uid = spool_datasets(daemon.spool, waiting)
    for path in [*daemon.spool.instance_paths(uid), *daemon.spool.instance_paths(waiting_uid), Path(row.nifti_path)]:
        os.utime(path, (old, old))
    daemon.apply_retention()
    assert len(daemon.spool.instance_paths(waiting_uid)) == 16
    assert daemon.spool.instance_paths(uid) == []
    assert not Path(row.nifti_path).exists()
    assert _rows(daemon, uid)[0].score == row.score


def test_a_series_hit_by_a_locked_database_is_retried_without_a_restart(tmp_path, log_stream):
    """The store refuses writes for a while (another connection holds the write lock): the series is offered
    again with a growing delay, and its result appears once the lock is gone, with no restart."""
    settings = make_settings(tmp_path, assembly={"quiet_period_s": 0.1})
    daemon = Daemon(settings, tick_s=0.05, store_busy_timeout_s=0.2)
    daemon.start()
    locker = sqlite3.connect(settings.storage.state_dir / "qc.sqlite3", isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        series = classic_series(phantom((40, 40, 20)))
        uid = str(series[0].SeriesInstanceUID)
        assert send_datasets(series, daemon.port) == [0] * 20  # the spool takes them; the store is not needed

        def retries() -> list[dict]:
            events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
            return [e for e in events if e.get("event") == "series_retry_scheduled"]

        deadline = time.monotonic() + 60
        while len(retries()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first, second = retries()[:2]
        assert first["series_instance_uid"] == uid and "database is locked" in first["error"]
        assert (first["failures"], second["failures"]) == (1, 2)
        assert second["retry_in_s"] == 2 * first["retry_in_s"]
        assert _rows(daemon, uid) == []  # nothing recorded while locked
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    try:
        assert daemon.wait_idle(60)
        (row,) = _rows(daemon, uid)
        assert (row.revision, row.status, row.instances) == (1, SeriesStatus.SCORED, 20)
    finally:
        daemon.stop()


def test_findings_wait_out_a_short_database_outage(tmp_path, log_stream, monkeypatch):
    """The score is committed; then the store refuses writes for a moment (another connection holds the write
    lock) just as the IQMs and montage are stored: their commit is tried again and they are not lost."""
    import threading

    from qc_daemon import pipeline

    settings = make_settings(tmp_path, assembly={"quiet_period_s": 0.1})
    database = settings.storage.state_dir / "qc.sqlite3"
    lockers = []
    real_compute_findings = pipeline.compute_findings

    def compute_then_lock(*args, **kwargs):
        findings = real_compute_findings(*args, **kwargs)
        locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        lockers.append(locker)
        locker.execute("BEGIN EXCLUSIVE")
        threading.Timer(1.5, lambda: locker.execute("ROLLBACK")).start()
        return findings

    monkeypatch.setattr(pipeline, "compute_findings", compute_then_lock)
    daemon = Daemon(settings, tick_s=0.05, store_busy_timeout_s=0.2)
    daemon.start()
    try:
        series = classic_series(phantom((40, 40, 20)))
        uid = str(series[0].SeriesInstanceUID)
        assert send_datasets(series, daemon.port) == [0] * 20
        deadline = time.monotonic() + 60
        while not (_rows(daemon, uid) and _rows(daemon, uid)[0].iqms) and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = _rows(daemon, uid)
        assert row.status is SeriesStatus.SCORED and row.iqms and row.montage_path
        events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
        outage = [e for e in events if e.get("event") == "database_unavailable"]
        assert [e["component"] for e in outage] == ["findings"]
        assert not [e for e in events if e.get("event") == "findings_not_stored"]
    finally:
        daemon.stop()
        for locker in lockers:
            locker.close()
