"""The running node: wires the parts from one Settings object, recovers from the spool, stops cleanly.

Start-up order: store (migrated) -> scorer (model checked; refuse to start on a bad model) -> model warm-up (one
dummy batch, on its own thread) -> spool recovery (every series in the spool that has no final result for all its
instances is tracked again) -> workers -> alerts and results to PACS (their outboxes are picked up where they were)
-> listener and drop folder. Stop (SIGTERM): stop accepting (listener, drop folder), let the series in progress
finish, leave queued ones in the spool for the next start, stop alerts and the results sender. The constructor only
builds the parts; every thread is started by :meth:`Daemon.start`.

The store must answer at start-up (:class:`~qc_daemon.store.StoreUnavailable` otherwise). Later outages cost no
instance: the listener keeps spooling, a series the store failed is retried (qc_daemon.pipeline), and the parts
that poll the store report to its :class:`~qc_daemon.store.Availability`, which logs each outage once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from qc_daemon.alerts import AlertDispatcher, enabled_channels
from qc_daemon.assembler import Assembler
from qc_daemon.dropfolder import DropFolder
from qc_daemon.findings import remove_results_older_than
from qc_daemon.intake import Intake
from qc_daemon.listener import start_listener
from qc_daemon.logs import get_logger
from qc_daemon.metrics import DaemonMetrics
from qc_daemon.pacs_sender import ResultSender, result_channels
from qc_daemon.pipeline import SeriesProcessor, WorkQueue
from qc_daemon.scorer import Scorer
from qc_daemon.settings import Settings
from qc_daemon.spool import Spool
from qc_daemon.status import Activity, DaemonStatus
from qc_daemon.store import BUSY_TIMEOUT_S, Store, awaits_result

log = get_logger(__name__)
RETENTION_EVERY_S = 3600.0
RETENTION_RETRY_S = 60.0  # retention postponed by a database outage runs again this soon
SPOOL_FILES_MADE_AHEAD = 64  # empty files kept ready in the spool: a burst of 32 instances never creates one
STORE_THREADS = 4  # besides the workers, threads that use the store: the ticker, the alert dispatcher, the
# results sender, the web view


class Daemon:
    def __init__(self, settings: Settings, tick_s: float = 0.5, store_busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.settings = settings
        self.tick_s = tick_s
        storage = settings.storage
        storage.state_dir.mkdir(parents=True, exist_ok=True)
        self.node_name = settings.node_name
        self.store = Store(storage.database, busy_timeout_s=store_busy_timeout_s,
                           pool_size=settings.assembly.workers + STORE_THREADS)
        self.scorer = Scorer(settings.scoring)
        self.spool = Spool(storage.spool_path)
        self.spool.clean_incoming()
        self.alerts = AlertDispatcher(self.store, settings.alerts)
        self.results = ResultSender(self.store, settings.results, settings.dicom.ae_title, node_name=self.node_name)
        self.processor = SeriesProcessor(
            self.spool,
            self.store,
            self.scorer,
            min_slices=settings.assembly.min_slices,
            phantom_keywords=settings.assembly.phantom_keywords,
            threshold=settings.alerts.threshold,
            alert_channels=enabled_channels(settings.alerts),
            archive_dir=storage.archive_path if storage.keep_nifti else None,
            results_dir=storage.results_path,
            on_alert=self.alerts.wake,
            node_name=self.node_name,
            result_channels=result_channels(settings.results),
            device_name=self.results.calling_ae_title,
            on_results=self.results.wake,
        )
        self.activity = Activity()
        self.metrics = DaemonMetrics(self.store, self.status)
        self.work = WorkQueue(
            self._process,
            settings.assembly.workers,
            settings.assembly.max_queue,
            retry_later=lambda uid, delay_s: self.assembler.retry_later(uid, delay_s),
        )
        self.assembler = Assembler(
            settings.assembly.quiet_period_s,
            settings.assembly.use_expected_count,
            submit=self._submit,
            count_spooled=lambda uid: len(self.spool.instance_paths(uid)),
            min_slices=settings.assembly.min_slices,
        )
        self.intake = Intake(
            self.spool,
            self.assembler.instance_arrived,
            max_instance_bytes=settings.dicom.max_instance_mb * 2**20,
            min_free_mb=storage.min_free_mb,
            counts=self.metrics,
        )
        self.drop_folder = (
            DropFolder(Path(settings.watch.folder).expanduser(), self.intake, settings.watch.settle_s)
            if settings.watch.folder
            else None
        )
        self.ae = None
        self.server = None
        self.web = None
        self._stop = threading.Event()
        self._stopping = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="qc-assembler", daemon=True)
        self._warm_up = threading.Thread(target=self._warm_up_model, name="qc-warm-up", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def status(self) -> DaemonStatus:
        """The read-only snapshot the web view and the metrics see."""
        queued, scoring = self.activity.snapshot()
        return DaemonStatus(
            listener_up=self.server is not None and self.server.socket.fileno() != -1,
            model_loaded=self.scorer.session is not None,
            model_sha256=self.scorer.model_sha256,
            receiving=tuple(self.assembler.receiving()),
            queued=queued,
            scoring=scoring,
            free_disk_mb=self.spool.free_mb(),
            min_free_mb=self.settings.storage.min_free_mb,
            threshold=self.settings.alerts.threshold,
        )

    def _submit(self, series_uid: str) -> bool:
        queued = self.work.submit(series_uid)
        if queued:
            self.activity.queued(series_uid)
        return queued

    def _process(self, series_uid: str):
        self.activity.started(series_uid)
        try:
            row = self.processor.process(series_uid)
        except SQLAlchemyError as exc:
            self.store.availability.failed(exc, "pipeline")
            raise  # the work queue retries the series
        finally:
            self.activity.finished(series_uid)
        self.store.availability.answered()
        return row

    def recover(self) -> list[str]:
        """Track every spooled series whose instances are not all covered by a final result."""
        resumed = []
        now = time.time()
        for uid in self.spool.series_uids():
            if self.awaits_result(uid):
                self.assembler.resume(uid, age_s=now - self.spool.last_modified(uid))
                resumed.append(uid)
        if resumed:
            log.info("spool_recovered", series=len(resumed))
        return resumed

    def awaits_result(self, series_uid: str) -> bool:
        """True while the spool holds instances of the series that no final result counts yet."""
        with self.store.session() as session:
            return awaits_result(session, series_uid, len(self.spool.instance_paths(series_uid)))

    def start(self) -> None:
        self._warm_up.start()  # beside the listener: receiving does not need the model, the first series does
        self.recover()
        self.work.start()
        self._ticker.start()
        self.alerts.start()
        self.results.start()
        self.spool.make_files_ahead(SPOOL_FILES_MADE_AHEAD)
        self.ae, self.server = start_listener(
            self.settings.dicom,
            self.intake,
            on_released=self.assembler.association_released,
            on_ended=self.assembler.association_ended,
        )
        if self.drop_folder is not None:
            self.drop_folder.start()
        if self.settings.http.enabled:
            self.web = self._start_web()
        _sd_notify("READY=1")
        log.info("daemon_ready", state_dir=str(self.settings.storage.state_dir), port=self.port,
                 node_name=self.node_name, database=self.store.shown_url)

    def _start_web(self):
        from qc_daemon.web import WebServer, WebView, create_app  # only a daemon serving the web view needs it

        view = WebView(self.store, self.status, self.metrics, self._stopping,
                       self.settings.storage.results_path)
        web = WebServer(create_app(view, self.settings.http), self.settings.http)
        web.start()
        log.info("web_ready", url=web.url)
        return web

    def _warm_up_model(self) -> None:
        try:
            self.scorer.warm_up()
        except Exception:  # noqa: BLE001 - the first series then pays for it (and fails with the reason if it must)
            log.exception("model_warm_up_failed")

    def _tick_loop(self) -> None:
        next_retention = 0.0
        while not self._stop.wait(self.tick_s):
            try:
                self.assembler.tick()
                if self.settings.storage.retention_days and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + RETENTION_EVERY_S
                    try:
                        self.apply_retention()
                    except SQLAlchemyError as exc:  # which series are unrecorded is not known: keep everything
                        self.store.availability.failed(exc, "retention")
                        next_retention = time.monotonic() + RETENTION_RETRY_S
            except Exception:  # noqa: BLE001 - the ticker must outlive any single failure
                log.exception("assembler_tick_error")
            _sd_notify("WATCHDOG=1")

    def apply_retention(self) -> None:
        max_age_s = self.settings.storage.retention_days * 86400
        removed = self.spool.remove_older_than(max_age_s, keep=self.awaits_result)
        archive = self.settings.storage.archive_path
        if archive.is_dir():
            cutoff = time.time() - max_age_s
            for path in archive.glob("*.nii.gz"):
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
        results_removed = remove_results_older_than(self.settings.storage.results_path, max_age_s)
        if removed or results_removed:
            log.info("retention_applied", series_removed=len(removed), results_removed=results_removed)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """For tests and one-shot runs: wait until no series is receiving, queued or being scored."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.assembler.receiving() and self.work.wait_idle(0.1):
                if not self.assembler.receiving():
                    return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        _sd_notify("STOPPING=1")
        log.info("daemon_stopping")
        self._stopping.set()  # ends the live pages' event streams, so the web server stops at once
        if self.web is not None:
            self.web.stop()
        if self.server is not None:
            self.server.shutdown()
        if self.drop_folder is not None:
            self.drop_folder.stop()
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        self.work.stop()
        if self._warm_up.is_alive():
            self._warm_up.join()
        self.alerts.stop()
        self.results.stop()
        self.spool.close()
        self.store.close()
        log.info("daemon_stopped")


def _sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify), without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        pass
