"""The ONNX model contract: what an exported HyS-net file must carry so the daemon never guesses.

This module is the single definition shared by ``export/`` (which writes it), ``trainer/`` (which fills it)
and the daemon (which checks it). It depends on nothing but the standard library, so the daemon's runtime
stays free of torch.

Graph
    input  ``patches``: float32 (batch, 1, P, P, P) for ``qc.input_kind == "patch3d"``, values in (0, 1]
           after the normalisation that ``qc.normalisation`` describes.
    output ``score``:   float32 (batch,), one quality score per patch on the daemon's scale (1 = best).
           The volume score is the mean over all patches, clipped to [0, 1].

Metadata (``metadata_props``; every value is a string, structured values are JSON)
    see :data:`REQUIRED_KEYS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

CONTRACT_VERSION = "1"
INPUT_NAME = "patches"
OUTPUT_NAME = "score"

KEY_CONTRACT = "qc.contract_version"
KEY_ARCHITECTURE = "qc.architecture"  # e.g. "hysnet-r18-3d-hyper"
KEY_INPUT_KIND = "qc.input_kind"  # "patch3d" (the daemon scores these) or "slice2d" (ablation only)
KEY_WIDTH = "qc.width"  # base channel count of the backbone (64 = paper width)
KEY_PATCH_SIZE = "qc.patch_size"  # voxels per side, 96 in the paper
KEY_PATCH_STEP = "qc.patch_step"  # voxels between patch origins at test time, 48 in the paper
KEY_SPACING_MM = "qc.spacing_mm"  # JSON [x, y, z]: the volume is resampled to this before patching
KEY_NORMALISATION = "qc.normalisation"  # JSON, see Normalisation
KEY_SCORE_CALIBRATION = "qc.score_calibration"  # JSON, see ScoreCalibration
KEY_LABEL = "qc.label"  # what the network was trained to predict, in words
KEY_TRAINING_DATA = "qc.training_data"  # which data, which licence
KEY_PARITY = "qc.parity"  # JSON, see Parity
KEY_SHA256 = "qc.sha256"  # sha256 of the weights (initializers), see weights_sha256

REQUIRED_KEYS: tuple[str, ...] = (
    KEY_CONTRACT,
    KEY_ARCHITECTURE,
    KEY_INPUT_KIND,
    KEY_WIDTH,
    KEY_PATCH_SIZE,
    KEY_PATCH_STEP,
    KEY_SPACING_MM,
    KEY_NORMALISATION,
    KEY_SCORE_CALIBRATION,
    KEY_LABEL,
    KEY_TRAINING_DATA,
    KEY_PARITY,
    KEY_SHA256,
)


class ContractError(ValueError):
    """A model file does not satisfy the contract; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Intensity normalisation to (0, 1].

    v = clip(x, p_low, p_high), with p_low/p_high the ``clip_percentiles`` of the volume's voxels;
    v = floor + (1 - floor) * (v - p_low) / (p_high - p_low). A constant volume maps to ``floor``.
    """

    kind: str = "percentile_minmax"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    floor: float = 1e-3

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Normalisation:
        data = _load_json(KEY_NORMALISATION, text)
        if data.get("kind") != "percentile_minmax":
            raise ContractError(f"{KEY_NORMALISATION}: unsupported kind {data.get('kind')!r}")
        low, high = (float(v) for v in data["clip_percentiles"])
        floor = float(data["floor"])
        if not 0.0 <= low < high <= 100.0 or not 0.0 < floor < 1.0:
            raise ContractError(f"{KEY_NORMALISATION}: bad values {text!r}")
        return cls(clip_percentiles=(low, high), floor=floor)


@dataclasses.dataclass(frozen=True)
class ScoreCalibration:
    """How the training label maps to the daemon's score (1 = best), so a score can be read back as a label.

    score = clip((label - label_at_0) / (label_at_1 - label_at_0), 0, 1). The network is trained on the score,
    so its output needs no further mapping; ``label_at_0 > label_at_1`` expresses a label where lower is better.

    ``anchors`` (optional) maps an artifact kind to a piecewise-linear label -> score curve, as sorted
    ``(label, score)`` knots: the trainer anchors each kind's curve to physical severities (the label of a scan a
    technologist would repeat maps to the same score for every kind). ``kind=None`` or a kind without anchors uses
    the linear mapping. For the kinds in ``physical_kinds`` the knots' first value is the artifact's physical
    magnitude (``trainer.artifacts``), not the label: where the label cannot tell their severity apart.
    """

    label_name: str = "identity"
    label_at_0: float = 0.0
    label_at_1: float = 1.0
    anchors: tuple[tuple[str, tuple[tuple[float, float], ...]], ...] = ()
    physical_kinds: tuple[str, ...] = ()

    def score_from_label(self, label: float, kind: str | None = None) -> float:
        knots = dict(self.anchors).get(kind) if kind else None
        if knots:
            labels, scores = zip(*knots, strict=True)
            return float(np.clip(np.interp(label, labels, scores), 0.0, 1.0))
        raw = (label - self.label_at_0) / (self.label_at_1 - self.label_at_0)
        return min(1.0, max(0.0, raw))

    def label_from_score(self, score: float, kind: str | None = None) -> float:
        knots = dict(self.anchors).get(kind) if kind else None
        if knots:
            labels, scores = zip(*sorted(knots, key=lambda k: k[1]), strict=True)
            return float(np.interp(score, scores, labels))
        return self.label_at_0 + score * (self.label_at_1 - self.label_at_0)

    def to_json(self) -> str:
        data: dict[str, Any] = {"label_name": self.label_name, "label_at_0": self.label_at_0, "label_at_1": self.label_at_1}
        if self.anchors:
            data["anchors"] = {kind: [list(k) for k in knots] for kind, knots in self.anchors}
        if self.physical_kinds:
            data["physical_kinds"] = list(self.physical_kinds)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> ScoreCalibration:
        data = _load_json(KEY_SCORE_CALIBRATION, text)
        try:
            anchors = tuple(
                (str(kind), tuple((float(a), float(b)) for a, b in knots))
                for kind, knots in dict(data.get("anchors") or {}).items()
            )
            physical = tuple(str(k) for k in data.get("physical_kinds") or ())
            calibration = cls(
                str(data["label_name"]), float(data["label_at_0"]), float(data["label_at_1"]), anchors, physical
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{KEY_SCORE_CALIBRATION}: bad value {text!r}") from exc
        if calibration.label_at_0 == calibration.label_at_1:
            raise ContractError(f"{KEY_SCORE_CALIBRATION}: label_at_0 equals label_at_1 in {text!r}")
        for kind, knots in calibration.anchors:
            labels = [k[0] for k in knots]
            if len(knots) < 2 or any(b <= a for a, b in zip(labels, labels[1:])):
                raise ContractError(f"{KEY_SCORE_CALIBRATION}: anchors of {kind!r} must be >= 2 increasing labels")
        return calibration


@dataclasses.dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs torch on the exported file: the largest errors seen and the tolerances they met."""

    passed: bool
    rtol: float
    atol: float
    max_abs_err: float
    batch_sizes: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Parity:
        data = _load_json(KEY_PARITY, text)
        try:
            return cls(
                passed=bool(data["passed"]),
                rtol=float(data["rtol"]),
                atol=float(data["atol"]),
                max_abs_err=float(data["max_abs_err"]),
                batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ContractError(f"{KEY_PARITY}: bad value {text!r}") from exc


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The checked, typed form of a model file's metadata."""

    architecture: str
    input_kind: str
    width: int
    patch_size: int
    patch_step: int
    spacing_mm: tuple[float, float, float]
    normalisation: Normalisation
    calibration: ScoreCalibration
    label: str
    training_data: str
    parity: Parity
    sha256: str

    def to_metadata(self) -> dict[str, str]:
        return {
            KEY_CONTRACT: CONTRACT_VERSION,
            KEY_ARCHITECTURE: self.architecture,
            KEY_INPUT_KIND: self.input_kind,
            KEY_WIDTH: str(self.width),
            KEY_PATCH_SIZE: str(self.patch_size),
            KEY_PATCH_STEP: str(self.patch_step),
            KEY_SPACING_MM: json.dumps(list(self.spacing_mm)),
            KEY_NORMALISATION: self.normalisation.to_json(),
            KEY_SCORE_CALIBRATION: self.calibration.to_json(),
            KEY_LABEL: self.label,
            KEY_TRAINING_DATA: self.training_data,
            KEY_PARITY: self.parity.to_json(),
            KEY_SHA256: self.sha256,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ModelInfo:
        missing = [key for key in REQUIRED_KEYS if key not in metadata]
        if missing:
            raise ContractError(f"model metadata lacks {', '.join(missing)}")
        if metadata[KEY_CONTRACT] != CONTRACT_VERSION:
            raise ContractError(f"{KEY_CONTRACT}: {metadata[KEY_CONTRACT]!r} is not {CONTRACT_VERSION!r}")
        spacing = _load_json(KEY_SPACING_MM, metadata[KEY_SPACING_MM])
        if not (isinstance(spacing, list) and len(spacing) == 3 and all(_positive(s) for s in spacing)):
            raise ContractError(f"{KEY_SPACING_MM}: expected three positive numbers, got {metadata[KEY_SPACING_MM]!r}")
        return cls(
            architecture=metadata[KEY_ARCHITECTURE],
            input_kind=metadata[KEY_INPUT_KIND],
            width=_positive_int(metadata, KEY_WIDTH),
            patch_size=_positive_int(metadata, KEY_PATCH_SIZE),
            patch_step=_positive_int(metadata, KEY_PATCH_STEP),
            spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            normalisation=Normalisation.from_json(metadata[KEY_NORMALISATION]),
            calibration=ScoreCalibration.from_json(metadata[KEY_SCORE_CALIBRATION]),
            label=metadata[KEY_LABEL],
            training_data=metadata[KEY_TRAINING_DATA],
            parity=Parity.from_json(metadata[KEY_PARITY]),
            sha256=metadata[KEY_SHA256],
        )


def weights_sha256(initializers: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (name, raw bytes) of every initializer, in graph order: the identity of a model's weights.

    Metadata is not part of it, so re-stamping metadata keeps the hash; changing any weight changes it.
    """
    digest = hashlib.sha256()
    for name, raw in initializers:
        digest.update(name.encode())
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def _load_json(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{key}: not JSON: {text!r}") from exc


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _positive_int(metadata: Mapping[str, str], key: str) -> int:
    try:
        value = int(metadata[key])
    except ValueError as exc:
        raise ContractError(f"{key}: {metadata[key]!r} is not an integer") from exc
    if value <= 0:
        raise ContractError(f"{key}: {value} is not positive")
    return value


def onnx_weights_sha256(model: Any) -> str:
    """:func:`weights_sha256` of an ``onnx.ModelProto``'s initializers (little-endian array bytes)."""
    from onnx import numpy_helper  # onnx is only needed where a model file is hashed

    def little_endian_bytes(init: Any) -> bytes:
        array = numpy_helper.to_array(init)
        return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()

    return weights_sha256((init.name, little_endian_bytes(init)) for init in model.graph.initializer)
