"""Intake: the one path by which an instance enters the daemon, from the network or from the drop folder.

Checks the few untrusted tags it needs (SOP instance and series UIDs, size, free disk), writes the bytes to
the spool, and tells the assembler. Failures raise :class:`InstanceRejected` carrying the DIMSE status the
listener returns; the drop folder turns the same error into a rejected file with its reason.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

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
    expected_instances: int | None  # ImagesInAcquisition, when the scanner sends a sane value


class Intake:
    def __init__(
        self,
        spool: Spool,
        on_arrival: Callable[[Arrival], None],
        max_instance_bytes: int,
        min_free_mb: float,
    ):
        self.spool = spool
        self.on_arrival = on_arrival
        self.max_instance_bytes = max_instance_bytes
        self.min_free_mb = min_free_mb

    def has_room(self) -> bool:
        return self.spool.free_mb() >= self.min_free_mb

    def accept(
        self, dataset: Dataset, encoded: Callable[[], bytes], size: int, sop_instance_uid: str | None = None
    ) -> StoreOutcome:
        """Spool one instance. ``encoded`` returns the Part 10 bytes to write; ``size`` is their length."""
        if size > self.max_instance_bytes:
            raise InstanceRejected(
                StoreStatus.OUT_OF_RESOURCES,
                f"instance of {size} bytes exceeds the limit of {self.max_instance_bytes} bytes",
            )
        if not self.has_room():
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, f"free disk below {self.min_free_mb} MB")
        try:
            series_uid = check_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = check_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
        except InvalidUID as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - pydicom parses lazily; a broken header fails here
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, f"unreadable dataset: {exc}"[:200]) from exc
        if sop_instance_uid is not None and sop_instance_uid != sop_uid:
            raise InstanceRejected(
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID",
            )
        try:
            outcome = self.spool.store(series_uid, sop_uid, encoded())
        except OSError as exc:
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, f"cannot write to the spool: {exc}") from exc
        if outcome is StoreOutcome.NEW:
            self.on_arrival(Arrival(series_uid, sop_uid, _expected_instances(dataset)))
        return outcome


def _expected_instances(dataset: Dataset) -> int | None:
    try:
        value = int(dataset.get("ImagesInAcquisition") or 0)
    except Exception:  # noqa: BLE001 - an optional hint; a malformed one is ignored
        return None
    return value if 0 < value <= 100_000 else None
