"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

Handlers are plain functions that get their dependencies as arguments and turn every failure of untrusted
input into a DIMSE status. C-STORE answers success only after :class:`~qc_daemon.intake.Intake` has the
instance durably in the spool; nothing slow happens here (assembly and scoring run in workers), and telling the
assembler of the instance waits until the response is sent (:class:`AfterResponse`). The associations run
:mod:`qc_daemon.pynetdicom_tuning`'s event-driven loops.
"""

from __future__ import annotations

import ipaddress
import mmap
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from qc_daemon.dicom_bytes import Buffer, dataset_start
from qc_daemon.intake import InstanceRejected, Intake, StoreStatus
from qc_daemon.logs import get_logger
from qc_daemon.pynetdicom_tuning import event_driven_request_handler, install_command_encoder
from qc_daemon.settings import DicomSettings, SettingsError
from qc_daemon.spool import StoreOutcome

log = get_logger(__name__)

# Uncompressed first (what every sender offers), then the compressed syntaxes we can decode
# (pylibjpeg-libjpeg: JPEG; pyjpegls: JPEG-LS; pylibjpeg-openjpeg: JPEG 2000/HTJ2K; pylibjpeg-rle: RLE).
TRANSFER_SYNTAXES: list[str] = [
    dcm_uid.ExplicitVRLittleEndian,
    dcm_uid.ImplicitVRLittleEndian,
    dcm_uid.DeflatedExplicitVRLittleEndian,
    dcm_uid.ExplicitVRBigEndian,
    dcm_uid.JPEGBaseline8Bit,
    dcm_uid.JPEGExtended12Bit,
    dcm_uid.JPEGLossless,
    dcm_uid.JPEGLosslessSV1,
    dcm_uid.JPEGLSLossless,
    dcm_uid.JPEGLSNearLossless,
    dcm_uid.JPEG2000Lossless,
    dcm_uid.JPEG2000,
    dcm_uid.HTJ2KLossless,
    dcm_uid.HTJ2KLosslessRPCL,
    dcm_uid.HTJ2K,
    dcm_uid.RLELossless,
]

# A-ASSOCIATE-RJ parameters (PS3.8 9.3.4): (result, source, diagnostic)
REJECT_PEER_NOT_ALLOWED = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_NO_DISK = (0x02, 0x03, 0x01)  # transient, service provider (presentation), temporary congestion


# The largest P-DATA PDU we accept (what we tell the sender): DCMTK's upper limit. With its default 16 kB a
# 141 kB MR slice arrives in 10 PDUs, each decoded by pynetdicom's Python reactor; with this one in 2.
MAX_PDU_BYTES = 131072


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.require_called_aet = settings.require_called_aet
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    # Every storage SOP class is accepted (a PACS routing a whole study must not fail on a raw-data object);
    # only MR image series are scored, the rest are recorded as skipped with the reason.
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def handle_echo(event: evt.Event) -> int:
    return StoreStatus.SUCCESS


def handle_requested(event: evt.Event, allowed_peers: list, intake: Intake) -> None:
    """Reject an association from a peer outside the allow-list, or when the disk is too full to store."""
    address = event.assoc.requestor.address
    if allowed_peers and not _peer_allowed(address, allowed_peers):
        log.warning("association_rejected", peer=address, reason="peer address not allowed")
        _reject(event.assoc, REJECT_PEER_NOT_ALLOWED)
        return
    if not intake.has_room():
        log.warning("association_rejected", peer=address, reason="free disk below the floor")
        _reject(event.assoc, REJECT_NO_DISK)


def _reject(assoc, reason: tuple[int, int, int]) -> None:
    """Send A-ASSOCIATE-RJ and wait until it went out, as pynetdicom does for its own rejections.

    Without the wait the association thread closes the socket right after this handler returns, usually before
    the DUL thread has sent the PDU: the peer then sees a dropped connection (an abort), not the rejection and
    its reason (transient for a full disk, so a scanner retries later; permanent for a peer not allowed).
    """
    assoc.acse.send_reject(*reason)
    assoc.kill()


class AfterResponse:
    """Work each association leaves to be done once its C-STORE response is on the wire.

    Telling the assembler of a new instance (reading its completeness facts, and at the last instance checking the
    grid and handing the series over) does not change the response, so it runs after it, on pynetdicom's DUL
    thread (``EVT_PDU_SENT``), while the sender prepares its next instance; what is left at the association's end
    runs then, before the end is reported. The DUL thread reads the sender's next PDU only after this work, so
    instances are announced in the order they arrived and before the release that follows them.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[int, list[Callable[[], None]]] = {}

    def defer(self, association_id: int, work: Callable[[], None]) -> None:
        with self._lock:
            self._pending.setdefault(association_id, []).append(work)

    def run(self, association_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(association_id, ())
        for work in pending:
            try:
                work()
            except Exception:  # noqa: BLE001 - never end the DUL thread: the instance is spooled, a restart finds it
                log.exception("after_response_error")


def handle_store(event: evt.Event, intake: Intake, after_response: AfterResponse) -> int | Dataset:
    """Spool one instance. The dataset is decoded by the intake after its encoding was checked: never through
    ``event.dataset``, which would parse (and inflate, for the deflated syntax) whatever the peer claims."""
    request = event.request
    calling_ae = event.assoc.requestor.ae_title
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    try:
        with _received_dataset(event) as (stream, start):
            outcome = intake.accept_stream(
                stream,
                event.context.transfer_syntax,
                start=start,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=sop_uid or None,
                calling_ae=calling_ae,
                association_id=id(event.assoc),
                announce_later=partial(after_response.defer, id(event.assoc)),
            )
    except InstanceRejected as exc:
        log.warning("instance_rejected", calling_ae=calling_ae, status=f"0x{int(exc.status):04X}", reason=exc.reason)
        return failure_status(exc.status, exc.reason)
    except Exception as exc:  # noqa: BLE001 - the boundary: any surprise becomes a status, never a crash
        log.exception("instance_rejected", calling_ae=calling_ae, reason=f"{type(exc).__name__}: {exc}"[:200])
        return failure_status(StoreStatus.CANNOT_UNDERSTAND, "internal error while storing the instance")
    if outcome is StoreOutcome.DUPLICATE:
        log.info("instance_duplicate", sop_instance_uid=sop_uid, calling_ae=calling_ae)
    return StoreStatus.SUCCESS


def handle_pdu_sent(event: evt.Event, after_response: AfterResponse) -> None:
    after_response.run(id(event.assoc))


def handle_association_end(event: evt.Event, on_end: Callable[[int], None], after_response: AfterResponse) -> None:
    """Tell the assembler an association ended: released (its series may be complete now), or aborted or
    closed (they wait for the quiet period), after the work its last responses left. Never raises: the
    association is over either way."""
    after_response.run(id(event.assoc))
    try:
        on_end(id(event.assoc))
    except Exception:  # noqa: BLE001 - a failed early completion leaves the quiet period as the fallback
        log.exception("association_end_error", event=event.event.name)


def failure_status(status: StoreStatus, reason: str) -> Dataset:
    """A C-STORE failure with its reason in Error Comment (0000,0902), so the sender's log says why."""
    response = Dataset()
    response.Status = int(status)
    printable = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in reason)  # LO: no backslash
    response.ErrorComment = printable[:64]
    return response


@contextmanager
def _received_dataset(event: evt.Event) -> Iterator[tuple[Buffer, int]]:
    """The received dataset and where it starts: mapped read-only from the file pynetdicom received it into
    (chunked receiving, which pynetdicom removes once the handler returns), else the bytes it kept in memory."""
    path = event.dataset_path  # None unless pynetdicom's STORE_RECV_CHUNKED_DATASET is on
    if path is None:
        yield event.request.DataSet.getvalue(), 0
        return
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start, _ = dataset_start(mapped)  # after the file meta pynetdicom wrote
        yield mapped, start


def _peer_allowed(address: str, allowed: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in allowed)


class _ServerTLSContext(ssl.SSLContext):
    """A server context whose TLS handshake runs on the association's own thread, with a timeout.

    pynetdicom wraps each accepted socket in its accept loop; with the default handshake-on-wrap, one client
    that connects and sends nothing (or speaks plain DICOM) would hold that loop, and so every other scanner,
    for as long as it likes. Here the handshake happens on the first read, in the association's thread.
    """

    handshake_timeout_s: float = 30.0

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        sock.settimeout(self.handshake_timeout_s)
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def build_ssl_context(settings: DicomSettings) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+), or None for plain TCP; client certificates are required and
    verified against ``tls_ca_file`` when it is set."""
    if not settings.tls:
        return None
    context = _ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout_s = settings.network_timeout_s
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(Path(settings.tls_cert_file).expanduser(), Path(settings.tls_key_file).expanduser())
        if settings.tls_ca_file:
            context.load_verify_locations(cafile=Path(settings.tls_ca_file).expanduser())
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise SettingsError(f"dicom TLS files cannot be loaded: {exc}") from exc
    return context


def start_listener(
    settings: DicomSettings,
    intake: Intake,
    *,
    on_released: Callable[[int], None],
    on_ended: Callable[[int], None],
) -> tuple[AE, ThreadedAssociationServer]:
    """Start the AE. ``on_released`` gets the id of an association the peer released (the ``association_id``
    of the instances it delivered); ``on_ended`` that of one aborted or closed without a release (the
    connection's close follows a release too: ``on_ended`` must then do nothing harmful)."""
    # pynetdicom's switches are process-wide: the listener started last decides (handle_store takes either form).
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = settings.receive_to_disk
    # Its "standard" handlers format a message for every PDU and DIMSE message, all below the WARNING level that
    # qc_daemon.logs keeps for pynetdicom (they would dump patient data): not binding them is ~8% more throughput.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    ae = build_ae(settings)
    ssl_context = build_ssl_context(settings)
    allowed = [ipaddress.ip_network(p, strict=False) for p in settings.allowed_peers]
    after_response = AfterResponse()
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [intake, after_response]),
        (evt.EVT_PDU_SENT, handle_pdu_sent, [after_response]),
        (evt.EVT_REQUESTED, handle_requested, [allowed, intake]),
        (evt.EVT_RELEASED, handle_association_end, [on_released, after_response]),
        (evt.EVT_ABORTED, handle_association_end, [on_ended, after_response]),
        (evt.EVT_CONN_CLOSE, handle_association_end, [on_ended, after_response]),
    ]
    install_command_encoder()
    # ae.start_server(block=False), with the request handler whose associations wait on events, not 1 ms sleeps
    server = ae.make_server(
        (settings.host, settings.port),
        evt_handlers=handlers,
        ssl_context=ssl_context,
        server_class=ThreadedAssociationServer,
        request_handler=event_driven_request_handler(),
    )
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    ae._servers.append(server)  # so that ae.shutdown() stops it too, as for start_server's
    log.info(
        "listener_started",
        ae_title=settings.ae_title,
        host=settings.host,
        port=server.server_address[1],
        tls=ssl_context is not None,
        client_certificates=bool(settings.tls_ca_file),
    )
    return ae, server
