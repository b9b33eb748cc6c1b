"""Intake: the one path by which an instance enters the daemon, from the network or from the drop folder.

Checks the few untrusted tags it needs (SOP instance and series UIDs, size, free disk), writes the bytes to
the spool, and tells the assembler. Failures raise :class:`InstanceRejected` carrying the DIMSE status the
listener returns; the drop folder turns the same error into a rejected file with its reason.

Nothing from the sender is trusted, its encoding least of all: :mod:`qc_daemon.dicom_bytes` checks the
structure before pydicom parses anything, and raises typed errors that :class:`Intake` maps to statuses.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from qc_daemon.completeness import FACT_TAGS, SliceFacts, announced_count, slice_facts
from qc_daemon.dicom_bytes import (
    Buffer,
    DatasetTooLarge,
    MalformedDataset,
    check_part10,
    decode_dataset,
    part10_header,
)
from qc_daemon.spool import InvalidUID, Spool, StoreOutcome, check_uid


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 B.2.3 and PS3.7 C.4.2) the daemon returns, by name."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


class InstanceRejected(Exception):
    def __init__(self, status: StoreStatus, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Arrival:
    """What the assembler learns about a newly stored instance."""

    series_uid: str
    sop_instance_uid: str
    expected_instances: int | None  # the count the scanner announced (see qc_daemon.completeness), if any
    facts: SliceFacts | None = None  # where the instance lies, for the completeness check
    association_id: int | None = None  # the DICOM association that delivered it; None for the drop folder


class InstanceCounts(Protocol):
    """Where the intake counts its decisions (:class:`qc_daemon.metrics.DaemonMetrics`)."""

    def received(self, source: str) -> None: ...

    def refused(self, reason: str) -> None: ...


NETWORK = "dicom"
DROP_FOLDER = "folder"

# The top-level elements a received instance is parsed for: what is checked here, and the completeness facts.
HEADER_TAGS = FACT_TAGS | {
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x0020000E,  # SeriesInstanceUID
}


class Intake:
    def __init__(
        self,
        spool: Spool,
        on_arrival: Callable[[Arrival], None],
        max_instance_bytes: int,
        min_free_mb: float,
        counts: InstanceCounts,
    ):
        self.spool = spool
        self.on_arrival = on_arrival
        self.max_instance_bytes = max_instance_bytes
        self.min_free_mb = min_free_mb
        self.counts = counts

    def has_room(self) -> bool:
        return self.spool.free_mb() >= self.min_free_mb

    def accept_stream(
        self,
        stream: Buffer,
        transfer_syntax: str,
        *,
        start: int = 0,
        sop_class_uid: str,
        sop_instance_uid: str | None,
        calling_ae: str,
        association_id: int | None = None,
        announce_later: Callable[[Callable[[], None]], None] | None = None,
    ) -> StoreOutcome:
        """Spool one instance received over DIMSE.

        ``stream[start:]`` is the dataset as sent (no file meta) in ``transfer_syntax``: bytes, or a read-only map
        of the file pynetdicom received it into. ``sop_class_uid``/``sop_instance_uid`` are the request's
        Affected SOP Class/Instance UIDs, which the dataset must repeat; ``calling_ae`` goes into the spooled
        file's meta (Source Application Entity Title); ``association_id`` names the association that delivered
        it. Only the header elements needed here are parsed, after the whole structure has been checked; the
        bytes are spooled as sent, after a file meta built for them. ``announce_later``, when given, gets the
        announcement of a new instance to the assembler to run later (the listener runs it once the response is
        sent), instead of running it before this returns.
        """
        with self._counted(NETWORK):
            self._check_size_and_room(len(stream) - start)
            syntax = UID(transfer_syntax)
            try:
                dataset = decode_dataset(stream, syntax, self.max_instance_bytes, start=start, keep=HEADER_TAGS)
            except DatasetTooLarge as exc:
                raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, str(exc)) from exc
            except MalformedDataset as exc:
                raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, f"malformed dataset: {exc}"[:300]) from exc

            def write(series_uid: str, sop_uid: str) -> StoreOutcome:
                head = part10_header(sop_class_uid, sop_uid, syntax, calling_ae)
                with memoryview(stream) as view, view[start:] as body:
                    return self.spool.store(series_uid, sop_uid, head, body)

            return self._store(dataset, write, sop_instance_uid, sop_class_uid, association_id, announce_later)

    def accept_file(self, path: Path) -> StoreOutcome:
        """Spool one Part 10 file (the drop folder): size checked before reading, structure before parsing."""
        with self._counted(DROP_FOLDER):
            return self._accept_file(path)

    def _accept_file(self, path: Path) -> StoreOutcome:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InstanceRejected(StoreStatus.PROCESSING_FAILURE, f"cannot read the file: {exc}") from exc
        self._check_size_and_room(size)
        try:
            with open(path, "rb") as fh:
                data = fh.read(self.max_instance_bytes + 1)
        except OSError as exc:
            raise InstanceRejected(StoreStatus.PROCESSING_FAILURE, f"cannot read the file: {exc}") from exc
        return self.accept(None, lambda: data, len(data))

    def accept(
        self,
        dataset: Dataset | None,
        encoded: Callable[[], bytes],
        size: int,
        sop_instance_uid: str | None = None,
    ) -> StoreOutcome:
        """Spool one Part 10 instance. ``encoded`` returns the bytes to write; ``size`` is their length.

        The bytes are checked (structure, inflated size) before anything is stored; ``dataset`` is their parsed
        form when the caller has it already, else (None) they are parsed here once they passed the check.
        """
        self._check_size_and_room(size)
        data = encoded()
        if len(data) != size:
            self._check_size_and_room(len(data))
        try:
            check_part10(data, inflate_limit=self.max_instance_bytes)
            if dataset is None:  # only a few header values are needed here: no copy of the pixel data
                dataset = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except DatasetTooLarge as exc:
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, str(exc)) from exc
        except MalformedDataset as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}"[:300]) from exc
        except Exception as exc:  # noqa: BLE001 - pydicom's own refusals of an untrusted file
            raise InstanceRejected(
                StoreStatus.CANNOT_UNDERSTAND, f"not a readable DICOM file: {type(exc).__name__}: {exc}"[:300]
            ) from exc
        return self._store(dataset, lambda series_uid, sop_uid: self.spool.store(series_uid, sop_uid, data),
                           sop_instance_uid)

    @contextmanager
    def _counted(self, source: str) -> Iterator[None]:
        try:
            yield
        except InstanceRejected as exc:
            self.counts.refused(exc.status.name.lower())
            raise
        except Exception:
            self.counts.refused("internal_error")
            raise
        self.counts.received(source)

    def _check_size_and_room(self, size: int) -> None:
        if size > self.max_instance_bytes:
            raise InstanceRejected(
                StoreStatus.OUT_OF_RESOURCES,
                f"instance of {size} bytes exceeds the limit of {self.max_instance_bytes} bytes",
            )
        if not self.has_room():
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, f"free disk below {self.min_free_mb} MB")

    def _store(
        self,
        dataset: Dataset,
        write: Callable[[str, str], StoreOutcome],
        sop_instance_uid: str | None,
        sop_class_uid: str | None = None,
        association_id: int | None = None,
        announce_later: Callable[[Callable[[], None]], None] | None = None,
    ) -> StoreOutcome:
        try:
            series_uid = check_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = check_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
            dataset_class = str(dataset.get("SOPClassUID", "") or "").rstrip("\x00 ")
        except InvalidUID as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - pydicom parses lazily; a broken header fails here
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, f"unreadable dataset: {exc}"[:200]) from exc
        if sop_instance_uid is not None and sop_instance_uid != sop_uid:
            raise InstanceRejected(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID",
            )
        if sop_class_uid is not None and sop_class_uid != dataset_class:
            raise InstanceRejected(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"SOPClassUID in the dataset ({dataset_class[:64]!r}) differs from the request's "
                f"Affected SOP Class UID ({sop_class_uid[:64]!r})",
            )
        try:
            outcome = write(series_uid, sop_uid)  # the spool: only once every check above has passed
        except InvalidUID as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
        except OSError as exc:
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
        if outcome is StoreOutcome.NEW:
            announce = partial(self._announce, dataset, series_uid, sop_uid, association_id)
            if announce_later is None:
                announce()
            else:
                announce_later(announce)
        return outcome

    def _announce(self, dataset: Dataset, series_uid: str, sop_uid: str, association_id: int | None) -> None:
        self.on_arrival(_arrival(dataset, series_uid, sop_uid, association_id))


def _arrival(dataset: Dataset, series_uid: str, sop_uid: str, association_id: int | None) -> Arrival:
    """What the assembler learns from the header already parsed; hints that cannot be read are left out."""
    try:
        expected, facts = announced_count(dataset), slice_facts(dataset)
    except Exception:  # noqa: BLE001 - optional hints from an untrusted header: the quiet period still applies
        expected, facts = None, None
    return Arrival(series_uid, sop_uid, expected, facts, association_id)
