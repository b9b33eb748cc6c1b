"""The DICOM listener: a pynetdicom AE answering C-ECHO and C-STORE.

Handlers are plain functions that get their dependencies as arguments and turn every failure of untrusted
input into a DIMSE status. C-STORE answers success only after :class:`~qc_daemon.intake.Intake` has the
instance durably in the spool; nothing slow happens here (assembly and scoring run in workers).
"""

from __future__ import annotations

import ipaddress
from functools import partial

from pydicom import uid as dcm_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from qc_daemon.intake import InstanceRejected, Intake, StoreStatus
from qc_daemon.logs import get_logger
from qc_daemon.settings import DicomSettings
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


def build_ae(settings: DicomSettings) -> AE:
    ae = AE(ae_title=settings.ae_title)
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
        event.assoc.acse.send_reject(*REJECT_PEER_NOT_ALLOWED)
        return
    if not intake.has_room():
        log.warning("association_rejected", peer=address, reason="free disk below the floor")
        event.assoc.acse.send_reject(*REJECT_NO_DISK)


def handle_store(event: evt.Event, intake: Intake) -> int:
    request = event.request
    calling_ae = event.assoc.requestor.ae_title
    sop_uid = str(request.AffectedSOPInstanceUID or "")
    try:
        stream = request.DataSet.getvalue()
        meta = event.file_meta
        meta.SourceApplicationEntityTitle = calling_ae
        outcome = intake.accept(
            event.dataset,
            partial(_part10, meta, stream),
            len(stream),
            sop_instance_uid=sop_uid or None,
        )
    except InstanceRejected as exc:
        log.warning("instance_rejected", calling_ae=calling_ae, status=f"0x{int(exc.status):04X}", reason=exc.reason)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - the boundary: any surprise becomes a status, never a crash
        log.exception("instance_rejected", calling_ae=calling_ae, reason=f"{type(exc).__name__}: {exc}"[:200])
        return StoreStatus.CANNOT_UNDERSTAND
    if outcome is StoreOutcome.DUPLICATE:
        log.info("instance_duplicate", sop_instance_uid=sop_uid, calling_ae=calling_ae)
    return StoreStatus.SUCCESS


def _part10(meta, stream: bytes) -> bytes:
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    buffer.write(stream)
    return buffer.getvalue()


def _peer_allowed(address: str, allowed: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in allowed)


def start_listener(settings: DicomSettings, intake: Intake) -> tuple[AE, ThreadedAssociationServer]:
    ae = build_ae(settings)
    allowed = [ipaddress.ip_network(p, strict=False) for p in settings.allowed_peers]
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [intake]),
        (evt.EVT_REQUESTED, handle_requested, [allowed, intake]),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    log.info("listener_started", ae_title=settings.ae_title, host=settings.host, port=server.server_address[1])
    return ae, server
