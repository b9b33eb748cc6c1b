"""Export HyS-net checkpoints to ONNX files that satisfy :mod:`qc_daemon.model_contract`.

``python -m export model CHECKPOINT --out FILE.onnx``, ``python -m export parity FILE.onnx CHECKPOINT``,
``python -m export graph FILE.onnx``, ``python -m export bundle --out FILE.onnx``; see :mod:`export.__main__`.
"""

from export.graph_check import GraphCheck, GraphCheckError, dynamic_matmuls, require_dynamic_matmuls
from export.onnx_export import (
    ExportError,
    ExportResult,
    export_checkpoint,
    export_model,
    export_onnx,
    onnx_weights_sha256,
    parity_for_checkpoint,
    parity_json_path,
    read_model_info,
)
from export.parity import ParityConfig, ParityError, ParityReport, check_parity, require_parity

__all__ = [
    "ExportError",
    "ExportResult",
    "GraphCheck",
    "GraphCheckError",
    "ParityConfig",
    "ParityError",
    "ParityReport",
    "check_parity",
    "dynamic_matmuls",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "onnx_weights_sha256",
    "parity_for_checkpoint",
    "parity_json_path",
    "read_model_info",
    "require_dynamic_matmuls",
    "require_parity",
]
