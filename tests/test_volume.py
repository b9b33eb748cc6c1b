"""Volume building: the copy-free pixel reader swapped into dicom2nifti gives upstream's result, and is scoped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import dicom2nifti.common
import numpy as np
import pydicom
import pytest
from dicom_factory import classic_series, phantom, write_series
from pydicom.uid import RLELossless

from qc_daemon import volume as volume_module
from qc_daemon.series import classify, read_series
from qc_daemon.volume import (
    CHECKED_DICOM2NIFTI,
    UPSTREAM_GET_VOLUME_PIXELDATA,
    _volume_pixeldata_without_copies,
    build_volume,
    copy_free_pixel_reading,
)

ROOT = Path(__file__).resolve().parents[1]


def _series_files(tmp_path: Path, compress: bool = False) -> list[Path]:
    datasets = classic_series(phantom((48, 40, 24)), spacing_mm=(1.0, 1.2, 2.0))
    for k, ds in enumerate(datasets):
        if k % 3 == 1:  # slices whose rescale makes dicom2nifti promote the volume's dtype to float
            ds.RescaleSlope, ds.RescaleIntercept = 1.5, -20
        if compress:
            ds.compress(RLELossless)
    return write_series(datasets, tmp_path)


def test_installed_dicom2nifti_is_the_checked_release():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [p for p in pins if p.startswith("dicom2nifti")]
    major, minor = CHECKED_DICOM2NIFTI
    assert pin.split("#")[0].strip() == f"dicom2nifti>={major}.{minor},<{major}.{minor + 1}"
    assert volume_module._dicom2nifti_version() == CHECKED_DICOM2NIFTI


@pytest.mark.parametrize("compress", [False, True], ids=["explicit-le", "rle"])
def test_copy_free_reader_returns_upstreams_array(tmp_path, compress):
    slices = [pydicom.dcmread(p) for p in _series_files(tmp_path, compress)]
    upstream = UPSTREAM_GET_VOLUME_PIXELDATA(slices)
    ours = _volume_pixeldata_without_copies(slices)
    assert ours.dtype == upstream.dtype != np.uint16
    np.testing.assert_array_equal(ours, upstream)


def test_volume_is_identical_with_and_without_the_swap(tmp_path):
    paths = _series_files(tmp_path)
    swapped = build_volume(classify(read_series("s", paths), 16), copy_free=True)
    upstream = build_volume(classify(read_series("s", paths), 16), copy_free=False)
    np.testing.assert_array_equal(swapped.data, upstream.data)
    np.testing.assert_array_equal(swapped.affine, upstream.affine)
    assert swapped.spacing_mm == upstream.spacing_mm


def test_the_swap_lasts_only_while_building():
    assert dicom2nifti.common.get_volume_pixeldata is UPSTREAM_GET_VOLUME_PIXELDATA
    with copy_free_pixel_reading():
        with copy_free_pixel_reading():  # a second worker thread building at the same time
            assert dicom2nifti.common.get_volume_pixeldata is _volume_pixeldata_without_copies
        assert dicom2nifti.common.get_volume_pixeldata is _volume_pixeldata_without_copies
    assert dicom2nifti.common.get_volume_pixeldata is UPSTREAM_GET_VOLUME_PIXELDATA
    with copy_free_pixel_reading(enabled=False):
        assert dicom2nifti.common.get_volume_pixeldata is UPSTREAM_GET_VOLUME_PIXELDATA
