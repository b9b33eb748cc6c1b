"""Storage SCU: send DICOM files to a node as stored, each in its own transfer syntax (``qc-daemon send``).

A scanner proposes, for every SOP class it sends, the transfer syntax its files are encoded in. This does the
same: it reads each file's meta header, proposes one presentation context per (SOP class, transfer syntax)
present, and sends the file's bytes without decoding or re-encoding them. More distinct pairs than an
association may carry (128 contexts) are split over several associations, one after the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

# PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255, so at most 128 per association.
MAX_CONTEXTS_PER_ASSOCIATION = 128
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: a file-set index, not an instance to store
SUCCESS = 0x0000
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @property
    def context(self) -> tuple[str, str]:
        return (self.sop_class_uid, self.transfer_syntax_uid)


@dataclass(frozen=True)
class SendFailure:
    path: Path
    reason: str


@dataclass
class SendReport:
    destination: str
    sent: list[Path] = field(default_factory=list)
    warnings: list[tuple[Path, int]] = field(default_factory=list)
    failed: list[SendFailure] = field(default_factory=list)
    skipped: list[SendFailure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary_lines(self) -> list[str]:
        lines = [
            f"sent {len(self.sent)} of {len(self.sent) + len(self.failed)} instances to {self.destination}"
            + (f", {len(self.failed)} failed" if self.failed else "")
            + (f"; skipped {len(self.skipped)} files that are not DICOM instances" if self.skipped else "")
        ]
        lines += [f"  warning 0x{status:04X}: {path}" for path, status in self.warnings]
        lines += [f"  FAILED {failure.path}: {failure.reason}" for failure in self.failed]
        lines += [f"  skipped {failure.path}: {failure.reason}" for failure in self.skipped]
        return lines


def read_dicom_files(folder: Path, recursive: bool = False) -> tuple[list[DicomFile], list[SendFailure]]:
    """Every DICOM instance file in ``folder`` (sorted by path), and the files that are not ones, with why."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files: list[DicomFile] = []
    skipped: list[SendFailure] = []
    for path in sorted(p for p in candidates if p.is_file()):
        try:
            meta = read_file_meta_info(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append(SendFailure(path, f"not a DICOM file ({type(exc).__name__})"))
            continue
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if not (sop_class and sop_instance and syntax):
            skipped.append(SendFailure(path, "file meta lacks the SOP class, instance or transfer syntax UID"))
        elif sop_class == MEDIA_STORAGE_DIRECTORY:
            skipped.append(SendFailure(path, "a DICOMDIR"))
        else:
            files.append(DicomFile(path, sop_class, sop_instance, syntax))
    return files, skipped


def group_for_associations(
    files: Sequence[DicomFile], max_contexts: int = MAX_CONTEXTS_PER_ASSOCIATION
) -> list[list[DicomFile]]:
    """Split ``files`` so that each group needs at most ``max_contexts`` distinct (SOP class, syntax) pairs."""
    contexts = sorted({f.context for f in files})
    batches = [set(contexts[i : i + max_contexts]) for i in range(0, len(contexts), max_contexts)]
    return [[f for f in files if f.context in batch] for batch in batches]


def send_files(
    files: Iterable[DicomFile],
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    timeout_s: float = 60.0,
    max_contexts: int = MAX_CONTEXTS_PER_ASSOCIATION,
) -> SendReport:
    """C-STORE every file as stored; a file's failure (status, refused context, lost association) is reported."""
    report = SendReport(destination=f"{called_aet}@{host}:{port}")
    for group in group_for_associations(list(files), max_contexts):
        _send_group(group, host, port, called_aet, calling_aet, timeout_s, report)
    return report


def _send_group(group, host, port, called_aet, calling_aet, timeout_s, report: SendReport) -> None:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntax in sorted({f.context for f in group}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (peer unreachable or aborted)"
        report.failed += [SendFailure(f.path, why) for f in group]
        return
    accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
    # With chunked sending, pynetdicom streams the file's data set bytes as they are on disk.
    chunked_before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for index, item in enumerate(group):
            if item.context not in accepted:
                report.failed.append(SendFailure(item.path, f"the peer refused SOP class {item.sop_class_uid} "
                                                            f"in transfer syntax {item.transfer_syntax_uid}"))
                continue
            if not assoc.is_established:
                report.failed += [SendFailure(f.path, "association lost") for f in group[index:]]
                return
            _record(report, item.path, assoc.send_c_store(item.path, msg_id=index % 65535 + 1))
        assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = chunked_before


def _record(report: SendReport, path: Path, response) -> None:
    status = int(response.Status) if "Status" in response else None
    if status is None:
        report.failed.append(SendFailure(path, "no response (timeout, abort or invalid reply)"))
    elif status == SUCCESS:
        report.sent.append(path)
    elif status in WARNING_STATUSES:
        report.sent.append(path)
        report.warnings.append((path, status))
    else:
        report.failed.append(SendFailure(path, f"status 0x{status:04X}"))
