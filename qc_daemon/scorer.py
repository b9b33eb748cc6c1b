"""Scoring: load a HyS-net ONNX model once, check its contract, score volumes patch by patch.

The volume score is the mean of the scores of all 96^3 patches at step 48 (edges covered), clipped to [0, 1];
1 = best. The patch scores and their origins are returned too (they become a quality map).
"""

from __future__ import annotations

import ctypes
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qc_daemon.ghost_check import GhostMeasure, measure_n2_ghost
from qc_daemon.logs import get_logger
from qc_daemon.model_contract import INPUT_NAME, OUTPUT_NAME, ContractError, ModelInfo, onnx_weights_sha256
from qc_daemon.preprocess import extract_patches, model_grid_affine, model_grid_volume, pad_to_min_size, patch_grid
from qc_daemon.settings import Device, ScoringSettings
from qc_daemon.spike_check import SpikeMeasure, measure_spike
from qc_daemon.volume import Volume

log = get_logger(__name__)
BUNDLED_MODEL = "hysnet-default.onnx"


class ModelError(RuntimeError):
    """The model file cannot be used; the message says why (the daemon refuses to start)."""


@dataclass(frozen=True)
class Score:
    score: float  # the lowest of model_score and the checks' scores (model_score when they are off)
    model_score: float  # the mean of the patch scores, clipped to [0, 1]
    ghost: GhostMeasure | None  # None when scoring.ghost_check is off
    spike: SpikeMeasure | None  # None when scoring.spike_check is off
    patch_scores: list[float]
    patch_origins: list[tuple[int, int, int]]
    volume_shape: tuple[int, int, int]  # after resampling and padding, the frame patch origins refer to
    patch_size: int
    model_input: np.ndarray  # (X, Y, Z) of volume_shape: the resampled, normalised, padded volume patches come from
    model_affine: np.ndarray  # (4, 4) voxel-to-world of model_input (RAS mm), for the quality map
    seconds: float  # preprocessing, inference and the checks together
    preprocessing_s: float  # resampling, normalisation, padding (the rest of ``seconds``: inference, and the checks
    # that run beside it on another thread)


def bundled_model_path() -> Path:
    return Path(str(resources.files("qc_daemon") / "models" / BUNDLED_MODEL))


def cuda_usable() -> bool:
    """CUDA is worth asking for only if ONNX Runtime was built with it *and* a driver is present.

    onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU and then logs errors when a
    session asks for it; checking for the driver library first keeps the logs of CPU-only hosts clean.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip wheels, when installed
        except Exception:  # noqa: BLE001 - absent wheels are fine: system libraries may still be found
            pass
    return True


def choose_providers(device: Device) -> list[str]:
    if device is Device.CPU:
        return ["CPUExecutionProvider"]
    if device is Device.CUDA:
        if not cuda_usable():
            raise ModelError("scoring.device = 'cuda' but no usable CUDA (driver or CUDA build of onnxruntime)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_usable() else ["CPUExecutionProvider"]


def read_model_info(path: Path) -> ModelInfo:
    """Load and check a model file's contract: metadata complete, parity passed, weights match the hash."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: not a readable ONNX model: {exc}") from exc
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    try:
        info = ModelInfo.from_metadata(metadata)
    except ContractError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    if not info.parity.passed:
        raise ModelError(f"{path}: export parity check did not pass ({info.parity})")
    if info.input_kind != "patch3d":
        raise ModelError(f"{path}: input kind {info.input_kind!r} is not scored by the daemon (needs 'patch3d')")
    actual = onnx_weights_sha256(model)
    if actual != info.sha256:
        raise ModelError(f"{path}: weights hash {actual[:12]}... does not match qc.sha256 {info.sha256[:12]}...")
    return info


class Scorer:
    def __init__(self, settings: ScoringSettings):
        self.path = Path(settings.model_path).expanduser() if settings.model_path else bundled_model_path()
        self.info = read_model_info(self.path)
        self.batch_size = settings.batch_size
        self.ghost_check = settings.ghost_check
        self.spike_check = settings.spike_check
        # The checks run beside the inference (NumPy, SciPy and ONNX Runtime release the GIL): ~0.1 s less per volume
        # on 2 cores than one after the other (BENCHMARKS.md).
        checking = self.ghost_check or self.spike_check
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="score-checks") if checking else None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if settings.threads:
            options.intra_op_num_threads = settings.threads
        self.session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=choose_providers(settings.device)
        )
        self._check_io()
        wanted = choose_providers(settings.device)[0]
        if self.session.get_providers()[0] != wanted:
            # ONNX Runtime falls back to the CPU silently when CUDA/cuDNN libraries are missing.
            if settings.device is Device.CUDA:
                raise ModelError(f"scoring.device = 'cuda' but ONNX Runtime runs on {self.session.get_providers()}")
            log.warning("cuda_unavailable", providers=self.session.get_providers())
        log.info(
            "model_loaded",
            model=str(self.path),
            architecture=self.info.architecture,
            sha256=self.info.sha256,
            providers=self.session.get_providers(),
        )

    @property
    def model_sha256(self) -> str:
        return self.info.sha256

    def _check_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ModelError(f"{self.path}: needs input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
        shape = inputs[INPUT_NAME].shape
        p = self.info.patch_size
        if len(shape) != 5 or list(shape[1:]) != [1, p, p, p]:
            raise ModelError(f"{self.path}: input shape {shape} does not match patch size {p}")

    @property
    def on_gpu(self) -> bool:
        return self.session.get_providers()[0] == "CUDAExecutionProvider"

    def warm_up(self) -> float:
        """Run the session once on dummy patches at the model's input shape, so the first series does not pay
        for ONNX Runtime's first run (memory arena, thread pool; on CUDA, the cuDNN algorithm search for each
        input shape, hence every batch size a volume can produce). Returns the seconds it took; logs
        ``model_warmed_up``."""
        started = time.perf_counter()
        p = self.info.patch_size
        batch_sizes = range(1, self.batch_size + 1) if self.on_gpu else [self.batch_size]
        for batch in batch_sizes:
            patches = np.full((batch, 1, p, p, p), self.info.normalisation.floor, np.float32)  # (B, 1, P, P, P)
            self.session.run([OUTPUT_NAME], {INPUT_NAME: patches})
        seconds = time.perf_counter() - started
        log.info("model_warmed_up", seconds=round(seconds, 3), batch_sizes=list(batch_sizes),
                 providers=self.session.get_providers())
        return seconds

    def score_volume(self, volume: Volume) -> Score:
        started = time.perf_counter()
        info = self.info
        on_grid = model_grid_volume(volume.data, volume.spacing_mm, info.spacing_mm, info.normalisation)
        prepared = pad_to_min_size(on_grid, info.patch_size, fill=info.normalisation.floor)
        checks = self._checks.submit(self._run_checks, on_grid, volume.data) if self._checks else None
        prepared_at = time.perf_counter()
        origins = patch_grid(prepared.shape, info.patch_size, info.patch_step)
        scores: list[float] = []
        for start in range(0, len(origins), self.batch_size):
            chunk = origins[start : start + self.batch_size]
            patches = extract_patches(prepared, chunk, info.patch_size)  # (B, 1, P, P, P)
            (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: patches})
            scores.extend(float(v) for v in np.asarray(out).reshape(-1))
        ghost, spike = checks.result() if checks is not None else (None, None)
        if not all(np.isfinite(scores)):
            raise ModelError("the model returned a non-finite score")
        model_score = float(np.clip(np.mean(scores), 0.0, 1.0))
        return Score(
            score=min([model_score] + [check.score for check in (ghost, spike) if check is not None]),
            model_score=model_score,
            ghost=ghost,
            spike=spike,
            patch_scores=scores,
            patch_origins=origins,
            volume_shape=tuple(int(s) for s in prepared.shape),
            patch_size=info.patch_size,
            model_input=prepared,
            model_affine=model_grid_affine(
                volume.affine, volume.data.shape, volume.spacing_mm, info.spacing_mm, info.patch_size
            ),
            seconds=time.perf_counter() - started,
            preprocessing_s=prepared_at - started,
        )

    def _run_checks(self, on_grid: np.ndarray, acquired: np.ndarray) -> tuple[GhostMeasure | None, SpikeMeasure | None]:
        ghost = measure_n2_ghost(on_grid) if self.ghost_check else None  # unpadded: the shift is half the FOV
        spike = measure_spike(acquired) if self.spike_check else None  # as acquired: the stripes are that fine
        return ghost, spike

    def describe(self) -> dict:
        return {
            "model": str(self.path),
            "architecture": self.info.architecture,
            "sha256": self.info.sha256,
            "label": self.info.label,
            "training_data": self.info.training_data,
            "calibration": json.loads(self.info.calibration.to_json()),
            "providers": self.session.get_providers(),
        }
