"""Time the daemon's scoring of one volume: preprocessing + all patches through ONNX Runtime.

    .venv/bin/python bench/bench_scoring.py [--model PATH] [--shape 256 256 176] [--spacing 1 1 1] [--repeats 5]

Prints one JSON line: median/min seconds, patch count, providers, the model's hash and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import sys

from qc_daemon.logs import configure_logging
from qc_daemon.scorer import Scorer
from qc_daemon.settings import LoggingSettings, ScoringSettings
from qc_daemon.volume import Volume


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 176])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"), stream=sys.stderr)
    scorer = Scorer(ScoringSettings(model_path=args.model, threads=args.threads))
    rng = np.random.default_rng(0)
    volume = Volume(rng.random(args.shape, dtype=np.float32) * 1000, tuple(args.spacing), np.eye(4))
    scorer.score_volume(volume)  # warm-up (session initialisation, allocations)
    times, patches = [], 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = scorer.score_volume(volume)
        times.append(time.perf_counter() - started)
        patches = len(result.patch_scores)
    print(json.dumps({
        "bench": "scoring",
        "shape": args.shape,
        "spacing_mm": args.spacing,
        "patches": patches,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "repeats": args.repeats,
        "architecture": scorer.info.architecture,
        "model_sha256": scorer.model_sha256[:12],
        "providers": scorer.session.get_providers(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
