"""Is a series complete? What scanners announce, and whether the received instances form one 3D grid.

Two kinds of evidence let a series be scored without waiting for the quiet period:

* the **announced count**, from each place a scanner writes it: ImagesInAcquisition (standard), Philips'
  Number of Slices MR (2001,xx18) with one stack, and Siemens' protocol (ASCCONV ``sKSpace.lImagesPerSlab`` for
  3D, ``sSliceArray.lSize`` for 2D) in the CSA series header (0029,xx20) or, on XA, (0021,xx19). Vendor counts
  are only read from ORIGINAL images of one stack, one echo and one time point (a reformat or a time series may
  hold more images than the protocol says, and an early decision on too small a count would be wrong);
* the **shape of what arrived**: one orientation, slice positions along the normal sorted at one constant
  spacing, no gap, no duplicate (or one multi-frame instance).

Both are read from the header the intake has already parsed: :func:`slice_facts` and :func:`announced_count`
take a pydicom dataset, :func:`forms_complete_grid` is a pure function of the facts. Nothing here decides when to
look; the assembler does. An early decision is never silent: a late instance opens a new revision.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

IMAGE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
})
MAX_ANNOUNCED = 100_000
ORIENTATION_TOLERANCE = 1e-3
SPACING_RELATIVE_TOLERANCE = 0.01
MIN_SPACING_MM = 1e-3

_PHILIPS_CREATOR = "Philips Imaging DD 001"
_PHILIPS_FIELDS = (("slices", 0x18), ("stacks", 0x60), ("dynamics", 0x81), ("phases", 0x17), ("echoes", 0x14))
_SIEMENS_PROTOCOLS = ((0x0029, 0x20, "SIEMENS CSA HEADER"), (0x0021, 0x19, "SIEMENS MR SDS 01"))

# Every top-level element slice_facts and announced_count read, as tags (group << 16 | element): the intake
# parses only these (and the UIDs it checks) from a received instance. The standard ones, and in each private
# group read above its creators (gggg,0010-00FF) and, in every block xx, the offsets read (gggg,xxoo).
_PRIVATE_OFFSETS: dict[int, frozenset[int]] = {
    0x2001: frozenset(offset for _, offset in _PHILIPS_FIELDS),
    **{group: frozenset({offset}) for group, offset, _ in _SIEMENS_PROTOCOLS},
}
FACT_TAGS = frozenset({
    0x00080008,  # ImageType
    0x00080016,  # SOPClassUID
    0x00200032,  # ImagePositionPatient
    0x00200037,  # ImageOrientationPatient
    0x00201002,  # ImagesInAcquisition
    0x00280008,  # NumberOfFrames
}) | frozenset(
    group << 16 | element
    for group, offsets in _PRIVATE_OFFSETS.items()
    for block in range(0x10, 0x100)
    for element in (block, *(block << 8 | offset for offset in offsets))
)

_ASCCONV_BEGIN, _ASCCONV_END = b"### ASCCONV BEGIN", b"### ASCCONV END"
_ASCCONV_KEYS = ("lRepetitions", "lContrasts", "sDiffusion.lDiffDirections", "lSets", "sKSpace.ucDimension",
                 "sSliceArray.lSize", "sKSpace.lImagesPerSlab")
# A protocol line "key = value" for the keys read here only: an XA protocol is ~135 kB on every instance, and this
# search is ~10x faster than splitting every line (it runs on the listener's thread, per received instance).
_ASCCONV_LINE = re.compile(rb"\n(" + b"|".join(re.escape(key.encode()) for key in _ASCCONV_KEYS)
                           + rb")[ \t]*=[ \t]*(\S+)")
_SIEMENS_3D, _SIEMENS_2D = 4, 2


@dataclass(frozen=True)
class SliceFacts:
    """Where one instance lies: what the completeness check needs from its header."""

    is_image: bool  # an MR image (a raw-data object or a report under the same series UID is not)
    frames: int
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 values), classic images only
    position: tuple[float, float, float] | None  # ImagePositionPatient, classic images only


def slice_facts(dataset: Dataset) -> SliceFacts:
    """The facts of one instance; a missing or malformed value becomes None (the grid check then fails)."""
    sop_class = str(dataset.get("SOPClassUID", "") or "").rstrip("\x00 ")
    return SliceFacts(
        is_image=sop_class in IMAGE_CLASSES,
        frames=_positive_int(dataset.get("NumberOfFrames")) or 1,
        orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
        position=_floats(dataset.get("ImagePositionPatient"), 3),
    )


def announced_count(dataset: Dataset) -> int | None:
    """How many instances the scanner says the series holds, or None when no header says it reliably."""
    standard = _positive_int(dataset.get("ImagesInAcquisition"))
    if standard is not None:
        return standard
    if not _is_original(dataset):
        return None
    return _philips_count(dataset) or _siemens_count(dataset)


def forms_complete_grid(facts: Iterable[SliceFacts], min_slices: int, announced: int | None = None) -> bool:
    """True when the images among ``facts`` are one complete volume: a single multi-frame instance, or classic
    slices at one orientation whose positions along the slice normal are evenly spaced (within
    ``SPACING_RELATIVE_TOLERANCE`` of the median step), without a gap or a repeat, at least ``min_slices`` of
    them and, when the scanner ``announced`` a count, at least that many."""
    images = [f for f in facts if f.is_image]
    if not images:
        return False
    needed = max(min_slices, announced or 0)
    if any(f.frames > 1 for f in images):
        return len(images) == 1 and images[0].frames >= needed
    if len(images) < needed or any(f.orientation is None or f.position is None for f in images):
        return False
    orientations = np.array([f.orientation for f in images])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return False
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = np.sort(np.array([f.position for f in images]) @ normal)
    steps = np.diff(along)
    spacing = float(np.median(steps))
    if spacing < MIN_SPACING_MM:
        return False
    return bool(np.abs(steps - spacing).max() <= SPACING_RELATIVE_TOLERANCE * spacing)


def _philips_count(dataset: Dataset) -> int | None:
    """Number of Slices MR (2001,xx18), trusted only for one stack, one dynamic, one phase and one echo."""
    block = _private_block(dataset, 0x2001, _PHILIPS_CREATOR)
    if block is None:
        return None
    values = {}
    for name, offset in _PHILIPS_FIELDS:
        try:
            values[name] = _positive_int(block[offset].value) if offset in block else None
        except Exception:  # noqa: BLE001 - a malformed private element: no announcement
            return None
    if any((values[name] or 1) != 1 for name in ("stacks", "dynamics", "phases", "echoes")):
        return None
    return values["slices"]


def _siemens_count(dataset: Dataset) -> int | None:
    """Images of one measurement from the Siemens protocol (ASCCONV): ``sKSpace.lImagesPerSlab`` for a single
    3D slab, ``sSliceArray.lSize`` for 2D; None for repetitions, several contrasts or diffusion directions."""
    protocol = _ascconv(dataset)
    if protocol is None:
        return None
    if any((_ascconv_int(protocol, key) or 0) > limit for key, limit in (
        ("lRepetitions", 0), ("lContrasts", 1), ("sDiffusion.lDiffDirections", 1), ("lSets", 1),
    )):
        return None
    dimension = _ascconv_int(protocol, "sKSpace.ucDimension")
    slabs_or_slices = _ascconv_int(protocol, "sSliceArray.lSize")
    if dimension == _SIEMENS_3D and slabs_or_slices == 1:
        return _in_range(_ascconv_int(protocol, "sKSpace.lImagesPerSlab"))
    if dimension == _SIEMENS_2D:
        return _in_range(slabs_or_slices)
    return None


def _ascconv(dataset: Dataset) -> dict[str, str] | None:
    for group, offset, creator in _SIEMENS_PROTOCOLS:
        value = _private(dataset, group, offset, creator)
        if isinstance(value, (bytes, str)):
            raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
            section = _ascconv_section(raw)
            if section is not None:  # the last line of a key wins, as it would in a dict of every line
                return {key.decode(): val.decode("latin-1") for key, val in _ASCCONV_LINE.findall(b"\n" + section)}
    return None


def _ascconv_section(raw: bytes) -> bytes | None:
    """The protocol between the line that begins "### ASCCONV BEGIN" and "### ASCCONV END", or None."""
    begin = raw.find(_ASCCONV_BEGIN)
    start = raw.find(b"\n", begin) if begin >= 0 else -1
    end = raw.find(_ASCCONV_END, start + 1) if start >= 0 else -1
    return raw[start + 1 : end] if end >= 0 else None


def _ascconv_int(protocol: dict[str, str], key: str) -> int | None:
    try:
        return int(protocol[key], 0)
    except (KeyError, ValueError):
        return None


def _private(dataset: Dataset, group: int, offset: int, creator: str):
    block = _private_block(dataset, group, creator)
    try:
        return block[offset].value if block is not None and offset in block else None
    except Exception:  # noqa: BLE001 - a malformed private element: no announcement
        return None


def _private_block(dataset: Dataset, group: int, creator: str):
    try:
        return dataset.private_block(group, creator)
    except Exception:  # noqa: BLE001 - absent, or a malformed private creator: no announcement
        return None


def _is_original(dataset: Dataset) -> bool:
    try:
        value = dataset.get("ImageType") or ""
        first = value if isinstance(value, str) else value[0]
        return str(first).split("\\")[0].strip().upper() == "ORIGINAL"
    except Exception:  # noqa: BLE001 - a malformed ImageType: not trusted
        return False


def _positive_int(value) -> int | None:
    try:
        return _in_range(int(value)) if value is not None and value != "" else None
    except (TypeError, ValueError, OverflowError):
        return None


def _in_range(value: int | None) -> int | None:
    return value if value is not None and 0 < value <= MAX_ANNOUNCED else None


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers
