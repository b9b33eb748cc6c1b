"""Graph check: in an exported hyper model, the three target layers must stay per-sample matrix products.

The hyper-network's point is that fc1..fc3 use weights computed from the input. In the graph that means a
MatMul (or Gemm/Einsum, or ORT's FusedMatMul/FusedGemm) whose weight input is a computed tensor, not an
initializer or Constant. An exporter or optimiser that folded those weights into constants would silently turn
the model into a fixed-head one, so the check runs on the raw file AND on the graph ONNX Runtime produces with
ORT_ENABLE_ALL (saved through ``optimized_model_filepath``).

Target layers are found by node scope: :class:`trainer.model.PerSampleLinear` modules are named fc1..fc3, so the
TorchScript exporter names their nodes ``/head/fcK/MatMul``; ORT keeps that prefix on nodes it rewrites.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

import onnx

from export.parity import ort_session
from trainer.model import TARGET_LAYERS

MATMUL_OPS = frozenset({"MatMul", "Gemm", "Einsum", "FusedMatMul", "FusedGemm", "MatMulInteger"})
_LAYER_RE = re.compile(r"/head/(fc[123])/")


class GraphCheckError(RuntimeError):
    """The target layers are missing or have constant weights; the message says in which graph."""


@dataclasses.dataclass(frozen=True)
class GraphCheck:
    raw: dict[str, str]  # target layer -> "OpType node_name" in the exported file
    optimised: dict[str, str]  # the same in ORT's ORT_ENABLE_ALL graph

    @property
    def layers(self) -> list[str]:
        """Target layers that are computed-weight matrix products in both graphs."""
        return sorted(set(self.raw) & set(self.optimised))


def computed_weight_matmuls(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMul-like nodes whose weight operand (every input after the first) is computed from the graph input."""
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type not in MATMUL_OPS:
            continue
        weights = [name for name in node.input[1:2] if name]  # B of A x B; Gemm's C (bias) is not a weight
        if node.op_type == "Einsum":
            weights = [name for name in node.input[1:] if name]
        if weights and not any(name in constants for name in weights):
            found.append(node)
    return found


def _target_layers(graph: onnx.GraphProto) -> dict[str, str]:
    layers: dict[str, str] = {}
    for node in computed_weight_matmuls(graph):
        for label in (node.name, *node.output):
            match = _LAYER_RE.search(label)
            if match:
                layers.setdefault(match.group(1), f"{node.op_type} {node.name}")
                break
    return layers


def inspect_graph(onnx_path: str | os.PathLike[str]) -> GraphCheck:
    """Find the computed-weight target layers in the raw and the ORT-optimised graph."""
    raw = onnx.load(str(onnx_path), load_external_data=False)
    with tempfile.TemporaryDirectory(prefix="qc-graph-check-") as tmp:
        optimised_path = Path(tmp) / "optimised.onnx"
        ort_session(onnx_path, optimized_model_filepath=optimised_path)
        optimised = onnx.load(str(optimised_path))
    return GraphCheck(raw=_target_layers(raw.graph), optimised=_target_layers(optimised.graph))


def dynamic_matmuls(onnx_path: str | os.PathLike[str]) -> list[str]:
    """Target layers ("fc1".."fc3") that are computed-weight MatMul/Gemm/Einsum in both raw and optimised graph.

    A correctly exported hyper model gives ``["fc1", "fc2", "fc3"]``; a plain model gives ``[]``.
    """
    return inspect_graph(onnx_path).layers


def require_dynamic_matmuls(onnx_path: str | os.PathLike[str]) -> GraphCheck:
    """Raise GraphCheckError unless all three target layers pass :func:`dynamic_matmuls`."""
    check = inspect_graph(onnx_path)
    for which, layers in (("exported", check.raw), ("ORT-optimised", check.optimised)):
        missing = [name for name in TARGET_LAYERS if name not in layers]
        if missing:
            raise GraphCheckError(
                f"{onnx_path}: target layers {missing} are not MatMul/Gemm/Einsum with computed weights in the "
                f"{which} graph (found {layers})"
            )
    return check
