"""Per-volume scoring time on a GPU (ONNX Runtime's CUDA provider), fp32 and optionally fp16, against the CPU.

    .venv/bin/python bench/bench_gpu.py [--repeats 5] [--shape 256 256 176] [--fp16] [--fp16-atol 0.01]

For each device (``cuda``, then ``cpu``) the daemon's own :class:`~qc_daemon.scorer.Scorer` is built with
``scoring.device`` set to it, warmed up as the daemon does at start (its ``model_warmed_up`` time is reported),
then one 1 mm volume of ``--shape`` is scored ``--repeats`` times: preprocessing (on the CPU) plus every 96^3
patch through the session. Without a usable CUDA (the driver and onnxruntime-gpu's provider) the cuda line says
so and only the CPU is timed: a missing GPU is never an error here.

``--fp16``: the model converted to float16 (ONNX Runtime's converter, float32 inputs and outputs kept) is timed on
CUDA too, and only if its patch scores stay within ``--fp16-atol`` of the fp32 scores, on the timed volume and on a
real head (``--parity-nifti``, by default ../shared/data/t1w/ds000011/sub-01_T1w.nii.gz when present). The daemon
itself runs only the checked fp32 model.

Prints one JSON line per device (and one for fp16), then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qc_daemon.logs import configure_logging
from qc_daemon.scorer import ModelError, Scorer, cuda_usable
from qc_daemon.settings import Device, LoggingSettings, ScoringSettings
from qc_daemon.volume import Volume, load_nifti

HEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "t1w" / "ds000011" / "sub-01_T1w.nii.gz"


def _time_volumes(scorer: Scorer, volume: Volume, repeats: int) -> dict:
    first_started = time.perf_counter()
    first = scorer.score_volume(volume)
    first_s = time.perf_counter() - first_started
    times, preprocess = [], []
    for _ in range(repeats):
        result = scorer.score_volume(volume)
        times.append(result.seconds)
        preprocess.append(result.preprocessing_s)
    return {
        "first_volume_s": round(first_s, 3),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "preprocess_median_s": round(statistics.median(preprocess), 3),
        "inference_median_s": round(statistics.median(t - p for t, p in zip(times, preprocess)), 3),
        "patches": len(first.patch_scores),
        "scores": first.patch_scores,
    }


def _fp16_session(scorer: Scorer):
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(scorer.path)), keep_io_types=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="default: the bundled model")
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 176])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=ScoringSettings().batch_size)
    parser.add_argument("--fp16", action="store_true", help="also time a float16 copy on CUDA, if parity holds")
    parser.add_argument("--fp16-atol", type=float, default=0.01, help="largest patch-score difference allowed")
    parser.add_argument("--parity-nifti", type=Path, default=HEAD if HEAD.exists() else None)
    args = parser.parse_args()
    configure_logging(LoggingSettings(level="warning"), stream=sys.stderr)
    rng = np.random.default_rng(0)
    volume = Volume(rng.random(args.shape, dtype=np.float32) * 1000, (1.0, 1.0, 1.0), np.eye(4))
    summary: dict = {"bench": "gpu", "shape": args.shape, "repeats": args.repeats, "batch_size": args.batch_size,
                     "cuda_usable": cuda_usable(), "cpus": os.cpu_count()}
    fp32_scores = None
    for device in (Device.CUDA, Device.CPU):
        line: dict = {"device": device.value}
        try:
            scorer = Scorer(ScoringSettings(model_path=args.model, device=device, batch_size=args.batch_size))
        except ModelError as exc:
            print(json.dumps({**line, "skipped": str(exc)}), flush=True)
            continue
        line.update(providers=scorer.session.get_providers(), model_sha256=scorer.model_sha256[:12],
                    warm_up_s=round(scorer.warm_up(), 3))
        timed = _time_volumes(scorer, volume, args.repeats)
        scores = timed.pop("scores")
        if fp32_scores is None:
            fp32_scores = scores
        else:  # the same model on another provider: how far apart the two are
            line["max_abs_diff_vs_cuda"] = float(np.max(np.abs(np.subtract(scores, fp32_scores))))
        line.update(timed)
        summary[f"{device.value}_median_s"] = timed["median_s"]
        print(json.dumps(line), flush=True)
        if device is Device.CUDA and args.fp16:
            head = load_nifti(args.parity_nifti) if args.parity_nifti else None
            head_scores = scorer.score_volume(head).patch_scores if head is not None else []
            scorer.session = _fp16_session(scorer)  # this process only: the daemon never runs an unchecked model
            scorer.warm_up()
            fp16 = _time_volumes(scorer, volume, args.repeats)
            fp16_head = scorer.score_volume(head).patch_scores if head is not None else []
            error = float(np.max(np.abs(np.subtract(fp16.pop("scores") + fp16_head, scores + head_scores))))
            parity = error <= args.fp16_atol
            fp16_line = {"device": "cuda-fp16", "max_abs_diff_vs_fp32": error, "atol": args.fp16_atol,
                         "parity": parity, **(fp16 if parity else {})}
            summary["cuda_fp16_median_s"] = fp16["median_s"] if parity else None
            print(json.dumps(fp16_line), flush=True)
    summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
