"""Which model input spacing? Speed and how much of each artifact survives the daemon's resampling.

For a 256x256x176 1 mm volume at each candidate spacing: the number of 96^3 patches and the bundled model's
time to score them with ONNX Runtime on this machine's CPU (same network at every spacing: the cost is the patch
count). For real scans degraded at their native resolution (``trainer.artifacts`` at the repeat severity): the
SSIM between the clean and the degraded scan after the daemon's resampling and normalisation to each spacing,
next to the SSIM at native resolution. 1 - SSIM is the part of the artifact the model can still see.

    .venv/bin/python bench/bench_spacing.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qc_daemon.model_contract import INPUT_NAME, OUTPUT_NAME, Normalisation  # noqa: E402
from qc_daemon.preprocess import normalise, patch_grid, resample_to_spacing  # noqa: E402
from qc_daemon.scorer import Scorer  # noqa: E402
from qc_daemon.settings import ScoringSettings  # noqa: E402
from trainer import artifacts  # noqa: E402
from trainer.labels import head_mask, quality_label  # noqa: E402

SPACINGS = (1.0, 1.5, 2.0)
KINDS = ("noise", "motion", "ghosting", "blur")
SHARED = ROOT.parent / "shared" / "data"


def patches_for(shape_mm, spacing: float) -> int:
    shape = tuple(max(96, int(round(s / spacing))) for s in shape_mm)
    return len(patch_grid(shape, 96, 48))


def time_patches(scorer: Scorer, n: int, repeats: int) -> float:
    x = np.random.default_rng(0).random((n, 1, 96, 96, 96), dtype=np.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, n, 4):
            scorer.session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + 4]})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def load_scans() -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    from qc_daemon.series import classify, read_series
    from qc_daemon.volume import build_volume, load_nifti

    scans = {}
    nifti = SHARED / "t1w" / "ds000011" / "sub-01_T1w.nii.gz"
    if nifti.exists():
        v = load_nifti(nifti)
        scans["ds000011 sub-01 (1 x 1.33 x 1.33 mm)"] = (v.data, tuple(v.spacing_mm))
    folder = SHARED / "dicom" / "philips_elitionx_t1_mprage_3d"
    if folder.is_dir():
        paths = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        v = build_volume(classify(read_series("p", paths), min_slices=5))
        scans["Philips Elition X 3D T1 (1 mm)"] = (v.data, tuple(v.spacing_mm))
    return scans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    norm = Normalisation()
    scorer = Scorer(ScoringSettings(device="cpu"))
    print("| spacing | patches (256x256x176 mm) | inference s (CPU, bundled width-16 model) |")
    print("|---|---|---|")
    for spacing in SPACINGS:
        n = patches_for((256, 256, 176), spacing)
        print(f"| {spacing} mm | {n} | {time_patches(scorer, n, args.repeats):.2f} |", flush=True)
    print()
    print("| scan | artifact (repeat severity) | SSIM native | " + " | ".join(f"SSIM at {s} mm" for s in SPACINGS) + " |")
    print("|---|---|---|" + "---|" * len(SPACINGS))
    for name, (data, spacing) in load_scans().items():
        for kind in KINDS:
            degraded, _ = artifacts.degrade(data, spacing, kind, artifacts.REPEAT_SEVERITY, seed=1, pe_axis=1)
            clean_n = normalise(data, norm)
            row = [quality_label(clean_n, normalise(degraded, norm), mask=head_mask(clean_n), already_normalised=True,
                                 spacing_mm=spacing)]
            for target in SPACINGS:
                c = normalise(resample_to_spacing(data, spacing, (target,) * 3), norm)
                d = normalise(resample_to_spacing(degraded, spacing, (target,) * 3), norm)
                row.append(quality_label(c, d, mask=head_mask(c), already_normalised=True, spacing_mm=(target,) * 3))
            print(f"| {name} | {kind} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
