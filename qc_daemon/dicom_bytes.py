"""Structure checks on untrusted DICOM bytes, before pydicom parses them.

The element headers are walked and every declared length is checked against the bytes really present, so a
4 GB length in a 1 kB instance is refused instead of being read or allocated; a deflated dataset is inflated
only up to a limit. Failures raise :class:`MalformedDataset` or :class:`DatasetTooLarge`; the intake maps them
to DIMSE statuses.

The walk reads a buffer in place (``bytes``, or a read-only ``mmap`` of a received file), so checking a large
instance costs no copy of it; the same walk notes where the top-level elements the caller wants lie, and only
those are handed to pydicom (:func:`decode_dataset`), so a vendor header of hundreds of elements is parsed once,
here, not twice.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zlib
from collections.abc import Set as AbstractSet
from functools import lru_cache
from typing import BinaryIO, Union

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID


class MalformedDataset(ValueError):
    """The encoding itself is broken: truncated, lengths beyond the data, invalid VRs, unterminated items..."""


class DatasetTooLarge(ValueError):
    """The dataset (once inflated, for the deflated transfer syntax) is larger than the limit."""


Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]

# Real datasets nest sequences a handful of levels deep and hold well under a million elements (a large
# enhanced multi-frame: a few hundred thousand); more is an attack on the parser's stack or memory.
MAX_NESTING = 32
MAX_ELEMENTS = 1_000_000

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


def _vr_codes(names: bytes) -> frozenset[int]:
    """VRs as the 16-bit numbers their two bytes make (compared without slicing the buffer)."""
    return frozenset(int.from_bytes(vr, "big") for vr in names.split())


_LONG_VRS = _vr_codes(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV")
_SHORT_VRS = _vr_codes(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US")
_SQ, _UN = int.from_bytes(b"SQ", "big"), int.from_bytes(b"UN", "big")
_TAG = {e: struct.Struct(e + "HH") for e in "<>"}
_U16 = {e: struct.Struct(e + "H") for e in "<>"}
_U32 = {e: struct.Struct(e + "I") for e in "<>"}
_ITEM_HEADER = {e: struct.Struct(e + "HHI") for e in "<>"}


def decode_dataset(
    stream: Buffer,
    transfer_syntax: UID,
    inflate_limit: int,
    *,
    start: int = 0,
    keep: AbstractSet[int] | None = None,
) -> Dataset:
    """A received dataset (no file meta), ``stream[start:]``, checked and then parsed; the deflated syntax is
    inflated boundedly.

    With ``keep`` (top-level tags as ``group << 16 | element``), only the top-level elements it holds are parsed,
    whole (their sequences included); without it, every element before the pixel data.
    """
    if not transfer_syntax.is_transfer_syntax:
        raise MalformedDataset(f"unknown transfer syntax {str(transfer_syntax)[:64]!r}")
    if transfer_syntax.is_deflated:
        stream, start = inflate(stream[start:], inflate_limit), 0
    end = len(stream)
    walker = _Walker(stream, keep)
    walker.dataset(start, end, transfer_syntax.is_implicit_VR, "<" if transfer_syntax.is_little_endian else ">", 0)
    implicit, little = walker.implicit, transfer_syntax.is_little_endian
    if keep is not None:
        kept = b"".join(stream[a:b] for a, b in walker.kept)
        return read_dataset(io.BytesIO(kept), implicit, little)
    # The intake needs a few header values: pydicom stops before the pixel data instead of copying it.
    return read_dataset(io.BytesIO(stream[start:]), implicit, little, stop_when=_at_pixel_data)


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == _PIXEL_DATA


def inflate(data: Buffer, limit: int) -> bytes:
    """Raw deflate -> bytes, refusing (without producing them) more than ``limit`` bytes: no deflate bomb."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MalformedDataset(f"corrupt deflated data: {exc}") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise DatasetTooLarge(f"deflated dataset inflates to more than the limit of {limit} bytes")
    return out


def check_dataset(data: Buffer, *, implicit: bool, little: bool) -> None:
    """Walk a dataset's element headers (values are skipped, never read); raise MalformedDataset if broken."""
    _Walker(data).dataset(0, len(data), implicit, "<" if little else ">", depth=0)


def check_part10(source: Buffer | BinaryIO, inflate_limit: int, size: int | None = None) -> UID:
    """Check a Part 10 file (bytes, or an open binary file of ``size`` bytes); returns its transfer syntax.

    The file meta and then the dataset are walked header by header, a file through a read-only memory map (only
    the pages holding headers are read). A deflated dataset is inflated in memory, up to ``inflate_limit`` bytes
    (else DatasetTooLarge).
    """
    if isinstance(source, (bytes, bytearray, memoryview, mmap.mmap)):
        return _check_part10(source, len(source) if size is None else min(size, len(source)), inflate_limit)
    on_disk = os.fstat(source.fileno()).st_size
    size = on_disk if size is None else min(size, on_disk)
    if size < 132:
        raise MalformedDataset("not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble")
    with mmap.mmap(source.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        return _check_part10(mapped, size, inflate_limit)


def _check_part10(buf: Buffer, size: int, inflate_limit: int) -> UID:
    offset, syntax = dataset_start(buf, size)
    if syntax.is_deflated:
        data = inflate(buf[offset:size], inflate_limit)
        _Walker(data).dataset(0, len(data), False, "<", depth=0)
    else:
        _Walker(buf).dataset(offset, size, syntax.is_implicit_VR, "<" if syntax.is_little_endian else ">", depth=0)
    return syntax


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def dataset_start(buf: Buffer, size: int | None = None) -> tuple[int, UID]:
    """Walk a Part 10 file's meta (always explicit VR little endian): where its dataset starts, and its syntax."""
    size = len(buf) if size is None else size
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise MalformedDataset("not a DICOM Part 10 file: no 'DICM' prefix after the 128-byte preamble")
    pos, syntax = 132, None
    tag_struct, u16, u32 = _TAG["<"], _U16["<"], _U32["<"]
    while size - pos >= 8:
        group, element = tag_struct.unpack_from(buf, pos)
        if group != 0x0002:
            break
        vr = buf[pos + 4] << 8 | buf[pos + 5]
        if vr in _LONG_VRS:
            if size - pos < 12:
                raise MalformedDataset(f"file meta truncated at offset {pos}")
            (length,) = u32.unpack_from(buf, pos + 8)
            pos += 12
        elif vr in _SHORT_VRS:
            (length,) = u16.unpack_from(buf, pos + 6)
            pos += 8
        else:
            raise MalformedDataset(f"file meta element {_tag(group << 16 | element)} has an invalid VR "
                                   f"{bytes(buf[pos + 4 : pos + 6])!r}")
        if length == _UNDEFINED or length > size - pos:
            raise MalformedDataset(f"file meta element {_tag(group << 16 | element)} declares {length} bytes, "
                                   f"only {size - pos} remain")
        if element == 0x0010:
            syntax = bytes(buf[pos : pos + min(length, 66)]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    if not syntax:
        raise MalformedDataset("file meta has no TransferSyntaxUID")
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        raise MalformedDataset(f"unknown transfer syntax {syntax[:64]!r}")
    return pos, uid


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str) -> bytes:
    """The preamble, prefix and File Meta Information (PS3.10 7.1) for a received dataset, encoded directly.

    Byte for byte what pydicom's ``write_file_meta_info`` writes for pynetdicom's ``create_file_meta`` plus the
    Source Application Entity Title (tests/test_hostile_input.py checks it), at a hundredth of the cost: it is
    on every instance's path to its response. Values are checked by the caller; anything not ASCII becomes ``?``.
    """
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _meta_element(0x0016, b"AE", _padded(source_ae_title, b" ")),
    ]
    body = b"".join(elements)
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if int.from_bytes(vr, "big") in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    value = str(text).encode("ascii", "replace")[:64]
    return value + pad if len(value) % 2 else value


class _Walker:
    """Element headers of one encoded dataset in ``buf``, recursively through sequences, items and fragments.

    Mirrors what pydicom accepts (including its switch to the other VR encoding when a dataset's first element
    says so), but refuses what pydicom would read past the end, allocate from a lying length, or recurse on.
    With ``keep``, the (start, end) of each top-level element whose tag it holds is appended to ``kept``;
    ``implicit`` is the top level's VR encoding as found.
    """

    def __init__(self, buf: Buffer, keep: AbstractSet[int] | None = None):
        self.buf = buf
        self.elements = 0
        self.keep = keep
        self.kept: list[tuple[int, int]] = []
        self.implicit: bool | None = None

    def _count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise MalformedDataset(f"more than {MAX_ELEMENTS} elements")

    def dataset(self, pos: int, end: int, implicit: bool, endian: str, depth: int, in_item: bool = False) -> int:
        """Elements from ``pos`` to ``end`` (or, ``in_item``, to the item delimiter); returns the end position."""
        if depth > MAX_NESTING:
            raise MalformedDataset(f"sequences nested deeper than {MAX_NESTING} levels")
        buf = self.buf
        tag_struct, u16, u32 = _TAG[endian], _U16[endian], _U32[endian]
        top = depth == 0 and not in_item
        keep = self.keep if top else None
        if top:
            self.implicit = implicit
        first = True
        while pos < end:
            if end - pos < 8:
                if top and not bytes(buf[pos:end]).strip(b"\x00"):
                    return end  # a few zero bytes of trailing padding, which pydicom ignores too
                raise MalformedDataset(f"truncated element header at offset {pos}")
            start = pos
            group, element = tag_struct.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag == _ITEM_END:
                if in_item:
                    return pos + 8
                raise MalformedDataset(f"item delimiter outside an item at offset {pos}")
            if tag in (_ITEM, _SEQUENCE_END):
                raise MalformedDataset(f"unexpected {_tag(tag)} at offset {pos}")
            if first:  # pydicom decides the VR encoding from the first element (read_dataset): so do we
                found_implicit = not (0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B)
                # at the top level either way; in a sequence item only from explicit to implicit
                implicit = found_implicit if depth == 0 else (implicit or found_implicit)
                if top:
                    self.implicit = implicit
                first = False
            vr: int | None = None
            if implicit:
                (length,) = u32.unpack_from(buf, pos + 4)
                pos += 8
            else:
                vr = buf[pos + 4] << 8 | buf[pos + 5]
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise MalformedDataset(f"truncated element length at offset {pos + 8}")
                    (length,) = u32.unpack_from(buf, pos + 8)
                    pos += 12
                elif vr in _SHORT_VRS:
                    (length,) = u16.unpack_from(buf, pos + 6)
                    pos += 8
                else:
                    raise MalformedDataset(f"{_tag(tag)} has an invalid VR {bytes(buf[pos + 4 : pos + 6])!r} "
                                           f"at offset {pos}")
            self.elements += 1  # self._count(), inlined: this loop runs for every element of every instance
            if self.elements > MAX_ELEMENTS:
                raise MalformedDataset(f"more than {MAX_ELEMENTS} elements")
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA:
                    pos = self.fragments(pos, end, endian)
                elif vr is None or vr == _SQ:
                    pos = self.sequence(pos, end, implicit, endian, depth + 1)
                elif vr == _UN:  # an undefined-length UN is a sequence encoded as implicit VR little endian
                    pos = self.sequence(pos, end, True, "<", depth + 1)
                else:
                    raise MalformedDataset(f"{_tag(tag)} ({vr.to_bytes(2, 'big').decode('ascii')}) has an "
                                           "undefined length")
            else:
                if length > end - pos:
                    raise MalformedDataset(
                        f"{_tag(tag)} declares {length} bytes at offset {pos}, only {end - pos} remain"
                    )
                if vr == _SQ or (vr is None and _is_sequence(tag)):
                    self.items(pos, pos + length, implicit, endian, depth + 1)
                pos += length
            if keep is not None and tag in keep:
                self.kept.append((start, pos))
        if in_item:
            raise MalformedDataset("item without its delimiter (truncated)")
        return pos

    def _item_header(self, pos: int, end: int, endian: str, what: str) -> tuple[int, int, int]:
        """(tag, length, position after the header) of the 8-byte item or delimiter header at ``pos``."""
        if end - pos < 8:
            raise MalformedDataset(f"truncated {what} at offset {pos}")
        group, element, length = _ITEM_HEADER[endian].unpack_from(self.buf, pos)
        return group << 16 | element, length, pos + 8

    def sequence(self, pos: int, end: int, implicit: bool, endian: str, depth: int) -> int:
        """Items of an undefined-length sequence, up to and including its delimiter."""
        while True:
            tag, length, pos = self._item_header(pos, end, endian, "sequence item (no sequence delimiter)")
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item in a sequence, found {_tag(tag)} at offset {pos - 8}")
            pos = self.item(pos, end, length, implicit, endian, depth)

    def items(self, pos: int, end: int, implicit: bool, endian: str, depth: int) -> None:
        """Items of a defined-length sequence, which must fill it exactly."""
        while pos < end:
            tag, length, pos = self._item_header(pos, end, endian, "sequence item")
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
            tag, length, pos = self._item_header(pos, end, endian, "pixel data fragment (no sequence delimiter)")
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDataset(f"malformed encapsulated pixel data at offset {pos - 8}")
            if length > end - pos:
                raise MalformedDataset(f"pixel data fragment declares {length} bytes, only {end - pos} remain")
            self._count()
            pos += length


@lru_cache(maxsize=4096)
def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
