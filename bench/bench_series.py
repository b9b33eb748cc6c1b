"""Time a real series through the daemon's stages: read spool files, classify, build the volume, score.

    .venv/bin/python bench/bench_series.py [DICOM_FOLDER] [--repeats 3]

Default folder: ../shared/data/dicom/philips_elitionx_t1_mprage_3d (170 slices, 256x256, 1 mm).
Prints one JSON line with the median seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sys

from qc_daemon.logs import configure_logging
from qc_daemon.scorer import Scorer
from qc_daemon.series import classify, read_series
from qc_daemon.settings import LoggingSettings, ScoringSettings
from qc_daemon.volume import build_volume

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "philips_elitionx_t1_mprage_3d"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dicom2nifti-original", action="store_true",
        help="use dicom2nifti's own get_volume_pixeldata (deep-copies every slice) to compare",
    )
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"), stream=sys.stderr)
    paths = sorted(p for p in args.folder.rglob("*") if p.is_file())
    scorer = Scorer(ScoringSettings())
    stages: dict[str, list[float]] = {"read": [], "classify": [], "build_volume": [], "score": [], "total": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        series = read_series("bench", paths)
        t1 = time.perf_counter()
        series = classify(series, 16)
        t2 = time.perf_counter()
        volume = build_volume(series, copy_free=not args.dicom2nifti_original)
        t3 = time.perf_counter()
        scorer.score_volume(volume)
        t4 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            stages[name].append(seconds)
    print(json.dumps({
        "bench": "series",
        "folder": args.folder.name,
        "files": len(paths),
        "volume_shape": list(volume.data.shape),
        **{f"{name}_s": round(statistics.median(values), 3) for name, values in stages.items()},
        "dicom2nifti_original": args.dicom2nifti_original,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
