"""HyS-net checkpoints: weights plus everything the ONNX export needs that the network itself does not know.

A checkpoint is one ``torch.save`` file holding plain data only (dicts, lists, strings, numbers, tensors), so
:func:`load_checkpoint` can use ``torch.load(weights_only=True)`` and never unpickles arbitrary objects::

    format        "hysnet-checkpoint", version 1
    model_config  ModelConfig.to_dict()
    train_config  the trainer's settings (free-form, JSON-like)
    model_meta    see MODEL_META_KEYS: spacing_mm, patch_size, patch_step, normalisation, calibration,
                  label, training_data -- the contract metadata minus what export measures (parity, sha256)
    state_dict    model weights
    extra         free-form JSON-like data (epoch, metrics, ...), or {}

Writes are atomic: a temporary file in the target directory, fsync, then ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qc_daemon.model_contract import ContractError, Normalisation, ScoreCalibration
from trainer.model import HySNet, ModelConfig, build_model

FORMAT = "hysnet-checkpoint"
VERSION = 1
MODEL_META_KEYS = (
    "spacing_mm",
    "patch_size",
    "patch_step",
    "normalisation",
    "calibration",
    "label",
    "training_data",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the file or the bad field."""


@dataclasses.dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: dict[str, Any]
    model_meta: dict[str, Any]
    state_dict: dict[str, Tensor]
    extra: dict[str, Any]


def make_model_meta(
    *,
    spacing_mm: tuple[float, float, float],
    patch_size: int,
    patch_step: int,
    normalisation: Normalisation,
    calibration: ScoreCalibration,
    label: str,
    training_data: str,
) -> dict[str, Any]:
    """The ``model_meta`` dict from typed values (checked by :func:`validate_model_meta`)."""
    meta = {
        "spacing_mm": [float(s) for s in spacing_mm],
        "patch_size": int(patch_size),
        "patch_step": int(patch_step),
        "normalisation": json.loads(normalisation.to_json()),
        "calibration": json.loads(calibration.to_json()),
        "label": label,
        "training_data": training_data,
    }
    validate_model_meta(meta)
    return meta


def validate_model_meta(meta: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the field if ``meta`` would not give valid contract metadata."""
    missing = [key for key in MODEL_META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"model_meta lacks {', '.join(missing)}")
    spacing = meta["spacing_mm"]
    if not (
        isinstance(spacing, (list, tuple))
        and len(spacing) == 3
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in spacing)
    ):
        raise CheckpointError(f"model_meta.spacing_mm must be three positive numbers, got {spacing!r}")
    for key in ("patch_size", "patch_step"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"model_meta.{key} must be a positive integer, got {value!r}")
    for key in ("label", "training_data"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise CheckpointError(f"model_meta.{key} must be a non-empty string, got {meta[key]!r}")
    try:
        normalisation_from_meta(meta)
        calibration_from_meta(meta)
    except (ContractError, TypeError) as exc:
        raise CheckpointError(f"model_meta: {exc}") from exc


def normalisation_from_meta(meta: Mapping[str, Any]) -> Normalisation:
    return Normalisation.from_json(json.dumps(meta["normalisation"]))


def calibration_from_meta(meta: Mapping[str, Any]) -> ScoreCalibration:
    return ScoreCalibration.from_json(json.dumps(meta["calibration"]))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: HySNet,
    model_config: ModelConfig,
    train_config: dict[str, Any],
    model_meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and the given metadata to ``path`` atomically; returns the path."""
    if model.config != model_config:
        raise CheckpointError(f"model is {model.config}, but model_config says {model_config}")
    validate_model_meta(model_meta)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": model_config.to_dict(),
        "train_config": _plain(dict(train_config), "train_config"),
        "model_meta": _plain(dict(model_meta), "model_meta"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(dict(extra or {}), "extra"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: Any, where: str) -> Any:
    """``value`` as data ``torch.load(weights_only=True)`` accepts: numpy scalars become Python numbers,
    tensors move to the CPU; anything else that is not str/int/float/bool/None/list/tuple/dict is refused."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"{where} is a {type(value).__name__} ({value!r}); checkpoints hold plain data only")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only`` loading, no arbitrary pickles)."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; name the file
        raise CheckpointError(f"{path}: cannot load checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, expected {VERSION}")
    meta = payload["model_meta"]
    validate_model_meta(meta)
    return Checkpoint(
        model_config=ModelConfig.from_dict(payload["model_config"]),
        train_config=payload["train_config"],
        model_meta=meta,
        state_dict=payload["state_dict"],
        extra=payload.get("extra") or {},
    )


def model_from_checkpoint(ckpt: Checkpoint) -> HySNet:
    """The checkpoint's network with its weights loaded (strictly), in eval mode."""
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()
