"""Results for PACS: the DICOM objects the daemon puts into the scanned study (built with highdicom).

For one scored series revision:

* the **report**: an Enhanced SR (Enhanced SR Storage, 1.2.840.10008.5.1.4.1.1.88.22) holding a TID 1500
  Measurement Report. One TID 1501 measurement group, whose algorithm identification names the model
  (``qc.architecture``) and its weights hash (``qc.sha256``), holds the score, the alert threshold and every IQM
  that could be computed as measurements (codes of our private scheme ``99QCD``; IQM names are MRIQC's) and
  one qualitative evaluation, "passed" or "below threshold". The Current Requested Procedure Evidence
  Sequence lists every scored instance of the series. Enhanced SR rather than Comprehensive 3D SR: there are
  no spatial coordinates to carry, and more archives and viewers support it.
* the **montage**: a Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) of the montage PNG, RGB, with the
  verdict, score, threshold, model hash and UIDs drawn in (Burned In Annotation YES; no patient identity).

Both go into the study of the scored series: the Patient and General Study modules are copied by highdicom from
a spooled instance of that series (the only patient data in them; none is in any text or pixel the daemon
writes, and none is logged). Each is built once, when the series' findings are stored, and written to the
revision's results folder; its UIDs are derived from the result row (series UID, revision, time scored), so a
rebuilt object would carry the same ones, and a retried send re-sends the same file.

Recognising our own objects when a PACS routes the whole study back (:func:`own_result_kind`): an Enhanced SR
or Secondary Capture instance whose Manufacturer and Manufacturer's Model Name are both ``qc-daemon``. The SOP
class alone would keep them from being scored (neither is an MR image class); the marker only names the
reason. No UID root is involved: the daemon has no registered root, and a PACS may re-identify UIDs anyway.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import importlib.metadata
import os
import re
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import EnhancedSRStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import DA

MANUFACTURER = "qc-daemon"  # Manufacturer and Manufacturer's Model Name of everything the daemon creates
MODEL_NAME = "qc-daemon"
REPORT_SERIES_NUMBER = 9901
MONTAGE_SERIES_NUMBER = 9902
REPORT_FILE = "report.dcm"
MONTAGE_FILE = "montage.dcm"
TRANSFER_SYNTAX = ExplicitVRLittleEndian
CODING_SCHEME = "99QCD"  # private coding scheme (PS3.16 8.2: designators starting with "99")
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:qc-daemon:results")
OWN_RESULT_CLASSES = {EnhancedSRStorage: "SR", SecondaryCaptureImageStorage: "SC"}

# highdicom warns (warnings.warn, to stderr and so to the journal) with the patient's name when it doubts the
# name's format; the name is copied as it is either way.
warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name",
                        category=UserWarning)
_BUILD_LOCK = threading.Lock()  # pydicom's validation switch is process-wide: one build holds it at a time


@contextmanager
def verbatim_values() -> Iterator[None]:
    """pydicom's value validation off while an object is built: the patient and study values of the scanned
    series go out as they came (that is how the PACS files the object with the images), and pydicom would
    otherwise warn and log an odd value -- a name, an ID -- quoting it."""
    with _BUILD_LOCK, pydicom_config.disable_value_validation():
        yield


class ResultKind(enum.StrEnum):
    REPORT = "report"
    MONTAGE = "montage"


class ResultBuildError(RuntimeError):
    """The object cannot be built from this series; the message says why (never with patient data)."""


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str  # qc.architecture
    sha256: str  # qc.sha256, the weights hash every stored result records
    label: str  # qc.label: what the model was trained to predict


@dataclass(frozen=True)
class ResultFacts:
    """What the objects say about one scored series revision."""

    series_instance_uid: str
    revision: int
    scored_at: dt.datetime  # naive UTC; part of the UIDs, so a re-scored series gets new objects
    series_description: str | None
    score: float
    threshold: float
    iqms: Mapping[str, float | None]
    model: ModelIdentity
    device_name: str  # the daemon's AE title: names the observing device
    model_score: float | None = None  # the model's own score, when the ghost check set ``score`` lower or not
    ghost_ratio: float | None = None  # the N/2 ghost-to-signal ratio (qc_daemon/ghost_check.py), when measured
    spike_amplitude: float | None = None  # a k-space spike's stripe amplitude (qc_daemon/spike_check.py), if any

    @property
    def passed(self) -> bool:
        return self.score >= self.threshold


@dataclass(frozen=True)
class BuiltResult:
    """One object written to disk, ready to send."""

    kind: ResultKind
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    def payload(self) -> dict:
        return {
            "file": str(self.path),
            "sop_class_uid": self.sop_class_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "result_series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid,
        }


def result_uid(facts: ResultFacts, kind: ResultKind, part: str) -> str:
    """A UID for ``part`` ("series", "instance", "tracking") of one object of one result row: ``2.25.`` and a
    name-based UUID (ISO/IEC 9834-8), the same every time it is derived for that row."""
    key = f"{facts.series_instance_uid}/r{facts.revision}/{facts.scored_at.isoformat()}/{kind.value}/{part}"
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, key).int}"


def own_result_kind(ds: Dataset) -> str | None:
    """"SR" or "SC" when ``ds`` is a report or montage the daemon made (see the module docstring), else None."""
    try:
        kind = OWN_RESULT_CLASSES.get(str(ds.get("SOPClassUID", "") or "").rstrip("\x00 "))
        if kind is None:
            return None
        ours = all(str(ds.get(k, "") or "").strip() == MANUFACTURER for k in ("Manufacturer", "ManufacturerModelName"))
    except Exception:  # noqa: BLE001 - an untrusted header that cannot be read is simply not ours
        return None
    return kind if ours else None


def software_version() -> str:
    try:
        return f"qc-daemon {importlib.metadata.version('qc-daemon')}"
    except importlib.metadata.PackageNotFoundError:
        return "qc-daemon"


# ---- codes -----------------------------------------------------------------------------------------------

def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
ARBITRARY_UNITS = hd.sr.CodedConcept(value="[arb'U]", scheme_designator="UCUM", meaning="arbitrary unit")
SCORE = _code("QC-SCORE", "Image quality score (0 to 1, 1 = best)")
MODEL_SCORE = _code("QC-MODEL-SCORE", "Model output before the ghost check (0 to 1)")
GHOST_RATIO = _code("QC-N2-GHOST", "N/2 ghost-to-signal ratio")
SPIKE_AMPLITUDE = _code("QC-SPIKE", "k-space spike stripe amplitude (fraction of p99)")
THRESHOLD = _code("QC-THRESHOLD", "Quality score alert threshold")
QC_RESULT = _code("QC-RESULT", "Quality control result")
PASSED = _code("QC-PASSED", "Passed: score at or above the threshold")
BELOW_THRESHOLD = _code("QC-BELOW", "Below threshold: quality alert")
PROCEDURE = codes.SCT.ImageQualityAnalysis  # 133887000, computer assisted image analysis for image quality
FINDING_TYPE = codes.DCM.ImagingSeriesQuality  # 130550
# MRIQC's names (Esteban et al. 2017); the formulas are in qc_daemon/iqms.py.
IQM_MEANINGS = {
    "snr_csf": "snr_csf: signal-to-noise ratio in CSF (MRIQC)",
    "snr_gm": "snr_gm: signal-to-noise ratio in grey matter (MRIQC)",
    "snr_wm": "snr_wm: signal-to-noise ratio in white matter (MRIQC)",
    "snr_total": "snr_total: mean SNR of the three tissues (MRIQC)",
    "snrd_csf": "snrd_csf: Dietrich SNR in CSF, noise from air (MRIQC)",
    "snrd_gm": "snrd_gm: Dietrich SNR in grey matter (MRIQC)",
    "snrd_wm": "snrd_wm: Dietrich SNR in white matter (MRIQC)",
    "snrd_total": "snrd_total: mean Dietrich SNR of the tissues (MRIQC)",
    "cnr": "cnr: grey/white matter contrast-to-noise ratio (MRIQC)",
    "cjv": "cjv: coefficient of joint variation GM/WM (MRIQC)",
    "efc": "efc: entropy focus criterion (MRIQC)",
    "fber": "fber: foreground-background energy ratio (MRIQC)",
    "wm2max": "wm2max: white matter median over the 99.95th percentile",
    "inu_range": "inu_range: bias field range, 95th-5th percentile",
    "noise_sigma": "noise_sigma: noise standard deviation from the air",
}
IQM_UNITS = {"noise_sigma": ARBITRARY_UNITS}


# ---- the reference dataset (patient and study of the scored series) ---------------------------------------

PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                       "StudyDate", "StudyTime", "ReferringPhysicianName")


def reference_dataset(source: Dataset) -> Dataset:
    """A copy of a spooled instance's header (no pixel data) that highdicom can take patient and study from.

    Type 2 attributes the scanner left out are added empty, and a birth date or sex highdicom would refuse is
    emptied, so a sloppy header still gives a report (highdicom would raise, naming the value).
    """
    if not str(source.get("StudyInstanceUID", "") or ""):
        raise ResultBuildError("the series has no StudyInstanceUID: the results would belong to no study")
    ref = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:
            ref.add(copy.deepcopy(element))
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in ref:
            setattr(ref, keyword, None)
    if str(ref.PatientSex or "") not in ("", "M", "F", "O"):
        ref.PatientSex = None
    for keyword in ("PatientBirthDate", "StudyDate"):
        try:
            DA(str(ref.get(keyword) or "") or None)
        except ValueError:
            setattr(ref, keyword, None)
    return ref


def _evidence(datasets: Sequence[Dataset], ref: Dataset) -> list[Dataset]:
    """``ref`` first (highdicom copies patient and study from it), then every other scored instance by UID."""
    evidence = [ref]
    for ds in datasets[1:]:
        item = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(item, keyword, ds[keyword].value)
        evidence.append(item)
    return evidence


def _our_object(facts: ResultFacts, kind: ResultKind, series_number: int, title: str) -> dict:
    """The arguments every object we build shares: its UIDs (derived from the result), our identity (the marker
    :func:`own_result_kind` recognises) and its series description."""
    return {
        "series_instance_uid": result_uid(facts, kind, "series"),
        "series_number": series_number,
        "sop_instance_uid": result_uid(facts, kind, "instance"),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": software_version(),
        "series_description": _description(title, facts),
        "transfer_syntax_uid": TRANSFER_SYNTAX,
    }


def _description(prefix: str, facts: ResultFacts) -> str:
    return f"{prefix} {facts.series_description or ''}".strip()[:64]


# ---- the report ------------------------------------------------------------------------------------------


def build_report(datasets: Sequence[Dataset], facts: ResultFacts) -> hd.sr.EnhancedSR:
    """The TID 1500 Measurement Report of one scored revision; ``datasets`` are the scored instances."""
    ref = reference_dataset(datasets[0])
    algorithm = hd.sr.AlgorithmIdentification(
        name=facts.model.architecture,
        version=f"sha256:{facts.model.sha256}",
        parameters=[f"label: {facts.model.label}"[:1024], f"threshold: {facts.threshold:g}"],
        manufacturer=MANUFACTURER,
    )
    measurements = [
        hd.sr.Measurement(name=SCORE, value=facts.score, unit=NO_UNITS),
        hd.sr.Measurement(name=THRESHOLD, value=facts.threshold, unit=NO_UNITS),
    ]
    for name, value in ((MODEL_SCORE, facts.model_score), (GHOST_RATIO, facts.ghost_ratio),
                        (SPIKE_AMPLITUDE, facts.spike_amplitude)):
        if value is not None:
            measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=NO_UNITS))
    for name, value in facts.iqms.items():
        if value is not None and name in IQM_MEANINGS and np.isfinite(value):
            measurements.append(hd.sr.Measurement(
                name=_code(name.upper().replace("_", "-"), IQM_MEANINGS[name]), value=float(value),
                unit=IQM_UNITS.get(name, NO_UNITS)))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(facts, ResultKind.REPORT, "tracking"),
            identifier=f"series {facts.series_instance_uid} revision {facts.revision}"[:64],
        ),
        finding_type=FINDING_TYPE,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=QC_RESULT, value=PASSED if facts.passed else BELOW_THRESHOLD)
        ],
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=f"2.25.{uuid.uuid5(UID_NAMESPACE, f'device/{facts.device_name}').int}",
        name=facts.device_name,
        manufacturer_name=MANUFACTURER,
        model_name=MODEL_NAME,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=PROCEDURE,
        imaging_measurements=[group],
    )
    return hd.sr.EnhancedSR(
        evidence=_evidence(datasets, ref),
        content=report,
        is_complete=True,  # not final: a late instance opens a new revision, which gets a report of its own
        coding_schemes=[CodingSchemeIdentificationItem(designator=CODING_SCHEME, name="qc-daemon codes")],
        **_our_object(facts, ResultKind.REPORT, REPORT_SERIES_NUMBER, "QC report"),
    )


# ---- the montage -----------------------------------------------------------------------------------------


def read_png_rgb(path: Path) -> np.ndarray:
    """(rows, columns, 3) uint8 of a PNG; transparency is dropped (the montage is opaque)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def build_montage(source: Dataset, png: Path, facts: ResultFacts) -> hd.sc.SCImage:
    """The Secondary Capture of the montage PNG, in the study of ``source`` (a scored instance)."""
    ref = reference_dataset(source)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=read_png_rgb(png),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),  # required by highdicom; emptied below (several planes, no one orientation)
        **_our_object(facts, ResultKind.MONTAGE, MONTAGE_SERIES_NUMBER, "QC montage"),
    )
    image.PatientOrientation = None  # type 2: present, empty
    image.BurnedInAnnotation = "YES"  # verdict, score, threshold, UIDs, station, series description, date
    image.DerivationDescription = (
        f"qc-daemon montage of series {facts.series_instance_uid} revision {facts.revision}"[:1024]
    )
    return image


# ---- both, written to disk -------------------------------------------------------------------------------


def write_instance(ds: Dataset, path: Path) -> Path:
    """Write a Part 10 file atomically (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".part-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def build_results(
    kinds: Sequence[ResultKind],
    datasets: Sequence[Dataset],
    facts: ResultFacts,
    montage_png: Path | None,
    folder: Path,
) -> dict[ResultKind, BuiltResult | ResultBuildError]:
    """Build and write each object of ``kinds``; one that cannot be built is a ResultBuildError with the reason.

    The reason never holds a patient name, ID or birth date (:func:`scrub_patient_data`).
    """
    out: dict[ResultKind, BuiltResult | ResultBuildError] = {}
    for kind in kinds:
        with verbatim_values():  # reading the source's values too: pydicom validates them as it converts them
            out[kind] = _build_one(kind, datasets, facts, montage_png, folder)
    return out


def _build_one(kind: ResultKind, datasets: Sequence[Dataset], facts: ResultFacts, montage_png: Path | None,
               folder: Path) -> BuiltResult | ResultBuildError:
    try:
        if not datasets:
            raise ResultBuildError("no scored instance to take the patient and study from")
        if kind is ResultKind.REPORT:
            ds, path = build_report(datasets, facts), folder / REPORT_FILE
        else:
            if montage_png is None or not montage_png.is_file():
                raise ResultBuildError("no montage was drawn for this revision")
            ds, path = build_montage(datasets[0], montage_png, facts), folder / MONTAGE_FILE
        write_instance(ds, path)
    except ResultBuildError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a header highdicom refuses: recorded, the score is unaffected
        reason = scrub_patient_data(f"{type(exc).__name__}: {exc}", datasets[0] if datasets else Dataset())
        return ResultBuildError(f"cannot build the {kind.value}: {reason}"[:500])
    return BuiltResult(kind, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                       str(ds.StudyInstanceUID))


PATIENT_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
                    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers")


def scrub_patient_data(message: str, source: Dataset) -> str:
    """``message`` with every value of the source's patient identity attributes (and its name's components)
    replaced, so an error from highdicom or pydicom can be recorded and logged."""
    values: set[str] = set()
    for keyword in PATIENT_IDENTITY:
        try:
            value = source.get(keyword)
        except Exception:  # noqa: BLE001 - unreadable: nothing to scrub for it
            continue
        for item in value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]:
            text = str(item or "").strip()
            values.add(text)
            values.update(part for part in re.split(r"[\\^=]", text) if len(part) >= 3)
    for text in sorted((v for v in values if len(v) >= 3), key=len, reverse=True):
        message = message.replace(text, "<patient data>")
    return message
