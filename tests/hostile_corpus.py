"""A corpus of hostile and broken DICOM instances, generated deterministically (nothing is committed).

Every case is a list of DICOM Part 10 files (bytes: preamble, file meta, dataset), built from
:mod:`dicom_factory` series plus byte surgery on the encoded dataset, and the outcome the daemon must reach:

* ``status``: the C-STORE status of each file sent over the network (``0xC000``, ``0xA700``, ``0xA900``: refused,
  nothing spooled; ``0x0000``: accepted);
* ``outcome``: for accepted cases, the series row's ``(status, reason fragment)``;
* ``drop``: for the drop folder, ``"rejected: <reason fragment>"`` or ``"accepted"`` (None: the case is about
  the network only, e.g. the request's Affected SOP Instance UID).

The file meta is always well formed (a C-STORE sender needs it to pick the presentation context); the damage is in
the dataset, which pynetdicom sends byte for byte when ``STORE_SEND_CHUNKED_DATASET`` is set. UIDs derive from the
case name and a ``variant``, so the network and drop-folder copies of a case are different instances.
"""

from __future__ import annotations

import random
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from dicom_factory import MR_IMAGE_STORAGE, classic_series, enhanced_series, phantom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

CANNOT_UNDERSTAND, OUT_OF_RESOURCES, DOES_NOT_MATCH, SUCCESS = 0xC000, 0xA700, 0xA900, 0x0000
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"

# The daemon under test runs with dicom.max_instance_mb = MAX_INSTANCE_MB.
MAX_INSTANCE_MB = 4
BOMB_INFLATED_BYTES = 64 * 2**20  # the deflate bomb's inflated size: 16x the instance limit, from ~64 KiB sent


@dataclass(frozen=True)
class Case:
    name: str
    files: tuple[bytes, ...]
    status: int
    outcome: tuple[str, str] | None = None  # (SeriesStatus value, fragment of the reason) when accepted
    drop: str | None = None
    series_uid: str | None = None
    claimed_bytes: int = 0  # what the headers claim (or what a bomb inflates to): memory must stay far below
    instances: int | None = None  # instances the accepted series must hold (duplicates: stored once)


# ---- building blocks ----------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def small_series(name: str, variant: str, slices: int = 20, size: int = 16) -> list[Dataset]:
    """A tiny classic MR series with UIDs derived from the case name (deterministic)."""
    series = classic_series(phantom((size, size, slices), seed=3), series_uid=_uid(name, variant, "series"))
    study = _uid(name, variant, "study")
    for i, ds in enumerate(series):
        ds.StudyInstanceUID = study
        ds.FrameOfReferenceUID = _uid(name, variant, "for")
        _set_sop_uid(ds, _uid(name, variant, "sop", i))
    return series


def _set_sop_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def encode(ds: Dataset, deflated: bool = False) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid UIDs and values are the point here
        if deflated:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


def split(part10: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset) of a file pydicom wrote (it always writes the group length first)."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", part10[140:144])
    offset = 144 + group_length
    return part10[:offset], part10[offset:]


def with_meta(part10: bytes, **values: str) -> bytes:
    """The file with some file meta values replaced (pydicom's save_as copies them from the dataset)."""
    import io

    from pydicom import dcmread
    from pydicom.filewriter import write_file_meta_info

    head, body = split(part10)
    meta = dcmread(io.BytesIO(head), force=True).file_meta
    for keyword, value in values.items():
        setattr(meta, keyword, value)
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def element_offset(body: bytes, group: int, element: int, vr: bytes) -> int:
    """Offset of an explicit VR little endian element header (tag + VR) in an encoded dataset."""
    offset = body.find(struct.pack("<HH", group, element) + vr)
    assert offset >= 0, f"({group:04X},{element:04X}) {vr!r} not found"
    return offset


def with_body(part10: bytes, surgery: Callable[[bytes], bytes]) -> bytes:
    head, body = split(part10)
    return head + surgery(body)


def _long(group: int, element: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH", group, element) + vr + b"\x00\x00" + struct.pack("<I", length)


def _item(length: int = 0xFFFFFFFF) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, length)


ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _before_group_0010(body: bytes, insert: bytes) -> bytes:
    """Insert private group 0009 element(s) where they belong: after group 0008, before the patient module."""
    offset = element_offset(body, 0x0010, 0x0010, b"PN")
    return body[:offset] + insert + body[offset:]


# ---- the cases ----------------------------------------------------------------------------------------------


def network_cases(variant: str = "net") -> list[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every invalid value we set on purpose
        return [*broken_encoding(variant), *bad_uids(variant), *mismatches(variant), *too_large(variant),
                *lying_headers(variant), *not_mr(variant), *duplicates(variant)]


def drop_folder_cases(variant: str = "drop") -> list[Case]:
    """What can arrive as a file: the encoding, UID and size cases, plus files that are not DICOM at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _drop_folder_cases(variant)


def _drop_folder_cases(variant: str) -> list[Case]:
    cases = [*broken_encoding(variant), *bad_uids(variant), *too_large(variant), *lying_headers(variant)[:2]]
    good = encode(small_series("not-dicom", variant, slices=1)[0])
    cases.append(Case("not_dicom", (b"just some text, no DICOM here\n" * 40,), CANNOT_UNDERSTAND,
                      drop="rejected: not a DICOM Part 10 file"))
    # A private transfer syntax (GE's implicit big endian) in an otherwise fine file.
    head, body = split(good)
    odd_syntax = head.replace(ExplicitVRLittleEndian.encode() + b"\x00", b"1.2.840.113619.5.2\x00\x00", 1)
    odd_syntax = odd_syntax[:140] + struct.pack("<I", len(odd_syntax) - 144) + odd_syntax[144:]
    cases.append(Case("unknown_transfer_syntax", (odd_syntax + body,), CANNOT_UNDERSTAND,
                      drop="rejected: unknown transfer syntax"))
    return [c for c in cases if c.drop is not None]


def broken_encoding(variant: str) -> list[Case]:
    good = encode(small_series("encoding", variant, slices=1)[0])
    _, body = split(good)
    rng = random.Random(6)
    pixel = element_offset(body, 0x7FE0, 0x0010, b"OW")
    series_uid = element_offset(body, 0x0020, 0x000E, b"UI")
    rejected = "rejected: not a readable DICOM file"
    cases = [
        Case("truncated_in_pixel_data", (good[:-100],), CANNOT_UNDERSTAND, drop=rejected),
        Case("truncated_in_element_header", (with_body(good, lambda b: b[: series_uid + 5]),), CANNOT_UNDERSTAND,
             drop=rejected),
        Case("garbage_after_file_meta", (with_body(good, lambda b: rng.randbytes(4096)),), CANNOT_UNDERSTAND,
             drop="rejected: "),
        Case("zeros_after_file_meta", (with_body(good, lambda b: bytes(1024)),), CANNOT_UNDERSTAND,
             drop="rejected: SeriesInstanceUID is missing"),
        # A 1 kB instance declaring a 4 GiB value: read as is, pydicom would ask for 4 GiB.
        Case("huge_length_private_ob", (with_body(good, lambda b: _before_group_0010(
            b, _long(0x0009, 0x1001, b"OB", 0xFFFFFFF0) + b"\x00" * 64)),), CANNOT_UNDERSTAND,
             claimed_bytes=0xFFFFFFF0, drop=rejected),
        Case("huge_length_pixel_data",
             (with_body(good, lambda b: b[: pixel + 8] + struct.pack("<I", 0xFFFFFFF0) + b[pixel + 12 :]),),
             CANNOT_UNDERSTAND, claimed_bytes=0xFFFFFFF0, drop=rejected),
        Case("huge_length_short_vr",  # a 2-byte length can lie too: 65535 bytes promised, 10 present
             (with_body(good, lambda b: b[:series_uid] + b"\x20\x00\x0e\x00UI\xff\xff" + b"1.2.3.4.55"),),
             CANNOT_UNDERSTAND, drop=rejected),
        Case("huge_item_in_sequence", (with_body(good, lambda b: _before_group_0010(
            b, _long(0x0009, 0x1002, b"SQ", 0xFFFFFFFF) + _item(0xFFFFFFF0) + b"\x00" * 32)),),
             CANNOT_UNDERSTAND, claimed_bytes=0xFFFFFFF0, drop=rejected),
        Case("sequence_without_delimiter", (with_body(good, lambda b: b + _long(0xFFFA, 0x0010, b"SQ", 0xFFFFFFFF)
                                                      + _item() + ITEM_END),),
             CANNOT_UNDERSTAND, drop=rejected),
        Case("sequences_nested_500_deep", (with_body(good, lambda b: _before_group_0010(
            b, (_long(0x0009, 0x1003, b"SQ", 0xFFFFFFFF) + _item()) * 500
            + (ITEM_END + SEQUENCE_END) * 500)),), CANNOT_UNDERSTAND, drop=rejected),
        Case("invalid_vr", (with_body(good, lambda b: b[:series_uid + 4] + b"zz" + b[series_uid + 6 :]),),
             CANNOT_UNDERSTAND, drop=rejected),
        Case("encapsulated_pixel_data_without_delimiter",
             (with_body(good, lambda b: b[:pixel] + _long(0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + _item(0)
                        + _item(16) + b"\x00" * 16),), CANNOT_UNDERSTAND, drop=rejected),
    ]
    deflated = encode(small_series("deflated-cut", variant, slices=1)[0], deflated=True)
    cases.append(Case("deflated_stream_cut_short", (deflated[:-40],), CANNOT_UNDERSTAND, drop="rejected: "))
    return cases


def bad_uids(variant: str) -> list[Case]:
    """Missing and malformed UIDs, and UIDs crafted as paths: refused before any of them becomes a path."""
    values = {
        "series_uid_empty": "",
        "series_uid_letters": "1.2.840.abc",
        "series_uid_65_chars": "1." + "2" * 63,
        "series_uid_dotdot": "../../../../etc",
        "series_uid_dir_then_dotdot": "1.2/../../x",
        "series_uid_absolute": f"/tmp/qc-hostile-absolute-{variant}",
        "series_uid_nul_then_path": "1.2\x00/../../x",
        "series_uid_newline_inside": "1.2\n.3",
        "series_uid_backslash_vm2": "1.2\\..\\..",
    }
    cases = []
    for name, value in values.items():
        (ds,) = small_series(name, variant, slices=1)
        ds.SeriesInstanceUID = value
        cases.append(Case(name, (encode(ds),), CANNOT_UNDERSTAND, drop="rejected: SeriesInstanceUID"))
    (ds,) = small_series("series_uid_missing", variant, slices=1)
    del ds.SeriesInstanceUID
    cases.append(Case("series_uid_missing", (encode(ds),), CANNOT_UNDERSTAND,
                      drop="rejected: SeriesInstanceUID is missing"))
    # The instance UID as a path, in the dataset and in the request (pynetdicom only checks its length).
    for name, value in {"sop_uid_dotdot": "../../../../tmp/qc-hostile-sop", "sop_uid_absolute": "/tmp/qc-hostile-sop2",
                        "sop_uid_letters": "1.2.3.x"}.items():
        (ds,) = small_series(name, variant, slices=1)
        _set_sop_uid(ds, value)
        cases.append(Case(name, (encode(ds),), CANNOT_UNDERSTAND, drop="rejected: SOPInstanceUID"))
    (ds,) = small_series("sop_uid_65_chars", variant, slices=1)
    valid = str(ds.SOPInstanceUID)
    ds.SOPInstanceUID = "1." + "3" * 63  # too long for a C-STORE request: the file meta keeps a valid one
    cases.append(Case("sop_uid_65_chars", (with_meta(encode(ds), MediaStorageSOPInstanceUID=valid),),
                      CANNOT_UNDERSTAND, drop="rejected: SOPInstanceUID"))
    return cases


def mismatches(variant: str) -> list[Case]:
    """The dataset contradicts the C-STORE request (network only: a file has no request)."""
    (a,) = small_series("sop_instance_mismatch", variant, slices=1)
    (b,) = small_series("sop_class_mismatch", variant, slices=1)
    b.SOPClassUID = CT_IMAGE_STORAGE
    (c,) = small_series("dataset_without_sop_class", variant, slices=1)
    del c.SOPClassUID
    # The file meta becomes the request's Affected SOP Instance/Class UID.
    return [Case("sop_instance_mismatch", (with_meta(encode(a), MediaStorageSOPInstanceUID=_uid("other", variant)),),
                 DOES_NOT_MATCH),
            Case("sop_class_mismatch", (with_meta(encode(b), MediaStorageSOPClassUID=MR_IMAGE_STORAGE),),
                 DOES_NOT_MATCH),
            Case("dataset_without_sop_class", (with_meta(encode(c), MediaStorageSOPClassUID=MR_IMAGE_STORAGE),),
                 DOES_NOT_MATCH)]


def too_large(variant: str) -> list[Case]:
    (big,) = small_series("oversized_instance", variant, slices=1, size=16)
    side = 1500  # 1500 x 1500 x 2 bytes = 4.3 MiB > MAX_INSTANCE_MB
    big.Rows = big.Columns = side
    big.PixelData = np.full((side, side), 7, np.uint16).tobytes()
    oversized = encode(big)
    assert len(oversized) > MAX_INSTANCE_MB * 2**20
    return [
        Case("oversized_instance", (oversized,), OUT_OF_RESOURCES, drop="rejected: exceeds the limit"),
        Case("deflate_bomb", (deflate_bomb("deflate_bomb", variant),), OUT_OF_RESOURCES,
             claimed_bytes=BOMB_INFLATED_BYTES, drop="rejected: inflates to more than"),
    ]


def deflate_bomb(name: str, variant: str) -> bytes:
    """A deflated MR instance of ~64 KiB whose dataset inflates to 64 MiB (zeros in a private OB element)."""
    (ds,) = small_series(name, variant, slices=1)
    del ds.PixelData
    raw = DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    from pydicom.filewriter import write_dataset

    write_dataset(raw, ds)
    plain = raw.getvalue()
    at = element_offset(plain, 0x0010, 0x0010, b"PN")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [compressor.compress(plain[:at] + _long(0x0009, 0x1001, b"OB", BOMB_INFLATED_BYTES))]
    zeros = bytes(2**20)
    for _ in range(BOMB_INFLATED_BYTES // len(zeros)):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.compress(plain[at:]))
    chunks.append(compressor.flush())
    head, _ = split(encode(ds, deflated=True))
    return head + b"".join(chunks)


def lying_headers(variant: str) -> list[Case]:
    """Accepted (the encoding is sound) and then recorded as failed: the headers lie about the pixel data."""
    cases = []

    def classic(name: str, reason: str, edit: Callable[[Dataset], None], claimed: int, slices: int = 20) -> None:
        series = small_series(name, variant, slices=slices)
        for ds in series:
            edit(ds)
        cases.append(Case(name, tuple(encode(ds) for ds in series), SUCCESS, ("failed", reason),
                          drop="accepted", series_uid=str(series[0].SeriesInstanceUID), claimed_bytes=claimed,
                          instances=slices))

    def set_attr(**values):
        return lambda ds: [setattr(ds, k, v) for k, v in values.items()]

    classic("rows_columns_claim_more_than_present", "pixel data holds 512 bytes",
            set_attr(Rows=4096, Columns=4096), 4096 * 4096 * 2 * 20)
    classic("rows_columns_65535_each", "decoded pixel data would exceed",
            set_attr(Rows=65535, Columns=65535), 65535 * 65535 * 2 * 20)
    classic("bits_allocated_12", "unsupported BitsAllocated 12", set_attr(BitsAllocated=12, BitsStored=12,
                                                                          HighBit=11), 0)
    classic("bits_allocated_1", "unsupported BitsAllocated 1", set_attr(BitsAllocated=1, BitsStored=1,
                                                                        HighBit=0), 0)
    classic("bits_allocated_64", "unsupported BitsAllocated 64", set_attr(BitsAllocated=64, BitsStored=64,
                                                                          HighBit=63), 0)
    classic("rows_zero", "empty image", set_attr(Rows=0), 0)
    classic("number_of_frames_not_a_number", "malformed NumberOfFrames",
            lambda ds: ds._dict.__setitem__(Tag(0x00280008), RawDataElement(
                Tag(0x00280008), "IS", 4, b"abc ", 0, False, True)), 0)

    def enhanced(name: str, reason: str, edit: Callable[[Dataset], None], claimed: int) -> None:
        (ds,) = enhanced_series(phantom((16, 16, 20), seed=4), series_uid=_uid(name, variant, "series"))
        ds.StudyInstanceUID = _uid(name, variant, "study")
        _set_sop_uid(ds, _uid(name, variant, "sop"))
        edit(ds)
        cases.append(Case(name, (encode(ds),), SUCCESS, ("failed", reason), drop="accepted",
                          series_uid=str(ds.SeriesInstanceUID), claimed_bytes=claimed, instances=1))

    enhanced("enhanced_65535x65535x10000", "decoded pixel data would exceed",
             set_attr(Rows=65535, Columns=65535, NumberOfFrames=10000), 65535 * 65535 * 10000 * 2)
    enhanced("enhanced_frames_claim_more", "pixel data holds 10240 bytes",
             set_attr(NumberOfFrames=100_000), 16 * 16 * 100_000 * 2)

    # Odd-length pixel data: pydicom pads what it writes, so the length is made odd in the bytes.
    series = small_series("odd_length_pixel_data", variant)

    def odd(body: bytes) -> bytes:
        at = element_offset(body, 0x7FE0, 0x0010, b"OW")
        (length,) = struct.unpack("<I", body[at + 8 : at + 12])
        assert at + 12 + length == len(body)  # pixel data is the last element
        return body[: at + 8] + struct.pack("<I", length + 1) + body[at + 12 :] + b"\x01"

    cases.append(Case("odd_length_pixel_data", tuple(with_body(encode(ds), odd) for ds in series), SUCCESS,
                      ("failed", "pixel data of odd length 513"), drop="accepted",
                      series_uid=str(series[0].SeriesInstanceUID), instances=len(series)))
    # Reorder so that the two accepted cases the drop folder also gets are the memory-relevant ones.
    order = ["rows_columns_65535_each", "enhanced_65535x65535x10000"]
    return sorted(cases, key=lambda c: (c.name not in order, order.index(c.name) if c.name in order else 0))


def not_mr(variant: str) -> list[Case]:
    cases = []
    for name, sop_class, label in [("ct_images", CT_IMAGE_STORAGE, "CT Image Storage"),
                                   ("secondary_capture", SECONDARY_CAPTURE, "Secondary Capture Image Storage"),
                                   ("raw_data", RAW_DATA_STORAGE, "Raw Data Storage")]:
        series = small_series(name, variant, slices=3)
        for ds in series:
            ds.SOPClassUID = sop_class
            ds.file_meta.MediaStorageSOPClassUID = sop_class
        cases.append(Case(name, tuple(encode(ds) for ds in series), SUCCESS,
                          ("skipped", f"not an MR image series (SOP class {label})"), drop="accepted",
                          series_uid=str(series[0].SeriesInstanceUID), instances=3))
    return cases


def duplicates(variant: str) -> list[Case]:
    series = small_series("duplicates", variant, slices=3)
    files = tuple(encode(ds) for ds in series)
    return [Case("duplicates", files + files + files[:1], SUCCESS, ("skipped", "only 3 slices"),
                 series_uid=str(series[0].SeriesInstanceUID), instances=3)]


def sop_class_of(part10: bytes) -> tuple[str, str]:
    """(MediaStorageSOPClassUID, TransferSyntaxUID) from a file's meta, for the sender's presentation contexts."""
    import io

    from pydicom import dcmread

    head, _ = split(part10)
    meta = dcmread(io.BytesIO(head), force=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
