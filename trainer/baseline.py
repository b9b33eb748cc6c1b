"""Table 2 (``python -m trainer baseline CKPT``): HyS-net vs a classical no-reference baseline.

The baseline: MRIQC-style IQMs (:func:`classical_iqms`) fed to a scikit-learn random forest, fitted on the
checkpoint's training split; both methods are scored on its held-out test split.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import VolumeItem, build_cache, load_volume, split_items, target_score
from trainer.evaluate import evaluate_checkpoint
from trainer.heldout import config_from_checkpoint
from trainer.metrics import all_metrics


IQM_NAMES = ("snr_csf", "snr_gm", "snr_wm", "snr_total", "cjv", "cnr", "efc", "fber", "wm2max", "hfe")


def classical_iqms(volume: np.ndarray, mask: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """MRIQC-style no-reference IQMs of a normalised volume (simplified: tissue classes by 3-means in the head).

    snr_{csf,gm,wm}/snr_total (mean/std within each class), cjv (coefficient of joint variation of GM and WM),
    cnr, efc (entropy focus criterion), fber (log10 foreground/background energy ratio), wm2max, and
    the high-frequency energy fraction hfe (share of spectral energy beyond half the Nyquist radius).
    """
    from trainer.labels import head_mask

    v = np.asarray(volume, dtype=np.float64)
    mask = head_mask(v) if mask is None else mask
    fg = v[mask]
    bg = v[~mask]
    rng = np.random.default_rng(seed)
    sample = rng.choice(fg, size=min(fg.size, 20000), replace=False)
    centres = np.percentile(sample, [15, 50, 85])
    for _ in range(20):  # 1D 3-means
        assign = np.argmin(np.abs(sample[:, None] - centres[None, :]), axis=1)
        centres = np.array([sample[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
    centres.sort()
    assign = np.argmin(np.abs(fg[:, None] - centres[None, :]), axis=1)
    stats = {}
    for k, name in enumerate(("csf", "gm", "wm")):
        values = fg[assign == k]
        stats[name] = (values.mean(), values.std() + 1e-6) if values.size > 1 else (centres[k], 1e-6)
    (mc, sc), (mg, sg), (mw, sw) = stats["csf"], stats["gm"], stats["wm"]
    out = {"snr_csf": mc / sc, "snr_gm": mg / sg, "snr_wm": mw / sw}
    out["snr_total"] = float(np.mean(list(out.values())))
    out["cjv"] = (sw + sg) / max(abs(mw - mg), 1e-6)
    sb = bg.std() if bg.size > 1 else 0.0
    out["cnr"] = abs(mw - mg) / np.sqrt(sb**2 + sw**2 + sg**2)
    n = v.size
    b_max = np.sqrt(np.sum(v**2))
    efc_max = n * (1.0 / np.sqrt(n)) * np.log(1.0 / np.sqrt(n))
    out["efc"] = float(np.sum((v / b_max) * np.log((v + 1e-16) / b_max)) / efc_max)
    out["fber"] = float(np.log10(np.median(fg**2) / max(np.median(bg**2) if bg.size else 1e-12, 1e-12)))
    out["wm2max"] = mw / np.percentile(fg, 99.95)
    spectrum = np.abs(np.fft.fftshift(np.fft.fftn(v))) ** 2
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in v.shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    out["hfe"] = float(spectrum[radius > 0.5].sum() / spectrum.sum())
    return {k: float(val) for k, val in out.items()}


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
        rows = [classical_iqms(load_volume(config.data.cache_dir, i)) for i in items]
        return np.array([[r[k] for k in sorted(r)] for r in rows])

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
            f" computed by `trainer.baseline.classical_iqms`; RandomForestRegressor(300 trees) fitted on "
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

