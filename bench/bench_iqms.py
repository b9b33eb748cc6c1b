"""Time what follows a score: classical IQMs, the quality map and the montage of one volume.

    .venv/bin/python bench/bench_iqms.py [--shape 256 256 176] [--spacing 1 1 1] [--repeats 3]

The volume is a synthetic head in air (CSF, GM and WM shells, Rician noise); the patch scores are drawn at
random on the model's patch grid instead of running the model (this times the findings, not inference: see
bench/bench_scoring.py). Prints one JSON line: median seconds per step and in total, and the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qc_daemon.findings import compute_findings
from qc_daemon.logs import configure_logging
from qc_daemon.model_contract import Normalisation
from qc_daemon.montage import MontageCaption
from qc_daemon.preprocess import model_grid_affine, patch_grid, prepare_volume
from qc_daemon.scorer import Score
from qc_daemon.settings import LoggingSettings
from qc_daemon.volume import Volume

MODEL_SPACING_MM = (2.0, 2.0, 2.0)  # the bundled model's grid
PATCH_SIZE, PATCH_STEP = 96, 48


def synthetic_head(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape],
                                              indexing="ij")))
    head = np.select([r < 0.45, r < 0.7, r < 0.8], [600.0, 400.0, 150.0], 0.0).astype(np.float32)
    noise = rng.standard_normal((2, *shape), dtype=np.float32) * 20.0
    return np.hypot(head + noise[0], noise[1])


def fake_score(volume: Volume, seed: int = 0) -> Score:
    prepared = prepare_volume(volume.data, volume.spacing_mm, MODEL_SPACING_MM, Normalisation(), PATCH_SIZE)
    origins = patch_grid(prepared.shape, PATCH_SIZE, PATCH_STEP)
    scores = list(np.random.default_rng(seed).uniform(0.3, 1.0, len(origins)))
    mean = float(np.mean(scores))
    return Score(
        score=mean, model_score=mean, ghost=None, spike=None, patch_scores=scores, patch_origins=origins,
        volume_shape=prepared.shape, patch_size=PATCH_SIZE, model_input=prepared, seconds=0.0, preprocessing_s=0.0,
        model_affine=model_grid_affine(volume.affine, volume.data.shape, volume.spacing_mm, MODEL_SPACING_MM,
                                       PATCH_SIZE),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 176])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"), stream=sys.stderr)
    spacing = tuple(args.spacing)
    volume = Volume(synthetic_head(tuple(args.shape)), spacing, np.diag([*spacing, 1.0]))
    score = fake_score(volume)
    caption = MontageCaption(
        series_instance_uid="1.2.3", study_instance_uid="1.2", revision=1, series_description="bench",
        station_name="BENCH", completed_at=dt.datetime(2026, 1, 1), score=score.score, threshold=0.5,
        model_sha256="0" * 64,
    )
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            started = time.perf_counter()
            findings = compute_findings(volume, score, caption, Path(folder) / f"r{i}")
            runs.append({**findings.seconds, "total_s": time.perf_counter() - started})
            if findings.iqm_errors:
                raise SystemExit(f"IQMs missing on the synthetic head: {findings.iqm_errors}")
    print(json.dumps({
        "shape": args.shape,
        "spacing_mm": spacing,
        "repeats": args.repeats,
        **{f"median_{k}": round(statistics.median(run[k] for run in runs), 3) for k in runs[0]},
        "min_total_s": round(min(run["total_s"] for run in runs), 3),
        "patches": len(score.patch_scores),
        "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
