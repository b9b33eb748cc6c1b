"""Volume building: a classified series -> one NIfTI (dicom2nifti) -> RAS float32 array with its spacing."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dicom2nifti
import dicom2nifti.common
import dicom2nifti.settings
import nibabel as nib
import numpy as np
from dicom2nifti.exceptions import ConversionError, ConversionValidationError

from qc_daemon.series import SeriesFailed, SeriesSkipped, SpooledSeries

# dicom2nifti releases whose ``common.get_volume_pixeldata`` the copy-free replacement below was checked against
# (tests/test_volume.py compares the two; pyproject.toml pins the same range). Any other: upstream is used.
CHECKED_DICOM2NIFTI = (2, 6)
UPSTREAM_GET_VOLUME_PIXELDATA = dicom2nifti.common.get_volume_pixeldata


@functools.cache
def _dicom2nifti_version() -> tuple[int, int]:
    major, minor = importlib.metadata.version("dicom2nifti").split(".")[:2]
    return int(major), int(minor)


def _volume_pixeldata_without_copies(sorted_slices):
    """dicom2nifti's ``common.get_volume_pixeldata`` minus its ``copy.deepcopy`` of every slice.

    dicom2nifti deep-copies each dataset so that decoding does not keep pixel arrays on the caller's objects;
    the daemon drops its datasets right after conversion, and the copies cost 1.8 of 2.8 s on a 170-slice
    Philips series (private headers are large; bench/bench_series.py). Same arithmetic otherwise.
    """
    combined_dtype, volume = None, None
    for i, slice_ in enumerate(sorted_slices):
        slice_data = dicom2nifti.common._get_slice_pixeldata(slice_)
        combined_dtype = slice_data.dtype if combined_dtype is None else np.promote_types(combined_dtype, slice_data.dtype)
        if volume is None:
            volume = np.zeros((len(sorted_slices),) + slice_data.shape, combined_dtype)
        if volume.dtype != combined_dtype:
            volume = volume.astype(combined_dtype)
        volume[i] = slice_data
    if volume.ndim == 4 and volume.shape[3] == 3:
        return np.transpose(volume, (2, 1, 0, 3))
    return np.transpose(volume, (2, 1, 0))


_swap_lock = threading.Lock()
_swap_users = 0


@contextlib.contextmanager
def copy_free_pixel_reading(enabled: bool = True) -> Iterator[None]:
    """While inside, dicom2nifti reads pixel data with :func:`_volume_pixeldata_without_copies`.

    dicom2nifti looks the function up as ``common.get_volume_pixeldata`` at each call, so it is swapped in that
    module; worker threads share one swap (counted), and the last to leave puts upstream's back. Nothing is
    swapped when ``enabled`` is false or the installed dicom2nifti is not the checked release.
    """
    global _swap_users
    swap = enabled and _dicom2nifti_version() == CHECKED_DICOM2NIFTI
    if swap:
        with _swap_lock:
            if _swap_users == 0:
                dicom2nifti.common.get_volume_pixeldata = _volume_pixeldata_without_copies
            _swap_users += 1
    try:
        yield
    finally:
        if swap:
            with _swap_lock:
                _swap_users -= 1
                if _swap_users == 0:
                    dicom2nifti.common.get_volume_pixeldata = UPSTREAM_GET_VOLUME_PIXELDATA


def _configure_dicom2nifti() -> None:
    # Gantry-tilted or non-orthogonal stacks are resampled by dicom2nifti instead of being refused.
    dicom2nifti.settings.enable_resampling()
    dicom2nifti.settings.set_resample_spline_interpolation_order(1)


@dataclass(frozen=True)
class Volume:
    data: np.ndarray  # (X, Y, Z) float32, RAS+ voxel axes
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray


def volume_from_nifti(image: nib.spatialimages.SpatialImage) -> Volume:
    """Reorient to the closest RAS+ axes and read the data as float32; refuses anything but 3D."""
    canonical = nib.as_closest_canonical(image)
    shape = canonical.shape
    if len(shape) == 4 and shape[3] == 1:
        canonical = canonical.slicer[..., 0]
    elif len(shape) != 3:
        raise SeriesSkipped(f"{len(shape)}D image of shape {tuple(shape)}: a time series, not a 3D volume")
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    if not all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise SeriesFailed(f"invalid voxel spacing {zooms}")
    return Volume(data=data, spacing_mm=zooms, affine=canonical.affine)


def build_volume(series: SpooledSeries, keep_nifti_as: Path | None = None, copy_free: bool = True) -> Volume:
    """Convert with dicom2nifti; validation refusals become SeriesSkipped, other errors SeriesFailed.

    ``copy_free``: read pixel data without dicom2nifti's per-slice deep copies (same result, see
    :func:`copy_free_pixel_reading`).
    """
    _configure_dicom2nifti()
    workdir = Path(tempfile.mkdtemp(prefix="qc-volume-"))
    try:
        out_file = workdir / "volume.nii"  # uncompressed: dicom2nifti writes it twice, gzip would cost seconds
        try:
            with copy_free_pixel_reading(copy_free):
                result = dicom2nifti.convert_dicom.dicom_array_to_nifti(list(series.datasets), str(out_file), True)
        except ConversionValidationError as exc:
            raise SeriesSkipped(f"dicom2nifti refused the series: {exc}") from exc
        except ConversionError as exc:
            raise SeriesFailed(f"dicom2nifti could not convert the series: {exc}") from exc
        except MemoryError as exc:
            raise SeriesFailed("out of memory while decoding the series") from exc
        except Exception as exc:  # noqa: BLE001 - decoders raise anything on broken pixel data
            raise SeriesFailed(f"volume conversion failed: {type(exc).__name__}: {exc}"[:500]) from exc
        volume = volume_from_nifti(result["NII"])
        if keep_nifti_as is not None:
            keep_nifti_as.parent.mkdir(parents=True, exist_ok=True)
            tmp = keep_nifti_as.with_name(".part-" + keep_nifti_as.name)
            nib.save(result["NII"], str(tmp))
            tmp.replace(keep_nifti_as)
        return volume
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_nifti(path: Path) -> Volume:
    try:
        image = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SeriesFailed(f"cannot read {path.name} as NIfTI: {exc}") from exc
    return volume_from_nifti(image)
