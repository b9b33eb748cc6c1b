"""Results to PACS: outbox rows for the built SR and SC, and the thread that stores them at the destination.

Each scored revision gets one outbox row per enabled channel (``pacs_report``, ``pacs_montage``) in the alerts
table, written in the commit that stores its findings, after the score and its alert. The row's payload names
the file built by :mod:`qc_daemon.pacs_report` and its UIDs; a send, a retry and a send after a restart all
store that same file, so the destination sees one instance per revision and channel whatever happens.

:class:`ResultSender` claims due rows (:func:`~qc_daemon.store.claim_alert`) and C-STOREs each file from our
own AE (the calling AE title), proposing only its SOP class in Explicit and Implicit VR Little Endian, over TLS
when configured. The outcome decides the row (PS3.4 B.2.3, PS3.7 C.4.2):

* Success ``0x0000`` and the warnings (``0x0001``, ``0x0107``, ``0x0116``, ``0xBxxx``): delivered.
* Out of resources ``0xA7xx``, any other failure status, no response (timeout, abort), no association (the
  destination is down, rejects us or the handshake fails): retried, the delay doubling from
  ``results.retry_initial_s`` to ``results.retry_max_s``, for as long as it takes. A destination that is down
  delays delivery, never scoring.
* ``0xA9xx`` (data set does not match the SOP class), ``0xCxxx`` (cannot understand), ``0x0122`` (SOP class
  not supported), the SOP class refused in negotiation, and a file that is gone (removed by retention) or
  unreadable: failed for good (state ``failed``), with the reason; sending it again could not succeed.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Mapping
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.orm import Session

from qc_daemon.alerts import OutboxWorker, backoff_s
from qc_daemon.logs import get_logger
from qc_daemon.pacs_report import BuiltResult, ResultBuildError, ResultKind
from qc_daemon.settings import Destination, ResultsSettings
from qc_daemon.store import (
    Alert,
    AlertChannel,
    AlertState,
    SeriesResult,
    Store,
    claim_alert,
    due_alerts,
    enqueue_alert,
    utcnow,
)

log = get_logger(__name__)

CHANNELS = {ResultKind.REPORT: AlertChannel.PACS_REPORT, ResultKind.MONTAGE: AlertChannel.PACS_MONTAGE}
KINDS = {channel: kind for kind, channel in CHANNELS.items()}
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
SUCCESS = 0x0000
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116})  # and every 0xBxxx
SOP_CLASS_NOT_SUPPORTED = 0x0122


class TransientDeliveryError(RuntimeError):
    """The destination did not take the instance this time; try again later."""


class DestinationUnavailable(TransientDeliveryError):
    """No association: the destination is down, unreachable, rejects us or fails the TLS handshake."""


class PermanentDeliveryError(RuntimeError):
    """The instance can never be delivered as it is; the message says why."""


def result_channels(settings: ResultsSettings) -> tuple[AlertChannel, ...]:
    """The outbox channels a scored revision gets: none while no destination is set."""
    if not settings.enabled:
        return ()
    kinds = [kind for kind, on in ((ResultKind.REPORT, settings.send_report),
                                   (ResultKind.MONTAGE, settings.send_montage)) if on]
    return tuple(CHANNELS[kind] for kind in kinds)


def enqueue_results(
    session: Session, row: SeriesResult, built: Mapping[ResultKind, BuiltResult | ResultBuildError]
) -> list[Alert]:
    """One outbox row per built object (``failed`` at once, with the reason, for one that could not be built)."""
    rows = []
    for kind, result in built.items():
        payload = {"event": "qc_result", "series_instance_uid": row.series_instance_uid, "revision": row.revision}
        if isinstance(result, BuiltResult):
            payload.update(result.payload())
        alert = enqueue_alert(session, row, CHANNELS[kind], payload)
        if isinstance(result, ResultBuildError):
            alert.state, alert.last_error = AlertState.FAILED, str(result)[:500]
        rows.append(alert)
    return rows


def classify_status(status: int | None) -> str | None:
    """None when the instance is stored, else why not; raises PermanentDeliveryError for a final refusal."""
    if status is None:
        raise TransientDeliveryError("no response (timeout, abort or invalid reply)")
    if status == SUCCESS or status in WARNING_STATUSES or status >> 12 == 0xB:
        return None if status == SUCCESS else f"stored with warning 0x{status:04X}"
    if status >> 8 == 0xA9 or status >> 12 == 0xC or status == SOP_CLASS_NOT_SUPPORTED:
        raise PermanentDeliveryError(f"refused with status 0x{status:04X}")
    raise TransientDeliveryError(f"failed with status 0x{status:04X}")


def send_instance(
    path: Path,
    target: Destination,
    calling_ae_title: str,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> str | None:
    """C-STORE one Part 10 file to ``target``; returns None, or the warning it was stored with.

    Raises TransientDeliveryError (try again later) or PermanentDeliveryError (never).
    """
    try:
        ds = dcmread(path)
    except FileNotFoundError as exc:
        raise PermanentDeliveryError(f"{path.name} is gone (removed by retention before delivery?)") from exc
    except Exception as exc:  # noqa: BLE001 - our own file; unreadable means broken for good
        raise PermanentDeliveryError(f"{path.name} is unreadable: {type(exc).__name__}") from exc
    sop_class = UID(ds.SOPClassUID)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    tls_args = (tls, target.host) if tls is not None else None
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DestinationUnavailable(f"association rejected by {target}")
        raise DestinationUnavailable(f"no association with {target} (unreachable, aborted or TLS failed)")
    try:
        if not any(c.abstract_syntax == sop_class for c in assoc.accepted_contexts):
            raise PermanentDeliveryError(f"{target} does not accept {sop_class.name or sop_class}")
        response = assoc.send_c_store(ds)
        status = int(response.Status) if "Status" in response else None
    finally:
        if assoc.is_established:
            assoc.release()
    return classify_status(status)


class ResultSender(OutboxWorker):
    """The delivery thread for results to PACS, beside :class:`qc_daemon.alerts.AlertDispatcher`."""

    component = "results"

    def __init__(
        self,
        store: Store,
        settings: ResultsSettings,
        calling_ae_title: str,
        node_name: str | None = None,
        poll_s: float = 1.0,
    ):
        super().__init__(store, poll_s)
        self.node_name = node_name  # sends only the results this node recorded: their files are on its disk
        self.settings = settings
        self.calling_ae_title = settings.calling_ae_title or calling_ae_title
        self.channels = result_channels(settings)
        self._tls = settings.tls_context()

    def enabled(self) -> bool:
        return bool(self.channels)

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        """Try every due result once, longest due first (each claimed first, so no two senders store it at
        once); returns how many were delivered. The pass ends at the first result the destination could not
        even be reached for: the others stay due for the next pass rather than each waiting out a timeout
        against a host that is down (and, due longer, they go first then)."""
        with self.store.session() as session:
            due = sorted((row.next_attempt_at, row.id) for channel in self.channels
                         for row in due_alerts(session, channel, now or utcnow(), node_name=self.node_name))
        delivered = 0
        for _, row_id in due:
            if self._stop.is_set():
                break
            if not self._claim(row_id, now or utcnow()):
                continue  # another sender has it
            outcome = self._attempt(row_id)
            if outcome is AlertState.DELIVERED:
                delivered += 1
            elif outcome is None:
                break
        return delivered

    def _claim(self, row_id: int, now: dt.datetime) -> bool:
        lease_s = 3 * self.settings.timeout_s + 30.0  # association, C-STORE and release, each bounded
        with self.store.session() as session:
            return claim_alert(session, row_id, now, lease_s)

    def _attempt(self, row_id: int) -> AlertState | None:
        """One try; returns the row's state after it, None when the destination was not reachable."""
        with self.store.session() as session:
            row = session.get(Alert, row_id)
            channel, payload = row.channel, dict(row.payload)
        bound = log.bind(series_instance_uid=payload.get("series_instance_uid"), revision=payload.get("revision"),
                         channel=channel.value, sop_instance_uid=payload.get("sop_instance_uid"))
        target = self.settings.target
        try:
            if not payload.get("file"):
                raise PermanentDeliveryError("nothing was built to send")
            warning = send_instance(Path(payload["file"]), target, self.calling_ae_title, self.settings.timeout_s,
                                    self._tls)
        except PermanentDeliveryError as exc:
            self._record(row_id, AlertState.FAILED, str(exc))
            bound.warning("result_delivery_failed", destination=str(target), error=str(exc), final=True)
            return AlertState.FAILED
        except TransientDeliveryError as exc:
            attempts, delay = self._record(row_id, AlertState.PENDING, str(exc))
            bound.warning("result_delivery_failed", destination=str(target), error=str(exc), attempts=attempts,
                          retry_in_s=delay)
            return None if isinstance(exc, DestinationUnavailable) else AlertState.PENDING
        self._record(row_id, AlertState.DELIVERED, warning)
        bound.info("result_delivered", destination=str(target), warning=warning)
        return AlertState.DELIVERED

    def _record(self, row_id: int, state: AlertState, error: str | None) -> tuple[int, float | None]:
        """Count the attempt and store its outcome (a pending row's next try after the backoff); returns the
        attempts so far and that delay."""
        with self.store.session() as session:
            row = session.get(Alert, row_id)
            row.attempts += 1
            row.state = state
            row.last_error = error[:500] if error else None
            delay = None
            if state is AlertState.PENDING:
                delay = backoff_s(row.attempts, self.settings.retry_initial_s, self.settings.retry_max_s)
                row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
            elif state is AlertState.DELIVERED:
                row.delivered_at = utcnow()
            session.commit()
            return row.attempts, delay
