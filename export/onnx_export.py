"""Export a HyS-net checkpoint to one self-contained .onnx file that satisfies :mod:`qc_daemon.model_contract`.

Steps, all in a temporary directory beside the output; the output path is only written (atomically) when every
step passed, so a failed export never leaves a file claiming to be good (an older file at ``out`` is left as it
was, and the command exits non-zero):

1. ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter: it produces a plain opset-17 graph with
   stable node names) with a dynamic batch axis and a fixed P^3 patch; input ``patches`` (B, 1, P, P, P),
   output ``score`` (B,). Weights are embedded (no external data file).
2. ``onnx.checker.check_model(full_check=True)`` and a check of the input/output names and shapes.
3. Hyper models: :func:`export.graph_check.require_dynamic_matmuls` (fc1..fc3 stay MatMuls with computed
   weights in the raw and the ORT-optimised graph).
4. Parity, ONNX Runtime vs torch (:mod:`export.parity`); a mismatch raises :class:`ParityError`.
5. Metadata: ``ModelInfo.to_metadata()`` with ``qc.parity`` from step 4 and ``qc.sha256`` over the initializers.
6. ``os.replace`` into ``out``, then ``out + ".parity.json"`` (the full parity report, sha256, architecture).

Only 3D models are exported (``qc.input_kind = "patch3d"``): the daemon scores 3D patches, and the 2D model is a
paper ablation that is evaluated in torch, so exporting one raises :class:`ExportError` rather than producing a
file the daemon cannot use.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from export.graph_check import GraphCheck, require_dynamic_matmuls
from export.parity import ParityConfig, ParityError, ParityReport, check_parity, require_parity
from qc_daemon.model_contract import INPUT_NAME, OUTPUT_NAME, ModelInfo
from qc_daemon.model_contract import onnx_weights_sha256 as contract_onnx_weights_sha256
from trainer.checkpoint import (
    calibration_from_meta,
    load_checkpoint,
    model_from_checkpoint,
    normalisation_from_meta,
    validate_model_meta,
)
from trainer.model import Head, HySNet, Spatial

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_KIND = "patch3d"


class ExportError(RuntimeError):
    """The model cannot be exported as asked (wrong kind, bad metadata, bad graph); the message says why."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    parity_path: Path
    info: ModelInfo
    parity: ParityReport
    graph_check: GraphCheck | None  # None for plain heads
    size_bytes: int


def parity_json_path(onnx_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(onnx_path)}.parity.json")


def onnx_weights_sha256(model: onnx.ModelProto) -> str:
    """The contract's ``qc.sha256`` of ``model`` (:func:`qc_daemon.model_contract.onnx_weights_sha256`).

    Refuses initializers stored as external data: an exported model must be self-contained.
    """
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"initializer {init.name!r} uses external data; the model must be self-contained")
    return contract_onnx_weights_sha256(model)


def read_model_info(onnx_path: str | os.PathLike[str]) -> ModelInfo:
    """The contract metadata of an exported file (``ModelInfo.from_metadata`` over ``metadata_props``)."""
    model = onnx.load(str(onnx_path))
    return ModelInfo.from_metadata({prop.key: prop.value for prop in model.metadata_props})


def export_onnx(
    model: HySNet, path: str | os.PathLike[str], *, patch_size: int = 96, opset: int = DEFAULT_OPSET
) -> None:
    """Write ``model`` as a raw (no metadata) ONNX graph and check it; see the module docstring, steps 1-2."""
    if model.config.spatial is not Spatial.D3:
        raise ExportError(
            f"{model.config.architecture}: only 3D models are exported (qc.input_kind 'patch3d'); the 2D "
            "slice model is a paper ablation evaluated in torch"
        )
    if patch_size < 1:
        raise ExportError(f"patch size must be positive, got {patch_size}")
    model = copy.deepcopy(model).cpu().float().eval()
    dummy = torch.rand(1, 1, patch_size, patch_size, patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)  # "dynamo=False is deprecated" notices
        torch.onnx.export(
            model,
            (dummy,),
            os.fspath(path),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load(os.fspath(path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{path}: initializers {external[:3]} are stored outside the file, not self-contained")
    onnx.checker.check_model(os.fspath(path), full_check=True)
    _check_io(proto, patch_size)


def _check_io(model: onnx.ModelProto, patch_size: int) -> None:
    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs, outputs = list(model.graph.input), list(model.graph.output)
    want_in = ["batch", 1, patch_size, patch_size, patch_size]
    if [i.name for i in inputs] != [INPUT_NAME] or dims(inputs[0]) != want_in:
        raise ExportError(f"graph inputs are {[(i.name, dims(i)) for i in inputs]}, expected {INPUT_NAME} {want_in}")
    if [o.name for o in outputs] != [OUTPUT_NAME] or dims(outputs[0]) != ["batch"]:
        raise ExportError(f"graph outputs are {[(o.name, dims(o)) for o in outputs]}, expected {OUTPUT_NAME} [batch]")
    for value in (*inputs, *outputs):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"{value.name} is not float32")


def export_model(
    model: HySNet,
    model_meta: dict[str, Any],
    out: str | os.PathLike[str],
    *,
    patch_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    parity: ParityConfig | None = None,
) -> ExportResult:
    """Export, check, parity-test and stamp ``model``; writes ``out`` and its ``.parity.json`` only on success.

    ``patch_size`` defaults to ``model_meta["patch_size"]``; a different value is allowed (the metadata then
    records the graph's size) as long as the patch step still covers every voxel (step <= size).
    """
    try:
        validate_model_meta(model_meta)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    size = int(model_meta["patch_size"]) if patch_size is None else int(patch_size)
    step = int(model_meta["patch_step"])
    if size != model_meta["patch_size"]:
        log.warning("exporting at patch size %d, the checkpoint says %d", size, model_meta["patch_size"])
    if step > size:
        raise ExportError(f"patch step {step} exceeds patch size {size}: patches would leave gaps")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().float().eval()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        raw_dir = tmp_dir / "raw"
        raw_dir.mkdir()
        raw_path = raw_dir / "model.onnx"
        export_onnx(model, raw_path, patch_size=size, opset=opset)
        graph_check = require_dynamic_matmuls(raw_path) if model.config.head is Head.HYPER else None
        report = require_parity(check_parity(raw_path, model, parity), what=model.config.architecture)

        proto = onnx.load(os.fspath(raw_path))
        sha = onnx_weights_sha256(proto)
        info = ModelInfo(
            architecture=model.config.architecture,
            input_kind=INPUT_KIND,
            width=model.config.width,
            patch_size=size,
            patch_step=step,
            spacing_mm=tuple(float(s) for s in model_meta["spacing_mm"]),  # type: ignore[arg-type]
            normalisation=normalisation_from_meta(model_meta),
            calibration=calibration_from_meta(model_meta),
            label=model_meta["label"],
            training_data=model_meta["training_data"],
            parity=report.to_contract(),
            sha256=sha,
        )
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, info.to_metadata())
        proto.doc_string = f"{info.architecture} width {info.width}, exported by qc-daemon export"
        final_path = tmp_dir / "final.onnx"
        onnx.save_model(proto, os.fspath(final_path), save_as_external_data=False)
        onnx.checker.check_model(os.fspath(final_path), full_check=True)
        if ModelInfo.from_metadata({p.key: p.value for p in onnx.load(os.fspath(final_path)).metadata_props}) != info:
            raise ExportError("metadata did not round-trip through the saved file")

        parity_doc = {
            "model": out.name,
            "architecture": info.architecture,
            "width": info.width,
            "sha256": sha,
            "opset": opset,
            "parity": report.to_dict(),
        }
        json_tmp = tmp_dir / "parity.json"
        json_tmp.write_text(json.dumps(parity_doc, indent=2) + "\n")
        os.replace(final_path, out)
        os.replace(json_tmp, parity_json_path(out))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(
        path=out,
        parity_path=parity_json_path(out),
        info=info,
        parity=report,
        graph_check=graph_check,
        size_bytes=out.stat().st_size,
    )


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    patch_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    parity: ParityConfig | None = None,
) -> ExportResult:
    """``python -m export model``: load a checkpoint and :func:`export_model` it."""
    ckpt = load_checkpoint(checkpoint)
    return export_model(
        model_from_checkpoint(ckpt), ckpt.model_meta, out, patch_size=patch_size, opset=opset, parity=parity
    )


def parity_for_checkpoint(
    onnx_path: str | os.PathLike[str], checkpoint: str | os.PathLike[str], parity: ParityConfig | None = None
) -> ParityReport:
    """``python -m export parity``: rerun parity of an exported file against its checkpoint (no file written).

    Also checks that the file's metadata names the checkpoint's architecture and that ``qc.sha256`` matches the
    file's initializers. Raises ParityError on any mismatch.
    """
    ckpt = load_checkpoint(checkpoint)
    proto = onnx.load(os.fspath(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_metadata(meta)
    if info.architecture != ckpt.model_config.architecture or info.width != ckpt.model_config.width:
        raise ParityError(
            f"{onnx_path} is {info.architecture} width {info.width}, the checkpoint is "
            f"{ckpt.model_config.architecture} width {ckpt.model_config.width}"
        )
    if onnx_weights_sha256(proto) != info.sha256:
        raise ParityError(f"{onnx_path}: initializers do not match qc.sha256 {info.sha256}")
    report = check_parity(onnx_path, model_from_checkpoint(ckpt), parity)
    return require_parity(report, what=os.fspath(onnx_path))
