"""Intake: the one path by which an instance enters the daemon, from the network or from the drop folder.

Checks the few untrusted tags it needs (SOP instance and series UIDs, size, free disk), writes the bytes to
the spool, and tells the assembler. Failures raise :class:`InstanceRejected` carrying the DIMSE status the
listener returns; the drop folder turns the same error into a rejected file with its reason.

Nothing from the sender is trusted, its encoding least of all: before pydicom parses a dataset, the element
headers are walked (:func:`check_dataset`, :func:`check_part10`) and every declared length is checked against
the bytes really present, so a 4 GB length in a 1 kB instance is refused instead of being read or allocated,
and a deflated dataset is inflated only up to the instance size limit. Those checks raise typed errors
(:class:`MalformedDataset`, :class:`DatasetTooLarge`); the boundary (:class:`Intake`) maps them to statuses.
"""

from __future__ import annotations

import enum
import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

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


class MalformedDataset(ValueError):
    """The encoding itself is broken: truncated, lengths beyond the data, invalid VRs, unterminated items..."""


class DatasetTooLarge(ValueError):
    """The dataset (once inflated, for the deflated transfer syntax) is larger than the limit."""


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

    def accept_stream(
        self,
        stream: bytes,
        transfer_syntax: str,
        encoded: Callable[[], bytes],
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> StoreOutcome:
        """Spool one instance received over DIMSE.

        ``stream`` is the dataset as sent (no file meta) in ``transfer_syntax``; ``encoded`` returns the Part 10
        bytes to write. ``sop_class_uid``/``sop_instance_uid`` are the request's Affected SOP Class/Instance UIDs,
        which the dataset must repeat. The dataset is decoded here, only after its structure has been checked.
        """
        self._check_size_and_room(len(stream))
        syntax = UID(transfer_syntax)
        try:
            dataset = decode_dataset(stream, syntax, self.max_instance_bytes)
        except DatasetTooLarge as exc:
            raise InstanceRejected(StoreStatus.OUT_OF_RESOURCES, str(exc)) from exc
        except MalformedDataset as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, f"malformed dataset: {exc}"[:300]) from exc
        return self._store(dataset, encoded, sop_instance_uid, sop_class_uid)

    def accept_file(self, path: Path) -> StoreOutcome:
        """Spool one Part 10 file (the drop folder): size checked before reading, structure before parsing."""
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
        return self._store(dataset, lambda: data, sop_instance_uid)

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
        encoded: Callable[[], bytes],
        sop_instance_uid: str | None,
        sop_class_uid: str | None = None,
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
            outcome = self.spool.store(series_uid, sop_uid, encoded())
        except InvalidUID as exc:
            raise InstanceRejected(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
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


# ---- the encoding of untrusted bytes ------------------------------------------------------------------------

# Real datasets nest sequences a handful of levels deep and hold well under a million elements (a large
# enhanced multi-frame: a few hundred thousand); more is an attack on the parser's stack or memory.
MAX_NESTING = 32
MAX_ELEMENTS = 1_000_000

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())


def decode_dataset(stream: bytes, transfer_syntax: UID, inflate_limit: int) -> Dataset:
    """A received dataset (no file meta), checked and then parsed; the deflated syntax inflated boundedly."""
    if not transfer_syntax.is_transfer_syntax:
        raise MalformedDataset(f"unknown transfer syntax {str(transfer_syntax)[:64]!r}")
    if transfer_syntax.is_deflated:
        stream = inflate(stream, inflate_limit)
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    check_dataset(stream, implicit=implicit, little=little)
    # The intake needs a few header values: pydicom stops before the pixel data instead of copying it.
    return read_dataset(io.BytesIO(stream), implicit, little, stop_when=_at_pixel_data)


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == _PIXEL_DATA


def inflate(data: bytes, limit: int) -> bytes:
    """Raw deflate -> bytes, refusing (without producing them) more than ``limit`` bytes: no deflate bomb."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MalformedDataset(f"corrupt deflated data: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise DatasetTooLarge(f"deflated dataset inflates to more than the limit of {limit} bytes")
    return out


def check_dataset(data: bytes, *, implicit: bool, little: bool) -> None:
    """Walk a dataset's element headers (values are skipped, never read); raise MalformedDataset if broken."""
    walker = _Walker(_BytesSource(data))
    walker.dataset(0, len(data), implicit, "<" if little else ">", depth=0)


def check_part10(source: bytes | BinaryIO, inflate_limit: int, size: int | None = None) -> UID:
    """Check a Part 10 file (bytes, or an open binary file of ``size`` bytes); returns its transfer syntax.

    The file meta and then the dataset are walked header by header; for a file only the headers are read.
    A deflated dataset is inflated in memory, up to ``inflate_limit`` bytes (else DatasetTooLarge).
    """
    src: _BytesSource | _FileSource
    if isinstance(source, (bytes, bytearray, memoryview)):
        src = _BytesSource(source)
    else:
        src = _FileSource(source, os.fstat(source.fileno()).st_size if size is None else size)
    offset, syntax = _walk_file_meta(src)
    if syntax.is_deflated:
        data = inflate(src.read(offset, src.size - offset), inflate_limit)
        _Walker(_BytesSource(data)).dataset(0, len(data), False, "<", depth=0)
    else:
        endian = "<" if syntax.is_little_endian else ">"
        _Walker(src).dataset(offset, src.size, syntax.is_implicit_VR, endian, depth=0)
    return syntax


class _BytesSource:
    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = memoryview(data)
        self.size = len(self.data)

    def read(self, pos: int, count: int) -> bytes:
        return bytes(self.data[pos : pos + count])


class _FileSource:
    def __init__(self, fh: BinaryIO, size: int):
        self.fh, self.size = fh, size

    def read(self, pos: int, count: int) -> bytes:
        self.fh.seek(pos)
        return self.fh.read(min(count, self.size - pos))  # never ask the OS for more than the file holds


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _walk_file_meta(src) -> tuple[int, UID]:
    """The file meta (always explicit VR little endian): returns where the dataset starts and its syntax."""
    if src.size < 132 or src.read(128, 4) != b"DICM":
        raise MalformedDataset("not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble")
    pos, syntax = 132, None
    while src.size - pos >= 8:
        head = src.read(pos, 8)
        group, element = struct.unpack("<HH", head[:4])
        if group != 0x0002:
            break
        vr = head[4:6]
        if vr in _LONG_VRS:
            if src.size - pos < 12:
                raise MalformedDataset(f"file meta truncated at offset {pos}")
            (length,) = struct.unpack("<I", src.read(pos + 8, 4))
            pos += 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack("<H", head[6:8])
            pos += 8
        else:
            raise MalformedDataset(f"file meta element {_tag(group << 16 | element)} has an invalid VR {vr!r}")
        if length == _UNDEFINED or length > src.size - pos:
            raise MalformedDataset(f"file meta element {_tag(group << 16 | element)} declares {length} bytes, "
                                   f"only {src.size - pos} remain")
        if element == 0x0010:
            syntax = src.read(pos, min(length, 66)).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    if not syntax:
        raise MalformedDataset("file meta has no TransferSyntaxUID")
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        raise MalformedDataset(f"unknown transfer syntax {syntax[:64]!r}")
    return pos, uid


class _Walker:
    """Element headers of one encoded dataset, recursively through sequences, items and fragments.

    Mirrors what pydicom accepts (including its switch to the other VR encoding when a dataset's first element
    says so), but refuses what pydicom would read past the end, allocate from a lying length, or recurse on.
    """

    def __init__(self, src):
        self.src = src
        self.elements = 0

    def _count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise MalformedDataset(f"more than {MAX_ELEMENTS} elements")

    def _header(self, pos: int, end: int, count: int, what: str) -> bytes:
        if end - pos < count:
            raise MalformedDataset(f"truncated {what} at offset {pos}")
        return self.src.read(pos, count)

    def dataset(self, pos: int, end: int, implicit: bool, endian: str, depth: int, in_item: bool = False) -> int:
        """Elements from ``pos`` to ``end`` (or, ``in_item``, to the item delimiter); returns the end position."""
        if depth > MAX_NESTING:
            raise MalformedDataset(f"sequences nested deeper than {MAX_NESTING} levels")
        first = True
        while pos < end:
            if end - pos < 8 and not in_item and depth == 0 and not self.src.read(pos, end - pos).strip(b"\x00"):
                return end  # a few zero bytes of trailing padding, which pydicom ignores too
            head = self._header(pos, end, 8, "element header")
            group, element = struct.unpack(endian + "HH", head[:4])
            tag = group << 16 | element
            if tag == _ITEM_END:
                if in_item:
                    return pos + 8
                raise MalformedDataset(f"item delimiter outside an item at offset {pos}")
            if tag in (_ITEM, _SEQUENCE_END):
                raise MalformedDataset(f"unexpected {_tag(tag)} at offset {pos}")
            if first:  # pydicom decides the VR encoding from the first element (read_dataset): so do we
                found_implicit = not (0x40 < head[4] < 0x5B and 0x40 < head[5] < 0x5B)
                # at the top level either way; in a sequence item only from explicit to implicit
                implicit = found_implicit if depth == 0 else (implicit or found_implicit)
                first = False
            vr: bytes | None = None
            if implicit:
                (length,) = struct.unpack(endian + "I", head[4:8])
                pos += 8
            else:
                vr = head[4:6]
                if vr in _LONG_VRS:
                    (length,) = struct.unpack(endian + "I", self._header(pos + 8, end, 4, "element length"))
                    pos += 12
                elif vr in _SHORT_VRS:
                    (length,) = struct.unpack(endian + "H", head[6:8])
                    pos += 8
                else:
                    raise MalformedDataset(f"{_tag(tag)} has an invalid VR {vr!r} at offset {pos}")
            self._count()
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    pos = self.fragments(pos, end, endian)
                elif vr is None or vr == b"SQ":
                    pos = self.sequence(pos, end, implicit, endian, depth + 1)
                elif vr == b"UN":  # an undefined-length UN is a sequence encoded as implicit VR little endian
                    pos = self.sequence(pos, end, True, "<", depth + 1)
                else:
                    raise MalformedDataset(f"{_tag(tag)} ({vr.decode('ascii')}) has an undefined length")
                continue
            if length > end - pos:
                raise MalformedDataset(
                    f"{_tag(tag)} declares {length} bytes at offset {pos}, only {end - pos} remain"
                )
            if vr == b"SQ" or (vr is None and _is_sequence(tag)):
                self.items(pos, pos + length, implicit, endian, depth + 1)
            pos += length
        if in_item:
            raise MalformedDataset("item without its delimiter (truncated)")
        return pos

    def sequence(self, pos: int, end: int, implicit: bool, endian: str, depth: int) -> int:
        """Items of an undefined-length sequence, up to and including its delimiter."""
        while True:
            head = self._header(pos, end, 8, "sequence item (no sequence delimiter)")
            group, element, length = struct.unpack(endian + "HHI", head)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item in a sequence, found {_tag(tag)} at offset {pos - 8}")
            pos = self.item(pos, end, length, implicit, endian, depth)

    def items(self, pos: int, end: int, implicit: bool, endian: str, depth: int) -> None:
        """Items of a defined-length sequence, which must fill it exactly."""
        while pos < end:
            head = self._header(pos, end, 8, "sequence item")
            group, element, length = struct.unpack(endian + "HHI", head)
            tag = group << 16 | element
            pos += 8
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item in a sequence, found {_tag(tag)} at offset {pos - 8}")
            pos = self.item(pos, end, length, implicit, endian, depth)

    def item(self, pos: int, end: int, length: int, implicit: bool, endian: str, depth: int) -> int:
        self._count()
        if length == _UNDEFINED:
            return self.dataset(pos, end, implicit, endian, depth, in_item=True)
        if length > end - pos:
            raise MalformedDataset(f"item declares {length} bytes at offset {pos}, only {end - pos} remain")
        self.dataset(pos, pos + length, implicit, endian, depth)
        return pos + length

    def fragments(self, pos: int, end: int, endian: str) -> int:
        """Encapsulated pixel data: defined-length items up to the sequence delimiter."""
        while True:
            head = self._header(pos, end, 8, "pixel data fragment (no sequence delimiter)")
            group, element, length = struct.unpack(endian + "HHI", head)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDataset(f"malformed encapsulated pixel data at offset {pos - 8}")
            if length > end - pos:
                raise MalformedDataset(f"pixel data fragment declares {length} bytes, only {end - pos} remain")
            self._count()
            pos += length


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
