"""Alerts: decided from stored results, delivered from the outbox table so nothing is lost on a restart.

The structured log event ``alert_raised`` is written at once by the pipeline. The webhook (JSON POST) and the
exec hook are outbox rows in ``alerts``, written in the same transaction as the result; the dispatcher thread
delivers due rows and retries failures with exponential backoff until they are delivered. One row per
(series revision, channel): a revision alerts once per channel. Daemons sharing a database share the outbox: any
of them delivers a row, once (:func:`~qc_daemon.store.claim_alert`), so they are configured with the same
``[alerts]``. While the database is away the dispatcher logs that once (``database_unavailable``) and keeps
polling.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
import urllib.error
import urllib.request

from sqlalchemy.exc import SQLAlchemyError

from qc_daemon.ghost_check import axis_direction
from qc_daemon.logs import get_logger
from qc_daemon.settings import AlertSettings
from qc_daemon.store import Alert, AlertChannel, AlertState, SeriesResult, Store, claim_alert, due_alerts, utcnow

log = get_logger(__name__)


class DeliveryError(RuntimeError):
    pass


def alert_payload(row: SeriesResult, threshold: float) -> dict:
    """The JSON an alert carries: UIDs and acquisition context, never patient data."""
    return {
        "event": "qc_alert",
        "series_instance_uid": row.series_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "revision": row.revision,
        "score": row.score,
        "threshold": threshold,
        "model_score": row.model_score,
        "ghost_ratio": row.ghost_ratio,
        "ghost_direction": axis_direction(row.ghost_axis),
        "spike_amplitude": row.spike_amplitude,
        "station_name": row.station_name,
        "calling_ae": row.calling_ae,
        "series_description": row.series_description,
        "protocol_name": row.protocol_name,
        "model_sha256": row.model_sha256,
        "instances": row.instances,
    }


def enabled_channels(settings: AlertSettings) -> tuple[AlertChannel, ...]:
    channels = []
    if settings.webhook_url:
        channels.append(AlertChannel.WEBHOOK)
    if settings.exec_command:
        channels.append(AlertChannel.EXEC)
    return tuple(channels)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failures: initial, 2x, 4x, ... capped at ``max_s``."""
    return min(max_s, initial_s * 2 ** max(0, attempts - 1))


def post_webhook(url: str, payload: dict, timeout_s: float) -> None:
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if not 200 <= response.status < 300:
                raise DeliveryError(f"HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise DeliveryError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc


def run_exec_hook(argv: tuple[str, ...], payload: dict, timeout_s: float) -> None:
    try:
        done = subprocess.run(
            list(argv), input=json.dumps(payload).encode(), capture_output=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if done.returncode != 0:
        raise DeliveryError(f"exit status {done.returncode}: {done.stderr.decode(errors='replace')[:200]}")


class OutboxWorker:
    """A thread that delivers due outbox rows: :meth:`deliver_due` at once when woken (a new row), else every
    ``poll_s``. A database error ends a pass and is reported to the store's availability (an outage is logged
    once); any other error is logged and the next pass comes as usual. Subclasses say whether they have
    anything to deliver (:meth:`enabled`) and how (:meth:`deliver_due`)."""

    component = "outbox"  # names the thread and the part that reports an outage

    def __init__(self, store: Store, poll_s: float = 1.0):
        self.store = store
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"qc-{self.component}", daemon=True)

    def enabled(self) -> bool:
        raise NotImplementedError

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        raise NotImplementedError

    def start(self) -> None:
        if self.enabled():
            self._thread.start()

    def wake(self) -> None:
        """A new row is in the outbox: deliver now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except SQLAlchemyError as exc:  # locked or away: logged once per outage, tried again next poll
                self.store.availability.failed(exc, self.component)
            except Exception:  # noqa: BLE001 - the thread must outlive a bug in one delivery
                log.exception("outbox_dispatch_error", component=self.component)
            else:
                self.store.availability.answered()
            self._wake.wait(self.poll_s)
            self._wake.clear()


class AlertDispatcher(OutboxWorker):
    component = "alerts"

    def __init__(self, store: Store, settings: AlertSettings, poll_s: float = 1.0):
        super().__init__(store, poll_s)
        self.settings = settings

    def enabled(self) -> bool:
        return bool(enabled_channels(self.settings))

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        """Try every due alert once; returns how many were delivered.

        Each alert is first claimed for longer than a delivery can take (:func:`~qc_daemon.store.claim_alert`),
        so two dispatchers, in one process or in several daemons sharing a database, never send it twice at once.
        """
        delivered = 0
        for channel in enabled_channels(self.settings):
            with self.store.session() as session:
                due = [alert.id for alert in due_alerts(session, channel, now or utcnow())]
            for alert_id in due:
                if self._claim(alert_id, now or utcnow()):
                    delivered += self._attempt(channel, alert_id)
        return delivered

    def _claim(self, alert_id: int, now: dt.datetime) -> bool:
        lease_s = max(self.settings.webhook_timeout_s, self.settings.exec_timeout_s) + 30.0
        with self.store.session() as session:
            return claim_alert(session, alert_id, now, lease_s)

    def _attempt(self, channel: AlertChannel, alert_id: int) -> int:
        with self.store.session() as session:
            alert = session.get(Alert, alert_id)
            series_uid = alert.payload.get("series_instance_uid")
            try:
                self._deliver(channel, alert.payload)
            except DeliveryError as exc:
                alert.attempts += 1
                alert.last_error = str(exc)[:500]
                delay = backoff_s(alert.attempts, self.settings.retry_initial_s, self.settings.retry_max_s)
                alert.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
                session.commit()
                log.warning(
                    "alert_delivery_failed",
                    channel=channel.value,
                    series_instance_uid=series_uid,
                    attempts=alert.attempts,
                    retry_in_s=delay,
                    error=alert.last_error,
                )
                return 0
            alert.attempts += 1
            alert.state = AlertState.DELIVERED
            alert.delivered_at = utcnow()
            session.commit()
        log.info("alert_delivered", channel=channel.value, series_instance_uid=series_uid)
        return 1

    def _deliver(self, channel: AlertChannel, payload: dict) -> None:
        if channel is AlertChannel.WEBHOOK:
            post_webhook(self.settings.webhook_url, payload, self.settings.webhook_timeout_s)
        else:
            run_exec_hook(self.settings.exec_command, payload, self.settings.exec_timeout_s)
