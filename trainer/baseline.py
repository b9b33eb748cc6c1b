"""Table 2 (``python -m trainer baseline CKPT``): HyS-net vs a classical no-reference baseline.

The baseline: the daemon's MRIQC-style IQMs (:mod:`qc_daemon.iqms`, through :func:`classical_iqms`) fed to a
scikit-learn random forest, fitted on the checkpoint's training split; both methods are scored on its held-out
test split.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qc_daemon.iqms import IQM_NAMES as DAEMON_IQM_NAMES
from qc_daemon.iqms import compute_iqms
from trainer.data import VolumeItem, build_cache, load_volume, split_items, target_score
from trainer.evaluate import evaluate_checkpoint
from trainer.heldout import config_from_checkpoint
from trainer.metrics import all_metrics


IQM_NAMES = (*DAEMON_IQM_NAMES, "hfe")


def classical_iqms(volume: np.ndarray, spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> dict[str, float]:
    """The daemon's MRIQC-style IQMs (:func:`qc_daemon.iqms.compute_iqms`, one definition for both) of a cached
    volume, NaN where one cannot be computed (the random forest handles missing values), plus ``hfe``.

    ``hfe``, the high-frequency energy fraction: the share of spectral energy beyond half the Nyquist radius
    (higher: more noise or sharper edges); trainer-only, not an MRIQC metric. ``spacing_mm``: the cache's grid
    (``data.spacing_mm``), used by ``inu_range``.
    """
    v = np.asarray(volume, dtype=np.float64)
    report = compute_iqms(v, spacing_mm)
    out = {name: float("nan") if value is None else float(value) for name, value in report.values.items()}
    spectrum = np.abs(np.fft.fftshift(np.fft.fftn(v))) ** 2
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in v.shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    out["hfe"] = float(spectrum[radius > 0.5].sum() / spectrum.sum())
    return out


def classical_baseline(
    checkpoint: str | Path, out_prefix: str | Path, max_train: int = 400, seed: int = 0, n_boot: int = 1000
) -> dict[str, Any]:
    """Table 2 form: HyS-net vs IQMs + RandomForestRegressor, both on the checkpoint's test split."""
    from sklearn.ensemble import RandomForestRegressor

    from trainer.checkpoint import calibration_from_meta, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt.train_config)
    calibration = calibration_from_meta(ckpt.model_meta)
    parts = split_items(build_cache(config.data), config.data, seed=config.train.seed)
    rng = np.random.default_rng(seed)
    train_items = [parts["train"][i] for i in rng.permutation(len(parts["train"]))[:max_train]]
    test = parts["test"]

    def features(items: Sequence[VolumeItem]) -> np.ndarray:
        rows = [classical_iqms(load_volume(config.data.cache_dir, i), config.data.spacing_mm) for i in items]
        return np.array([[r[k] for k in IQM_NAMES] for r in rows])

    x_train, x_test = features(train_items), features(test)
    y_train = np.array([target_score(i, calibration) for i in train_items])
    y_test = np.array([target_score(i, calibration) for i in test])
    forest = RandomForestRegressor(n_estimators=300, min_samples_leaf=2, random_state=seed, n_jobs=1)
    forest.fit(x_train, y_train)
    pred_rf = forest.predict(x_test)
    evaluation = Path(out_prefix).with_name(Path(out_prefix).name + "-hysnet.md")
    hys = evaluate_checkpoint(checkpoint, evaluation, n_boot=n_boot, progress=False)
    pred_hys = np.array([row["pred"] for row in hys["per_volume"]])
    groups = [i.group for i in test]
    rows = []
    for name, pred in (
        ("IQMs + random forest (classical, no-reference)", pred_rf),
        (f"HyS-net ({ckpt.model_config.architecture}, width {ckpt.model_config.width})", pred_hys),
    ):
        m = all_metrics(pred, y_test, n_boot=n_boot, groups=groups)
        rows.append({"method": name, **{k: str(v) for k, v in m.items()}})
    lines = [
        "# Table 2: HyS-net vs a classical no-reference baseline",
        "",
        (
            f"Same held-out test split ({len(test)} volumes, {len(set(groups))} subjects). Baseline features: "
            f"{', '.join(IQM_NAMES)}"
            f" computed by `qc_daemon.iqms` (as the daemon does; hfe by `trainer.baseline`), missing ones as NaN;"
            f" RandomForestRegressor(300 trees) fitted on "
            f"{len(train_items)} training volumes."
        ),
        "",
        "| method | SROCC | PLCC | KRCC | RMSE |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['SROCC']} | {r['PLCC']} | {r['KRCC']} | {r['RMSE']} |" for r in rows]
    Path(out_prefix).with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(Path(out_prefix).with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"rows": rows}

