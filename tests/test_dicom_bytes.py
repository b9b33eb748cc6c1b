"""The encoding layer under the intake: the file meta it writes, and the header it parses from a received dataset.

The intake parses only the top-level elements it needs (the walk that checks the structure notes where they lie);
what it learns from them must be what a full parse of the same instance says.
"""

from __future__ import annotations

import io

import pydicom
import pytest
from conftest import shared_data
from dicom_factory import classic_series, enhanced_series, phantom
from hostile_corpus import encode
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta

from qc_daemon.completeness import announced_count, slice_facts
from qc_daemon.dicom_bytes import MalformedDataset, check_part10, dataset_start, decode_dataset, part10_header
from qc_daemon.intake import HEADER_TAGS

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.mark.parametrize(("sop_uid", "syntax", "calling_ae"), [
    ("1.2.3.4", "1.2.840.10008.1.2.1", "MR1"),  # even and odd lengths: NUL- and space-padded
    ("1.2.826.0.1.3680043.8.498." + "1" * 38, "1.2.840.10008.1.2", "SCANNER_16CHARS!"),  # 64 and 16: the limits
    ("1.2.3.45", "1.2.840.10008.1.2.1.99", "A"),
])
def test_file_meta_is_what_pydicom_writes_for_pynetdicoms_meta(sop_uid, syntax, calling_ae):
    meta = create_file_meta(sop_class_uid=MR_IMAGE_STORAGE, sop_instance_uid=sop_uid, transfer_syntax=syntax)
    meta.SourceApplicationEntityTitle = calling_ae
    expected = io.BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, meta, enforce_standard=True)
    header = part10_header(MR_IMAGE_STORAGE, sop_uid, syntax, calling_ae)
    assert header == expected.getvalue()
    assert dataset_start(header) == (len(header), syntax)


def _header_as_the_intake_reads_it(part10: bytes) -> pydicom.Dataset:
    start, syntax = dataset_start(part10)
    return decode_dataset(part10, syntax, 2**30, start=start, keep=HEADER_TAGS)


def _same_facts(part10: bytes) -> None:
    full = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True)
    header = _header_as_the_intake_reads_it(part10)
    assert len(header) < len(full)
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert header.get(keyword) == full.get(keyword)
    assert slice_facts(header) == slice_facts(full)
    assert announced_count(header) == announced_count(full)


def test_the_parsed_header_gives_the_facts_of_a_full_parse_synthetic():
    for ds in classic_series(phantom((8, 8, 3)))[:2] + enhanced_series(phantom((8, 8, 4))):
        ds.ImagesInAcquisition = 3
        _same_facts(encode(ds))


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["philips_elitionx_t1_mprage_3d", "siemens_xa30_t1_tfl_jpeglossless_phantom",
                                  "siemens_xa30_t1_tfl_enhanced_phantom", "siemens_prisma_t1_2d_sag",
                                  "siemens_trio_mosaic_transfer_syntaxes"])
def test_the_parsed_header_gives_the_facts_of_a_full_parse_real_series(name):
    """Vendor counts (Philips private block, Siemens ASCCONV in CSA and XA headers) survive the partial parse."""
    paths = sorted(shared_data("dicom", name).iterdir())
    for path in paths[:3] + paths[-1:]:
        _same_facts(path.read_bytes())


def test_a_file_is_checked_through_a_map_as_its_bytes_are(tmp_path):
    data = encode(classic_series(phantom((8, 8, 2)))[0])
    path = tmp_path / "one.dcm"
    path.write_bytes(data)
    with path.open("rb") as fh:
        assert check_part10(fh, inflate_limit=2**20) == check_part10(data, inflate_limit=2**20)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with (tmp_path / "empty.dcm").open("rb") as fh, pytest.raises(MalformedDataset, match="no 'DICM' prefix"):
        check_part10(fh, inflate_limit=2**20)
    path.write_bytes(data[:-10])  # truncated inside the pixel data
    with path.open("rb") as fh, pytest.raises(MalformedDataset, match="declares"):
        check_part10(fh, inflate_limit=2**20)
