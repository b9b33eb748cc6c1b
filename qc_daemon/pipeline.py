"""The work behind a complete series: snapshot the spool, classify, build the volume, score, record, alert;
then the findings (IQMs, quality map, montage) and the results for PACS (SR, montage SC, queued for sending).

:class:`SeriesProcessor` does one series and never raises: every outcome is a stored row (scored, skipped or
failed, with its reason) -- unless the store itself fails, and then it raises. :class:`WorkQueue` runs it on
worker threads from a bounded queue and hands a series whose processing raised back for a retry after a delay
that doubles with each failure (capped), so a database outage delays results instead of losing them until the
next restart; a series another node is recording (:class:`~qc_daemon.store.RevisionInProgress`) is looked at
again after :data:`RECHECK_S`, without counting as a failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from qc_daemon.alerts import alert_payload, backoff_s
from qc_daemon.findings import compute_findings, results_folder
from qc_daemon.logs import get_logger
from qc_daemon.montage import MontageCaption
from qc_daemon.pacs_report import ModelIdentity, ResultFacts, build_results
from qc_daemon.pacs_sender import KINDS, enqueue_results
from qc_daemon.scorer import Score, Scorer
from qc_daemon.series import SeriesFailed, SeriesSkipped, SpooledSeries, classify, read_series, series_facts
from qc_daemon.spool import Spool
from qc_daemon.store import (
    AlertChannel,
    RevisionInProgress,
    SeriesResult,
    SeriesStatus,
    Store,
    awaits_result,
    begin_revision,
    enqueue_alert,
    error_line,
    latest_revision,
    utcnow,
)
from qc_daemon.volume import Volume, build_volume

log = get_logger(__name__)
RETRY_INITIAL_S = 1.0  # first delay before a series whose processing raised is tried again
RETRY_MAX_S = 15.0  # the delay doubles per failure up to this: a result is stored soon after an outage ends
FINDINGS_COMMIT_ATTEMPTS = 4  # the findings commit through a database outage of up to ~7 s (1 + 2 + 4 s)
RECHECK_S = 5.0  # a series another node is scoring is looked at again after this


class SeriesProcessor:
    def __init__(
        self,
        spool: Spool,
        store: Store,
        scorer: Scorer,
        *,
        min_slices: int,
        phantom_keywords: tuple[str, ...] = (),
        threshold: float,
        alert_channels: tuple[AlertChannel, ...],
        archive_dir: Path | None,
        results_dir: Path | None = None,
        on_alert: Callable[[], None] = lambda: None,
        node_name: str | None = None,
        result_channels: tuple[AlertChannel, ...] = (),
        device_name: str = "QC_DAEMON",
        on_results: Callable[[], None] = lambda: None,
    ):
        self.spool = spool
        self.store = store
        self.scorer = scorer
        self.min_slices = min_slices
        self.phantom_keywords = phantom_keywords
        self.threshold = threshold
        self.alert_channels = alert_channels
        self.archive_dir = archive_dir
        self.results_dir = results_dir
        self.on_alert = on_alert
        self.node_name = node_name
        self.result_channels = result_channels  # results to PACS: outbox channels (none: off)
        self.device_name = device_name  # names the daemon as the observer in the SR
        self.on_results = on_results

    def process(self, series_uid: str) -> SeriesResult | None:
        """Record one revision of the series; None when the spool holds nothing new since the last one (or
        another node sharing the database recorded these instances).

        Raises what the store raises (the database is locked or gone): nothing is recorded then; and
        :class:`~qc_daemon.store.RevisionInProgress` while another node is scoring the same instances.
        """
        started_at = utcnow()
        started = time.perf_counter()
        paths = self.spool.instance_paths(series_uid)
        if not paths:
            return None
        timings = _Timings()
        with self.store.session() as session:
            if not awaits_result(session, series_uid, len(paths)):
                latest = latest_revision(session, series_uid)
                log.info("series_unchanged", series_instance_uid=series_uid, revision=latest.revision,
                         recorded_by=latest.node_name)
                return None
            with timings.phase("read_s"):
                series = read_series(series_uid, paths)
            arrivals = [p.stat().st_mtime for p in paths]
            facts = series_facts(series, len(paths), _utc(min(arrivals)))
            with timings.phase("store_s"):
                row = begin_revision(session, facts, self.node_name, _utc(max(arrivals)), started_at)
            if row is None:  # a second node's copy of a series routed to both
                latest = latest_revision(session, series_uid)
                log.info("series_duplicate", series_instance_uid=series_uid, revision=latest.revision,
                         recorded_by=latest.node_name, instances=len(paths))
                return None
            bound = log.bind(series_instance_uid=series_uid, revision=row.revision)
            bound.info("series_processing", instances=len(paths))
            scored = None
            try:
                scored = self._score_into(row, series, timings)
            except SeriesSkipped as exc:
                row.status, row.reason = SeriesStatus.SKIPPED, str(exc)
            except SeriesFailed as exc:
                row.status, row.reason = SeriesStatus.FAILED, str(exc)
            except Exception as exc:  # noqa: BLE001 - one broken series never stops the others
                bound.exception("series_error")
                row.status, row.reason = SeriesStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}"[:500]
            if series.unreadable and row.status is SeriesStatus.SCORED:
                row.reason = f"{len(series.unreadable)} unreadable instance(s) ignored: {series.unreadable[0]}"
            row.scored_at = utcnow()
            if row.status is SeriesStatus.SCORED and row.score is not None and row.score < self.threshold:
                row.below_threshold = True
                payload = alert_payload(row, self.threshold)
                for channel in self.alert_channels:
                    enqueue_alert(session, row, channel, payload)
            with timings.phase("store_s"):
                session.commit()
            timings.seconds["total_s"] = time.perf_counter() - started
            self._log_outcome(bound, row, timings)
            if row.below_threshold and self.alert_channels:
                self.on_alert()
            if scored is not None and self.results_dir is not None:
                self._add_findings(session, row, *scored, bound)
            return row

    def _score_into(self, row: SeriesResult, series, timings: _Timings) -> tuple[Volume, Score, SpooledSeries]:
        with timings.phase("volume_s"):
            series = classify(series, self.min_slices, self.phantom_keywords)
            keep_as = None
            if self.archive_dir is not None:
                keep_as = self.archive_dir / f"{row.series_instance_uid}_r{row.revision}.nii.gz"
            volume = build_volume(series, keep_nifti_as=keep_as)
        result = self.scorer.score_volume(volume)
        timings.seconds["preprocess_s"] = result.preprocessing_s
        timings.seconds["inference_s"] = result.seconds - result.preprocessing_s
        row.status = SeriesStatus.SCORED
        row.reason = None
        row.score = result.score
        row.model_score = result.model_score
        row.ghost_ratio = result.ghost.ratio if result.ghost is not None else None
        row.ghost_axis = result.ghost.axis if result.ghost is not None else None
        row.spike_amplitude = result.spike.amplitude if result.spike is not None else None
        row.patch_scores = result.patch_scores
        row.patch_origins = [list(o) for o in result.patch_origins]
        row.volume_shape = list(result.volume_shape)
        row.scoring_time_s = result.seconds
        row.model_sha256 = self.scorer.model_sha256
        row.nifti_path = str(keep_as) if keep_as is not None else None
        return volume, result, series

    def _add_findings(self, session, row: SeriesResult, volume: Volume, score: Score, series: SpooledSeries,
                      bound) -> None:
        """IQMs, quality map and montage, stored in a second commit with the results for PACS (queued in the
        outbox): the score and alert are already out. The commit is tried again through a short database outage
        (:data:`FINDINGS_COMMIT_ATTEMPTS`); after that the findings are lost, never the score."""
        caption = MontageCaption(
            series_instance_uid=row.series_instance_uid,
            study_instance_uid=row.study_instance_uid,
            revision=row.revision,
            series_description=row.series_description,
            station_name=row.station_name,
            completed_at=row.completed_at,
            score=row.score,
            threshold=self.threshold,
            model_sha256=row.model_sha256,
        )
        folder = results_folder(self.results_dir, row.series_instance_uid, row.revision)
        values: dict = {}
        try:
            findings = compute_findings(volume, score, caption, folder)
        except Exception as exc:  # noqa: BLE001 - the score is stored; a findings failure only loses findings
            bound.exception("findings_failed")
            values["iqm_errors"] = {"all": f"internal error: {type(exc).__name__}: {exc}"[:500]}
        else:
            values = {
                "iqms": findings.iqms,
                "iqm_errors": findings.iqm_errors,
                "quality_map_path": str(findings.quality_map_path) if findings.quality_map_path else None,
                "montage_path": str(findings.montage_path) if findings.montage_path else None,
            }
            bound.info("series_findings", iqms_missing=sorted(findings.iqm_errors),
                       **{k: round(v, 3) for k, v in findings.seconds.items()})
        built = self._build_results(row, values, series, folder, bound)
        for attempt in range(1, FINDINGS_COMMIT_ATTEMPTS + 1):
            try:
                for name, value in values.items():
                    setattr(row, name, value)
                if built:
                    enqueue_results(session, row, built)
                session.commit()
                break
            except SQLAlchemyError as exc:  # the score is committed: only the findings wait for the database
                session.rollback()
                if attempt == FINDINGS_COMMIT_ATTEMPTS:
                    bound.error("findings_not_stored", attempts=attempt, error=error_line(exc))
                    return
                self.store.availability.failed(exc, "findings")
                time.sleep(backoff_s(attempt, RETRY_INITIAL_S, RETRY_MAX_S))
        self.store.availability.answered()
        if built:
            self.on_results()

    def _build_results(self, row: SeriesResult, values: dict, series: SpooledSeries, folder: Path, bound) -> dict:
        """The SR and the montage SC for PACS, built into ``folder`` (empty when results to PACS are off)."""
        if not self.result_channels:
            return {}
        started = time.perf_counter()
        info = self.scorer.info
        facts = ResultFacts(
            series_instance_uid=row.series_instance_uid,
            revision=row.revision,
            scored_at=row.scored_at,
            series_description=row.series_description,
            score=row.score,
            threshold=self.threshold,
            iqms=values.get("iqms") or {},
            model=ModelIdentity(info.architecture, info.sha256, info.label),
            device_name=self.device_name,
            model_score=row.model_score,
            ghost_ratio=row.ghost_ratio,
            spike_amplitude=row.spike_amplitude,
        )
        montage = Path(values["montage_path"]) if values.get("montage_path") else None
        try:
            built = build_results([KINDS[c] for c in self.result_channels], series.datasets, facts, montage, folder)
        except Exception as exc:  # noqa: BLE001 - e.g. the disk is full: the findings are still stored
            bound.error("results_not_built", error=type(exc).__name__)
            return {}
        bound.info("results_queued", seconds=round(time.perf_counter() - started, 3),
                   **{kind.value: getattr(result, "sop_instance_uid", f"failed: {result}")
                      for kind, result in built.items()})
        return built

    def _log_outcome(self, bound, row: SeriesResult, timings: _Timings) -> None:
        if row.status is SeriesStatus.SCORED:
            bound.info("series_scored", score=round(row.score, 4), model_score=round(row.model_score, 4),
                       ghost_ratio=row.ghost_ratio, spike_amplitude=row.spike_amplitude,
                       seconds=round(row.scoring_time_s, 2), **timings.rounded())
            if row.below_threshold:
                bound.warning(
                    "alert_raised",
                    score=round(row.score, 4),
                    threshold=self.threshold,
                    station_name=row.station_name,
                    series_description=row.series_description,
                )
        elif row.status is SeriesStatus.SKIPPED:
            bound.info("series_skipped", reason=row.reason)
        else:
            bound.warning("series_failed", reason=row.reason)


class _Timings:
    """Seconds spent in each phase of one series, for the log line that closes it (and bench/bench_latency)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}


def _utc(timestamp: float) -> dt.datetime:
    """A file time (seconds since the epoch) as the store's naive UTC datetime."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).replace(tzinfo=None)


class WorkQueue:
    """Bounded queue of series UIDs served by worker threads; a UID is queued at most once at a time.

    When processing a series raises (the store failed: nothing was recorded), ``retry_later(uid, delay_s)``
    gets it back to offer again after ``delay_s``: 1 s, 2 s, 4 s ... up to :data:`RETRY_MAX_S`, for as long as
    it fails.
    """

    def __init__(
        self,
        process: Callable[[str], object],
        workers: int,
        max_queue: int,
        retry_later: Callable[[str, float], None],
    ):
        self._process = process
        self._retry_later = retry_later
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queue)
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._work, name=f"qc-worker-{i}", daemon=True) for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, series_uid: str) -> bool:
        """Queue a series; False when the queue is full (the caller keeps it and tries again)."""
        with self._lock:
            if series_uid in self._queued:
                return True
            try:
                self._queue.put_nowait(series_uid)
            except queue.Full:
                return False
            self._queued.add(series_uid)
            return True

    def _work(self) -> None:
        while True:
            uid = self._queue.get()
            if uid is None:
                return
            with self._lock:
                self._queued.discard(uid)
                # The same series is never processed by two workers at once.
                while uid in self._running:
                    self._idle.wait()
                self._running.add(uid)
            try:
                self._process(uid)
            except RevisionInProgress as exc:
                log.info("series_recording_elsewhere", series_instance_uid=uid, revision=exc.revision,
                         node_name=exc.node_name, recheck_in_s=RECHECK_S)
                self._retry_later(uid, RECHECK_S)
            except Exception as exc:  # noqa: BLE001 - series failures are recorded rows: this is the store (or spool)
                failures = self._failures[uid] = self._failures.get(uid, 0) + 1
                delay_s = backoff_s(failures, RETRY_INITIAL_S, RETRY_MAX_S)
                if isinstance(exc, SQLAlchemyError):  # the database is locked or away: a traceback adds nothing
                    log.warning("series_retry_scheduled", series_instance_uid=uid, failures=failures,
                                retry_in_s=delay_s, error=error_line(exc))
                else:
                    log.exception("series_retry_scheduled", series_instance_uid=uid, failures=failures,
                                  retry_in_s=delay_s)
                self._retry_later(uid, delay_s)
            else:
                self._failures.pop(uid, None)
            finally:
                with self._lock:
                    self._running.discard(uid)
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is queued or running; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queued and not self._running, timeout=timeout_s)

    def stop(self) -> None:
        """Let the current series finish; queued ones stay in the spool and are found again at start-up."""
        with self._lock:
            self._queued.clear()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        started = [thread for thread in self._threads if thread.is_alive()]
        for _ in started:
            self._queue.put(None)
        for thread in started:
            thread.join()
