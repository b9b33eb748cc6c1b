"""Structure checks on untrusted DICOM bytes, before pydicom parses them.

The element headers are walked and every declared length is checked against the bytes really present, so a
4 GB length in a 1 kB instance is refused instead of being read or allocated; a deflated dataset is inflated
only up to a limit. Failures raise :class:`MalformedDataset` or :class:`DatasetTooLarge`; the intake maps them
to DIMSE statuses.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID


class MalformedDataset(ValueError):
    """The encoding itself is broken: truncated, lengths beyond the data, invalid VRs, unterminated items..."""


class DatasetTooLarge(ValueError):
    """The dataset (once inflated, for the deflated transfer syntax) is larger than the limit."""


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

    def _item_header(self, pos: int, end: int, endian: str, what: str) -> tuple[int, int, int]:
        """(tag, length, position after the header) of the 8-byte item or delimiter header at ``pos``."""
        group, element, length = struct.unpack(endian + "HHI", self._header(pos, end, 8, what))
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


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
