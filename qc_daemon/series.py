"""Reading a spooled series and deciding whether it is a 3D anatomical MR volume at all.

Everything here reads untrusted files: each instance is parsed inside ``try``, sizes are checked against the
data before any pixel is decoded, and every way a series can be unsuitable is raised as :class:`SeriesSkipped`
(not a 3D anatomical MR volume, with a reason a technologist can read) or :class:`SeriesFailed` (it should
have been scorable, but the data is broken).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from qc_daemon.intake import check_part10
from qc_daemon.pacs_report import own_result_kind
from qc_daemon.store import SeriesFacts

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
MR_IMAGE_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR})

# A series whose decoded pixels would exceed this is refused before decoding (a header's claim is never trusted).
MAX_DECODED_BYTES = 2 * 2**30
# Element values larger than this stay on disk until used (pixel data is read slice by slice when converting).
DEFER_BYTES = 64 * 2**10
# A series whose spooled files add up to more than this is read without its pixel data and fails: compressed
# pixel data cannot be left on disk while parsing, and this much is never one scorable volume.
MAX_SERIES_FILE_BYTES = 2 * MAX_DECODED_BYTES
_ORIENTATION_TOLERANCE = 1e-3


class SeriesSkipped(Exception):
    """The series is not a 3D anatomical MR volume; the message is the recorded reason."""


class SeriesFailed(Exception):
    """The series should be scorable but cannot be read or converted; the message is the recorded reason."""


@dataclass(frozen=True)
class SpooledSeries:
    """A snapshot of one series' instances, parsed (pixel data still encoded)."""

    series_uid: str
    paths: tuple[Path, ...]
    datasets: tuple[Dataset, ...]
    unreadable: tuple[str, ...]  # "file: reason" for instances that could not be parsed
    too_large: str | None = None  # set when the files were too large to read with their pixel data

    @property
    def first(self) -> Dataset:
        return self.datasets[0]


def read_series(series_uid: str, paths: list[Path]) -> SpooledSeries:
    """Parse every instance's header; never raises (what cannot be read is listed in ``unreadable``).

    Each file's encoding is checked before pydicom reads it (no length is trusted), and large values such as
    native pixel data stay on disk until the volume is built.
    """
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(0)
    too_large = None
    if sum(sizes) > MAX_SERIES_FILE_BYTES:
        too_large = (f"the series' {len(paths)} files hold {sum(sizes) // 2**20} MiB, more than "
                     f"{MAX_SERIES_FILE_BYTES // 2**20} MiB")
    datasets, kept, unreadable = [], [], []
    for path in paths:
        try:
            ds = read_instance(path, with_pixels=too_large is None)
        except Exception as exc:  # noqa: BLE001 - untrusted file: any parse error is a reason, not a crash
            unreadable.append(f"{path.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        datasets.append(ds)
        kept.append(path)
    return SpooledSeries(series_uid, tuple(kept), tuple(datasets), tuple(unreadable), too_large)


def read_instance(path: Path, with_pixels: bool = True) -> Dataset:
    """One spooled Part 10 file, its structure checked first; raises MalformedDataset and pydicom's errors."""
    with open(path, "rb") as fh:
        check_part10(fh, inflate_limit=MAX_DECODED_BYTES, size=os.fstat(fh.fileno()).st_size)
    ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, stop_before_pixels=not with_pixels)
    _ = ds.SOPClassUID  # force the lazy parse of the header now, inside the caller's try
    return ds


def series_facts(series: SpooledSeries, instances: int, received_at: dt.datetime) -> SeriesFacts:
    """Descriptive fields for the stored row, from the first readable instance (no patient data)."""
    ds = series.datasets[0] if series.datasets else Dataset()
    meta = getattr(ds, "file_meta", Dataset())
    return SeriesFacts(
        series_instance_uid=series.series_uid,
        study_instance_uid=_text(ds, "StudyInstanceUID", 64),
        station_name=_text(ds, "StationName", 64),
        calling_ae=_text(meta, "SourceApplicationEntityTitle", 16),
        modality=_text(ds, "Modality", 16),
        series_description=_text(ds, "SeriesDescription", 256),
        protocol_name=_text(ds, "ProtocolName", 256),
        sop_class_uid=_text(ds, "SOPClassUID", 64),
        instances=instances,
        received_at=received_at,
    )


def mr_images_only(series: SpooledSeries) -> SpooledSeries:
    """The series without its non-image companions.

    Scanners put other objects in an image series (Philips stores its Raw Data Storage object under the
    series UID of the images it belongs to): they are counted as received but not part of the volume.
    """
    kept = [(p, ds) for p, ds in zip(series.paths, series.datasets, strict=True)
            if str(ds.get("SOPClassUID", "")) in MR_IMAGE_CLASSES]
    if not kept or len(kept) == len(series.datasets):
        return series
    paths, datasets = zip(*kept, strict=True)
    return SpooledSeries(series.series_uid, tuple(paths), tuple(datasets), series.unreadable, series.too_large)


PHANTOM_FIELDS = ("PatientName", "PatientID", "StudyDescription", "SeriesDescription", "ProtocolName", "BodyPartExamined")


def phantom_reason(datasets: Sequence[Dataset], keywords: Sequence[str]) -> str | None:
    """Why the series is a QA phantom (the keyword and the field that holds it, never the field's value), or None."""
    if not keywords or not datasets:
        return None
    pattern = re.compile(r"(?<![a-z0-9])(" + "|".join(re.escape(k.lower()) for k in keywords) + r")(?![a-z0-9])")
    ds = datasets[0]
    for name in PHANTOM_FIELDS:
        match = pattern.search(str(ds.get(name, "") or "").lower())
        if match:
            return f"QA phantom ({match.group(1)!r} in {name}): scores describe heads, phantoms are not scored"
    return None


def classify(series: SpooledSeries, min_slices: int, phantom_keywords: Sequence[str] = ()) -> SpooledSeries:
    """The instances that make the volume; raises SeriesSkipped/SeriesFailed unless they look like one 3D
    anatomical MR volume of a person (``phantom_keywords``: see :func:`phantom_reason`)."""
    if not series.datasets:
        detail = "; ".join(series.unreadable[:3])
        raise SeriesFailed(f"no readable DICOM instance ({detail})")
    own = {own_result_kind(ds) for ds in series.datasets}
    if None not in own:
        raise SeriesSkipped(f"own result (qc-daemon {'/'.join(sorted(own))}): never scored or sent again")
    classes = {str(ds.get("SOPClassUID", "") or "").rstrip("\x00 ") for ds in series.datasets}
    if not classes & MR_IMAGE_CLASSES:
        names = ", ".join((UID(uid).name or uid)[:64] if uid else "missing" for uid in sorted(classes)[:5])
        raise SeriesSkipped(f"not an MR image series (SOP class {names})")
    series = mr_images_only(series)
    phantom = phantom_reason(series.datasets, phantom_keywords)
    if phantom:
        raise SeriesSkipped(phantom)
    image_types = {str(v).upper() for ds in series.datasets for v in _multi(ds.get("ImageType"))}
    if "LOCALIZER" in image_types:
        raise SeriesSkipped("localizer (ImageType LOCALIZER)")
    if "MOSAIC" in image_types:
        raise SeriesSkipped("mosaic: an EPI/time-series acquisition, not a 3D anatomical volume")
    _check_pixel_claims(series)
    classes = {str(ds.SOPClassUID) for ds in series.datasets}
    if len(classes) > 1:
        raise SeriesSkipped("mixes classic and enhanced MR instances")
    if classes == {MR_IMAGE_STORAGE}:
        _classify_classic(series.datasets, min_slices)
    else:
        _classify_enhanced(series.datasets, min_slices)
    return series


def _classify_classic(datasets: tuple[Dataset, ...], min_slices: int) -> None:
    frames = [_frames(ds) for ds in datasets]
    if any(f > 1 for f in frames):
        raise SeriesSkipped("classic MR instances with several frames each: not a slice stack")
    if len(datasets) < min_slices:
        what = "a single slice" if len(datasets) == 1 else f"only {len(datasets)} slices"
        raise SeriesSkipped(f"{what}; a 3D volume needs at least {min_slices}")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise SeriesSkipped(f"mixed image sizes {sorted(sizes)}")
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError) as exc:
        raise SeriesSkipped("missing or malformed ImageOrientationPatient/ImagePositionPatient") from exc
    if orientations.shape[1:] != (6,) or positions.shape[1:] != (3,):
        raise SeriesSkipped("malformed ImageOrientationPatient/ImagePositionPatient")
    if np.abs(orientations - orientations[0]).max() > _ORIENTATION_TOLERANCE:
        raise SeriesSkipped("mixed slice orientations (several stacks, e.g. a 3-plane scout)")
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    along = np.round(positions @ normal, 3)
    repeats = Counter(along.tolist()).most_common(1)[0][1]
    if repeats > 1:
        raise SeriesSkipped(f"{repeats} instances at the same slice position: a time series or repeated stack")
    temporal = {_int(ds, "TemporalPositionIdentifier", 1) for ds in datasets}
    if len(temporal) > 1:
        raise SeriesSkipped(f"{len(temporal)} temporal positions: a time series")


def _classify_enhanced(datasets: tuple[Dataset, ...], min_slices: int) -> None:
    total_frames = sum(_frames(ds) for ds in datasets)
    if total_frames < min_slices:
        raise SeriesSkipped(f"only {total_frames} frames; a 3D volume needs at least {min_slices}")
    for ds in datasets:
        temporal = _int(ds, "NumberOfTemporalPositions", 1)
        for group in ds.get("SharedFunctionalGroupsSequence", []) or []:
            for timing in group.get("MRTimingAndRelatedParametersSequence", []) or []:
                temporal = max(temporal, _int(timing, "NumberOfTemporalPositions", 1))
        if temporal > 1:
            raise SeriesSkipped(f"{temporal} temporal positions: a time series")


def _check_pixel_claims(series: SpooledSeries) -> None:
    """Compare what each header claims with the pixel data actually present, before anything is decoded.

    Only header values and stored lengths are used: pixel data still on disk is not read to be measured.
    """
    if series.too_large:
        raise SeriesFailed(series.too_large)
    claimed = stored = 0
    for path, ds in zip(series.paths, series.datasets, strict=True):
        if "PixelData" not in ds:
            raise SeriesFailed(f"{path.name}: no pixel data")
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            bits = int(ds.BitsAllocated)
            samples = int(ds.get("SamplesPerPixel", 1))
        except (AttributeError, TypeError, ValueError) as exc:
            raise SeriesFailed(f"{path.name}: missing or malformed Rows/Columns/BitsAllocated") from exc
        frames = _frames(ds)
        if rows < 1 or cols < 1 or frames < 1:
            raise SeriesFailed(f"{path.name}: empty image ({rows}x{cols}, {frames} frames)")
        if bits not in (8, 16, 32):
            raise SeriesFailed(f"{path.name}: unsupported BitsAllocated {bits}")
        if samples != 1:
            raise SeriesSkipped(f"{path.name}: {samples} samples per pixel (colour), not an MR magnitude image")
        expected = rows * cols * frames * bits // 8
        claimed += expected
        if claimed > MAX_DECODED_BYTES:
            raise SeriesFailed(f"decoded pixel data would exceed {MAX_DECODED_BYTES // 2**20} MiB "
                               f"({path.name} claims {rows}x{cols}, {frames} frames, {bits} bits)")
        present = _stored_length(ds, "PixelData")
        stored += present
        if stored > MAX_DECODED_BYTES:
            raise SeriesFailed(f"stored pixel data exceeds {MAX_DECODED_BYTES // 2**20} MiB")
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not UID(syntax).is_transfer_syntax:
            raise SeriesFailed(f"{path.name}: unknown transfer syntax {str(syntax)[:64]!r}")
        if not UID(syntax).is_compressed:
            if present < expected:
                raise SeriesFailed(
                    f"{path.name}: pixel data holds {present} bytes, Rows/Columns/NumberOfFrames claim {expected}"
                )
            if present % 2:
                raise SeriesFailed(f"{path.name}: pixel data of odd length {present} (malformed encoding)")


def _stored_length(ds: Dataset, keyword: str) -> int:
    """The length of an element's stored value, without reading a value that is still on disk."""
    element = ds.get_item(keyword, keep_deferred=True)
    if element is None:
        return 0
    value = element.value
    if value is None:  # a deferred raw element: its length is known, its value still in the file
        length = getattr(element, "length", 0) or 0
        return 0 if length == 0xFFFFFFFF else length
    return len(value)


def _frames(ds: Dataset) -> int:
    return _int(ds, "NumberOfFrames", 1)


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer header value; a malformed one fails the series with its name (never an internal error)."""
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SeriesFailed(f"malformed {keyword} {str(ds.get(keyword))[:40]!r}") from exc


def _multi(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element is simply not recorded
        return None
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None
