"""Parity: an exported .onnx file run by ONNX Runtime must give what the torch model gives.

ONNX Runtime runs on the CPUExecutionProvider with every graph optimisation on (ORT_ENABLE_ALL, as the daemon
runs it); torch runs the same network in eval mode under ``no_grad``. Both see the same inputs: for every batch
size, ``trials`` batches of values in (0, 1] (the contract's input range). The samples of a batch differ in
structure and contrast (blocky low-frequency pattern mixed with noise, per-sample gamma), so a graph that mixes
up samples or ignores content fails. Comparison is ``np.testing.assert_allclose(ort, torch, rtol, atol)``; the
defaults rtol=1e-4, atol=1e-5 are also the loosest allowed, so a passing report always means at least that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from qc_daemon.model_contract import Parity

MAX_RTOL = 1e-4
MAX_ATOL = 1e-5


class ParityError(RuntimeError):
    """ONNX Runtime and torch disagree beyond the tolerances; ``report`` holds the numbers."""

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ParityConfig:
    batch_sizes: tuple[int, ...] = (1, 3)
    trials: int = 3  # random batches per batch size
    rtol: float = MAX_RTOL
    atol: float = MAX_ATOL
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"parity batch sizes must be positive, got {self.batch_sizes!r}")
        if self.trials < 1:
            raise ValueError(f"parity trials must be >= 1, got {self.trials!r}")
        if not 0.0 <= self.rtol <= MAX_RTOL:
            raise ValueError(f"parity rtol must be in [0, {MAX_RTOL}], got {self.rtol!r}")
        if not 0.0 <= self.atol <= MAX_ATOL:
            raise ValueError(f"parity atol must be in [0, {MAX_ATOL}], got {self.atol!r}")


@dataclasses.dataclass(frozen=True)
class ParityReport:
    passed: bool
    rtol: float
    atol: float
    max_abs_err: float
    max_rel_err: float
    batch_sizes: tuple[int, ...]
    trials: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 96, 96, 96)
    provider: str
    graph_optimization: str
    onnxruntime_version: str
    torch_version: str
    failures: tuple[str, ...]  # assert_allclose messages of the failing batches, shortened

    def to_contract(self) -> Parity:
        """The subset that goes into the model file's ``qc.parity``."""
        return Parity(self.passed, self.rtol, self.atol, self.max_abs_err, self.batch_sizes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def ort_session(
    onnx_path: str | os.PathLike[str], optimized_model_filepath: str | os.PathLike[str] | None = None
) -> ort.InferenceSession:
    """A CPU session with ORT_ENABLE_ALL, optionally saving the optimised graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the NCHWc "hardware specific" warning on saving is expected
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def parity_inputs(rng: np.random.Generator, batch: int, sample_shape: tuple[int, ...]) -> np.ndarray:
    """(batch, *sample_shape) float32 in (0, 1], samples differing in structure and contrast."""
    spatial = sample_shape[1:]
    out = np.empty((batch, *sample_shape), dtype=np.float32)
    block = 8
    for i in range(batch):
        coarse = rng.random(tuple(-(-s // block) for s in spatial))
        smooth = coarse
        for axis in range(len(spatial)):
            smooth = np.repeat(smooth, block, axis=axis)
        smooth = smooth[tuple(slice(0, s) for s in spatial)]
        noise = rng.random(spatial)
        mix = rng.uniform(0.0, 1.0)
        value = (mix * smooth + (1.0 - mix) * noise) ** rng.uniform(0.5, 2.0)
        out[i, 0] = np.clip(value, 1e-3, 1.0)
    return out


def check_parity(
    onnx_path: str | os.PathLike[str], model: nn.Module, config: ParityConfig | None = None
) -> ParityReport:
    """Run the file and the model on the same inputs; the report says whether they agree (never raises on it)."""
    config = config or ParityConfig()
    session = ort_session(onnx_path)
    (input_meta,) = session.get_inputs()
    sample_shape = tuple(int(d) for d in input_meta.shape[1:])  # fixed by the export; batch is dynamic
    output_name = session.get_outputs()[0].name
    was_training = model.training
    model.eval()
    try:
        return _compare(session, input_meta.name, output_name, sample_shape, model, config)
    finally:
        model.train(was_training)


def _compare(
    session: ort.InferenceSession,
    input_name: str,
    output_name: str,
    sample_shape: tuple[int, ...],
    model: nn.Module,
    config: ParityConfig,
) -> ParityReport:
    rng = np.random.default_rng(config.seed)
    max_abs = max_rel = 0.0
    failures: list[str] = []
    for batch in config.batch_sizes:
        for trial in range(config.trials):
            x = parity_inputs(rng, batch, sample_shape)
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).cpu().numpy()
            (actual,) = session.run([output_name], {input_name: x})
            if actual.shape != expected.shape:
                failures.append(f"batch {batch} trial {trial}: shape {actual.shape} != torch {expected.shape}")
                max_abs = float("inf")
                continue
            err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
            max_abs = max(max_abs, float(err.max()))
            max_rel = max(max_rel, float((err / np.maximum(np.abs(expected), 1e-12)).max()))
            try:
                np.testing.assert_allclose(actual, expected, rtol=config.rtol, atol=config.atol)
            except AssertionError as exc:
                failures.append(f"batch {batch} trial {trial}: {' '.join(str(exc).split())[:400]}")
    return ParityReport(
        passed=not failures,
        rtol=config.rtol,
        atol=config.atol,
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        batch_sizes=tuple(config.batch_sizes),
        trials=config.trials,
        input_shape=sample_shape,
        provider="CPUExecutionProvider",
        graph_optimization="ORT_ENABLE_ALL",
        onnxruntime_version=ort.__version__,
        torch_version=torch.__version__,
        failures=tuple(failures),
    )


def require_parity(report: ParityReport, what: str = "model") -> ParityReport:
    """Raise ParityError unless ``report.passed``."""
    if not report.passed:
        raise ParityError(
            f"{what}: ONNX Runtime and torch disagree (max abs err {report.max_abs_err:.3g}, "
            f"rtol {report.rtol}, atol {report.atol}): {'; '.join(report.failures)}",
            report,
        )
    return report
