"""The N/2 ghost check (qc_daemon/ghost_check.py): what it reads on clean scans and on known ghosts, and its time.

    .venv/bin/python bench/bench_ghost_check.py [--heads 6]

Needs ../shared/data. Every volume goes through the scorer's own resampling and normalisation (2 mm) first.
1. Clean: every training scan under ../shared/data/t1w and the human and phantom DICOM series: largest ratio.
2. Ghosts: N/2 ghosts made in k-space at native resolution (phase error on every other line, or amplitude error),
   along each voxel axis, 3-30 % of the image, on the 2 unseen human series and ``--heads`` training scans of
   different sites: the ratio read (median and range over heads, axes and error types) and the axis found.
3. Time of one check on the Philips 3D T1 (170 x 256 x 256 at 1 mm: 85 x 128 x 128 on the model grid).
Prints JSON lines; the last is the summary quoted in BENCHMARKS.md and MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from shared_scans import HUMAN, PHANTOMS, SHARED, dicom_volume, require_shared_data, scan_name, training_scans

from qc_daemon.ghost_check import measure_n2_ghost
from qc_daemon.model_contract import Normalisation
from qc_daemon.preprocess import normalise, resample_to_spacing
from trainer.data import load_ras

TRAINING_HEADS = ("ds000011/sub-01", "ds000011/sub-07", "ds002748/sub-05", "ds002748/sub-30", "ds002608/sub-001",
                  "studyforrest/sub-01")
AMPLITUDES = (0.03, 0.05, 0.07, 0.12, 0.2, 0.3)


def model_grid(data: np.ndarray, spacing_mm) -> np.ndarray:
    return normalise(resample_to_spacing(data.astype(np.float32), tuple(spacing_mm), (2.0, 2.0, 2.0)), Normalisation())


def n2_ghost(data: np.ndarray, amplitude: float, axis: int, phase_error: bool) -> np.ndarray:
    shape = [1, 1, 1]
    shape[axis] = data.shape[axis]
    odd = (np.arange(data.shape[axis]) % 2 == 1).reshape(shape)
    error = np.where(odd, np.exp(2j * np.arctan(amplitude)), 1.0) if phase_error else np.where(odd, 1 - amplitude,
                                                                                                 1 + amplitude)
    return np.abs(np.fft.ifftn(np.fft.fftn(data) * error)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=len(TRAINING_HEADS), help="training scans to ghost (0-6)")
    args = parser.parse_args()
    require_shared_data()

    clean = {}
    for path in training_scans():
        data, spacing = load_ras(path)
        clean[scan_name(path)] = measure_n2_ghost(model_grid(data, spacing)).ratio
    human = {name: dicom_volume(name) for name in HUMAN}
    for name in (*HUMAN, *PHANTOMS):
        volume = human.get(name) or dicom_volume(name)
        clean[name] = measure_n2_ghost(model_grid(volume.data, volume.spacing_mm)).ratio
    measured = [r for r in clean.values() if r is not None]
    print(json.dumps({"clean": clean}))

    heads = {name: (v.data, v.spacing_mm) for name, v in human.items()}
    for name in TRAINING_HEADS[: args.heads]:
        data, spacing = load_ras(next((SHARED / "t1w").glob(f"{name}_T1w.nii*")))
        heads[name] = (data, spacing)
    ghosts: dict[float, list[float]] = {a: [] for a in AMPLITUDES}
    wrong_axis = 0
    for name, (data, spacing) in heads.items():
        data = np.asarray(data, dtype=np.float64)
        for amplitude in AMPLITUDES:
            for axis in range(3):
                for phase_error in (True, False):
                    found = measure_n2_ghost(model_grid(n2_ghost(data, amplitude, axis, phase_error), spacing))
                    ghosts[amplitude].append(found.ratio)
                    wrong_axis += found.axis != axis
        print(json.dumps({"head": name, "ratios": {a: ghosts[a][-6:] for a in AMPLITUDES}}), flush=True)

    grid = model_grid(human[HUMAN[0]].data, human[HUMAN[0]].spacing_mm)
    times = []
    for _ in range(7):
        started = time.perf_counter()
        measure_n2_ghost(grid)
        times.append(time.perf_counter() - started)
    print(json.dumps({
        "bench": "ghost_check",
        "clean_scans": len(measured), "clean_largest_ratio": max(measured),
        "ghost_ratio_median_min_max": {a: [round(statistics.median(r), 4), min(r), max(r)] for a, r in ghosts.items()},
        "ghosts_on_the_wrong_axis": wrong_axis, "ghosted_volumes": sum(len(r) for r in ghosts.values()),
        "seconds_median": round(statistics.median(times), 3), "model_grid_shape": list(grid.shape),
    }))


if __name__ == "__main__":
    main()
