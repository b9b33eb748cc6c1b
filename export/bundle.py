"""A placeholder model: a seeded, randomly initialised HyS-net in the daemon's model contract.

It lets the daemon's code paths, packaging and export be exercised where no trained model is at hand. Its
scores mean nothing, and its metadata says so (``qc.label``, ``qc.training_data``, calibration label
"untrained"); tests fail if the model shipped in ``qc_daemon/models/`` is one. ``python -m export bundle --out
FILE`` writes one (same seed, same weights, same ``qc.sha256`` on the same torch build); it refuses to write
over the shipped trained model unless told ``--force``.
"""

from __future__ import annotations

import os
from pathlib import Path

from export.onnx_export import ExportError, ExportResult, export_model
from export.parity import ParityConfig
from qc_daemon.model_contract import Normalisation, ScoreCalibration
from trainer.checkpoint import make_model_meta
from trainer.model import Head, ModelConfig, Spatial, build_model

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "qc_daemon" / "models" / "hysnet-default.onnx"
DEFAULT_WIDTH = 8
DEFAULT_SEED = 0
PLACEHOLDER_LABEL = "none: randomly initialised placeholder, its scores mean nothing"
PLACEHOLDER_DATA = "none: randomly initialised (seeded), never trained"


def placeholder_meta(patch_size: int = 96, patch_step: int = 48) -> dict:
    return make_model_meta(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=patch_size,
        patch_step=patch_step,
        normalisation=Normalisation(),
        calibration=ScoreCalibration(label_name="untrained", label_at_0=0.0, label_at_1=1.0),
        label=PLACEHOLDER_LABEL,
        training_data=PLACEHOLDER_DATA,
    )


def build_bundle(
    out: str | os.PathLike[str],
    *,
    width: int = DEFAULT_WIDTH,
    seed: int = DEFAULT_SEED,
    parity: ParityConfig | None = None,
    force: bool = False,
) -> ExportResult:
    """Export the seeded R18 3D hyper placeholder (patch 96, step 48, 2 mm) to ``out`` (+ .parity.json).

    Writing over the shipped model (``SHIPPED_MODEL``) raises :class:`ExportError` unless ``force``.
    """
    if Path(out).resolve() == SHIPPED_MODEL.resolve() and not force:
        raise ExportError(
            f"{out} is the shipped trained model: refusing to overwrite it with an untrained placeholder "
            "(choose another --out, or pass --force)"
        )
    config = ModelConfig(depth=18, spatial=Spatial.D3, head=Head.HYPER, width=width)
    model = build_model(config, seed=seed).eval()
    return export_model(model, placeholder_meta(), out, parity=parity)
