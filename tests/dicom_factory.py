"""Synthetic MR series written with pydicom: a head-like phantom, classic or enhanced, any size.

No patient data: the fields a real scanner fills with names and IDs carry obviously fake values, and tests
check that they never reach the logs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "PID-4711-SECRET"
BIRTH_DATE = "19700101"


def phantom(shape: tuple[int, int, int], seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """An ellipsoid 'head' with a brighter inner 'brain' and a little Gaussian noise, uint16 0..1000."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g**2 for g in grids)
    head = (r2 < 0.8).astype(np.float32) * 500 + (r2 < 0.5).astype(np.float32) * 400
    head += rng.normal(0, noise * 1000, size=shape).astype(np.float32)
    return np.clip(head, 0, 1000).astype(np.uint16)


def tissue_phantom(shape: tuple[int, int, int], seed: int = 0, sigma: float = 20.0) -> np.ndarray:
    """A head in air with T1-like CSF (150), GM (400) and WM (600) shells and Rician noise of ``sigma``, uint16:
    enough for the classical IQMs' head mask and 3-class tissue split."""
    rng = np.random.default_rng(seed)
    r = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")))
    head = np.select([r < 0.45, r < 0.7, r < 0.8], [600.0, 400.0, 150.0], 0.0)
    magnitude = np.hypot(head + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    return np.clip(np.round(magnitude), 0, 65535).astype(np.uint16)


def _base(series_uid: str, study_uid: str, sop_class: str, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "MR"
    ds.Manufacturer = "QC Test Factory"
    ds.StationName = "MR_TEST_1"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.SeriesNumber = 3
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 0
    return ds


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def classic_series(
    volume: np.ndarray,
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
    series_uid: str | None = None,
    description: str = "T1 MPRAGE SAG",
    images_in_acquisition: bool = False,
) -> list[Dataset]:
    """One classic MR Image Storage instance per axial slice of ``volume`` (X, Y, Z)."""
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    nx, ny, nz = volume.shape
    out = []
    for k in range(nz):
        ds = _base(series_uid, study_uid, MR_IMAGE_STORAGE, description)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing_mm[2])]
        ds.PixelSpacing = [spacing_mm[1], spacing_mm[0]]  # row spacing (Y), column spacing (X)
        ds.SliceThickness = spacing_mm[2]
        ds.SpacingBetweenSlices = spacing_mm[2]
        ds.Rows, ds.Columns = ny, nx
        if images_in_acquisition:
            ds.ImagesInAcquisition = nz
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).astype(np.uint16).tobytes()
        ds.file_meta = _file_meta(ds)
        out.append(ds)
    return out


def enhanced_series(volume: np.ndarray, spacing_mm=(1.0, 1.0, 1.0), series_uid: str | None = None) -> list[Dataset]:
    """One Enhanced MR Image Storage instance holding every slice as a frame."""
    series_uid = series_uid or generate_uid()
    nx, ny, nz = volume.shape
    ds = _base(series_uid, generate_uid(), ENHANCED_MR_IMAGE_STORAGE, "T1 3D ENHANCED")
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm[1], spacing_mm[0]]
    measures.SliceThickness = spacing_mm[2]
    measures.SpacingBetweenSlices = spacing_mm[2]
    shared.PixelMeasuresSequence = Sequence([measures])
    transform = Dataset()
    transform.RescaleIntercept = 0
    transform.RescaleSlope = 1
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(nz):
        frame = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(k * spacing_mm[2])]
        frame.PlanePositionSequence = Sequence([position])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        frame.FrameContentSequence = Sequence([content])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(np.transpose(volume, (2, 1, 0))).astype(np.uint16).tobytes()
    ds.file_meta = _file_meta(ds)
    return [ds]


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"IM{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
