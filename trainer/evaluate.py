"""Evaluation and the paper's tables and figure.

* :func:`evaluate_checkpoint` (``python -m trainer evaluate CKPT --out report.md``): test-set SROCC/PLCC/KRCC/RMSE
  with subject-level bootstrap CIs, overall, per dataset and per artifact kind.
* :func:`run_ablation` (``python -m trainer ablation``): Table 1 form, {2D, 3D} x {plain, hyper} x {R18, R34, R50},
  as Markdown + CSV, at the config's budget or a reduced one (fewer epochs / volumes per epoch / width).
* :func:`classical_baseline` (``python -m trainer baseline CKPT``): Table 2 form, HyS-net vs a classical
  no-reference baseline: MRIQC-style IQMs (:func:`classical_iqms`) + a scikit-learn random forest.
* :func:`pca_figure` (``python -m trainer pca CKPT``): Fig. 3 form, PCA of the generated predictor weights of
  volumes with different content (clean / each artifact kind, each dataset), as PNG.
* :func:`sanity_check` (``python -m trainer sanity MODEL.onnx``): the exported model through the daemon's own
  preprocessing on held-out subjects, each artifact applied at the scan's native resolution at every severity;
  Markdown table + PNG marking what falls below the alert threshold.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig, replace
from trainer.data import VolumeItem, build_cache, load_volume, split_items, target_score
from trainer.metrics import Estimate, all_metrics


def config_from_checkpoint(train_config: dict[str, Any]) -> TrainConfig:
    data = {k: v for k, v in train_config.items() if k in ("model", "data", "train")}
    return TrainConfig.from_dict(data)


def test_items(config: TrainConfig) -> list[VolumeItem]:
    items = build_cache(config.data)
    return split_items(items, config.data, seed=config.train.seed)["test"]


def _fmt(e: Estimate) -> str:
    return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def evaluate_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    data_config: str | Path | None = None,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the test split of the checkpoint's config (or of ``data_config``'s data section) and write a report."""
    import torch

    from trainer.checkpoint import calibration_from_meta, load_checkpoint, model_from_checkpoint
    from trainer.config import load_config
    from trainer.train import predict_items, select_device

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt.train_config)
    if data_config:
        other = load_config(data_config)
        config = TrainConfig(model=config.model, data=other.data, train=config.train)
    calibration = calibration_from_meta(ckpt.model_meta)
    items = test_items(config)
    if not items:
        raise ValueError("the test split is empty")
    device = select_device(config.train.device)
    torch.set_num_threads(max(1, config.train.num_threads or torch.get_num_threads()))
    model = model_from_checkpoint(ckpt).to(device)
    pred = predict_items(model, items, config, device, progress=progress)
    target = np.array([target_score(item, calibration) for item in items])
    groups = [item.group for item in items]
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "n_volumes": len(items),
        "n_subjects": len(set(groups)),
        "rows": [],
    }

    def add(name: str, mask: np.ndarray) -> None:
        if mask.sum() < 3:
            return
        metrics = all_metrics(pred[mask], target[mask], n_boot=n_boot, groups=np.asarray(groups)[mask])
        result["rows"].append(
            {"subset": name, "n": int(mask.sum()), **{k: dataclasses.asdict(v) for k, v in metrics.items()}}
        )

    add("all", np.ones(len(items), bool))
    for dataset in sorted({i.dataset for i in items}):
        add(f"dataset={dataset}", np.array([i.dataset == dataset for i in items]))
    for kind in sorted({i.kind for i in items} - {"clean"}):
        add(f"kind={kind} (+clean)", np.array([i.kind in (kind, "clean") for i in items]))
    result["per_volume"] = [
        {
            "file": i.file,
            "group": i.group,
            "kind": i.kind,
            "severity": i.severity,
            "label": i.label,
            "target": float(t),
            "pred": float(p),
        }
        for i, t, p in zip(items, target, pred, strict=True)
    ]
    clean = pred[np.array([i.kind == "clean" for i in items])]
    lines = [
        f"# Evaluation of `{checkpoint}`",
        "",
        (
            f"Test set: {len(items)} volumes of {len(set(groups))} held-out subjects "
            f"({', '.join(sorted({i.dataset for i in items}))}). Scores are volume means of the daemon's patch grid; "
            f"targets are the calibrated labels ({calibration.label_name}: score 0 at {calibration.label_at_0}, "
            f"1 at {calibration.label_at_1}). 95% CIs: subject-level bootstrap, {n_boot} resamples."
        ),
        "",
        "| subset | n | SROCC | PLCC | KRCC | RMSE |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = [_fmt(Estimate(**row[m])) for m in ("SROCC", "PLCC", "KRCC", "RMSE")]
        lines.append(f"| {row['subset']} | {row['n']} | " + " | ".join(cells) + " |")
    if clean.size:
        lines += ["", f"Clean held-out scans: mean score {clean.mean():.3f} (min {clean.min():.3f})."]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------- Table 1


ABLATION_GRID = [(s, h, d) for s in ("2d", "3d") for h in ("plain", "hyper") for d in (18, 34, 50)]


def ablation_row_name(spatial: str, head: str, depth: int) -> str:
    """The run folder and ``--rows`` name of one Table 1 row, e.g. ``r18-3d-hyper``."""
    return f"r{depth}-{spatial}-{head}"


def run_ablation(
    base: TrainConfig,
    out_prefix: str | Path,
    epochs: int | None = None,
    volumes_per_epoch: int | None = None,
    width: int | None = None,
    grid: Sequence[tuple[str, str, int]] = ABLATION_GRID,
    n_boot: int = 1000,
) -> list[dict[str, Any]]:
    """Train and test every (spatial, head, depth) of ``grid``; write ``{out_prefix}.md`` and ``.csv``.

    Every row trains from ``base`` (its data, split, recipe and seed) with only the architecture changed, so
    the rows differ in nothing else; ``epochs``/``volumes_per_epoch``/``width`` override the budget, and the
    table says "reduced budget" whenever it is below the paper's (50 epochs of every volume, width 64).
    Row runs go to ``{out_prefix's folder}/<row name>``; an interrupted ablation resumes (a finished row's
    training is not repeated and its test results, of ``best.pt`` and ``last.pt``, are read back from
    ``ablation-test.json``). The table is
    rewritten after every row, so a partial run already shows the rows it has.
    """
    from trainer.config import TrainSection
    from trainer.train import train

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paper = TrainSection()  # the code's defaults are the paper's recipe: less of anything is a reduced budget
    rows: list[dict[str, Any]] = []
    for spatial, head, depth in grid:
        run_dir = out_prefix.parent / ablation_row_name(spatial, head, depth)
        train_changes: dict[str, Any] = {"out_dir": str(run_dir)}
        if epochs:
            train_changes["epochs"] = epochs
        if volumes_per_epoch:
            train_changes["volumes_per_epoch"] = volumes_per_epoch
        model_changes: dict[str, Any] = {"spatial": spatial, "head": head, "depth": depth}
        if width:
            model_changes["width"] = width
        config = replace(base, model=model_changes, train=train_changes)
        reduced = (
            config.train.epochs < paper.epochs
            or config.model.width < 64
            or 0 < config.train.volumes_per_epoch
            or config.train.patches_per_volume * config.train.volumes_per_step < paper.patches_per_volume
        )
        result_path = run_dir / "ablation-test.json"
        best = run_dir / "best.pt"
        fresh = result_path.exists() and best.exists() and result_path.stat().st_mtime >= best.stat().st_mtime
        result = json.loads(result_path.read_text()) if fresh else {}
        if result.get("config") != config.to_dict():
            train(config)
            result = {"config": config.to_dict()}
        items = test_items(config)
        row = result.get("row") or _ablation_row(best, config, items, n_boot)
        if "SROCC_last" not in row:  # the last epoch too: at a short budget, the best-val-L1 epoch can be early
            last_metrics = _test_metrics(run_dir / "last.pt", config, items, n_boot)[0]
            row.update({f"{name}_last": round(e.value, 4) for name, e in last_metrics.items()})
            row.update({f"{name}_last_ci": [round(e.low, 4), round(e.high, 4)] for name, e in last_metrics.items()})
        result["row"] = row
        result_path.write_text(json.dumps(result, indent=1))
        rows.append(row)
        _write_table1(out_prefix, rows, reduced)
    return rows


def _test_metrics(
    checkpoint: Path, config: TrainConfig, items: Sequence[VolumeItem], n_boot: int
) -> tuple[dict[str, Estimate], Any]:
    """Test-split metrics of one checkpoint (the daemon's patch grid), and the checkpoint."""
    from trainer.checkpoint import calibration_from_meta, load_checkpoint, model_from_checkpoint
    from trainer.train import predict_items, select_device

    ckpt = load_checkpoint(checkpoint)
    device = select_device(config.train.device)
    pred = predict_items(model_from_checkpoint(ckpt).to(device), items, config, device)
    calibration = calibration_from_meta(ckpt.model_meta)
    target = np.array([target_score(i, calibration) for i in items])
    return all_metrics(pred, target, n_boot=n_boot, groups=[i.group for i in items]), ckpt


def _ablation_row(best: Path, config: TrainConfig, items: Sequence[VolumeItem], n_boot: int) -> dict[str, Any]:
    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.model import count_parameters

    metrics, ckpt = _test_metrics(best, config, items, n_boot)
    history = load_checkpoint(best.with_name("last.pt")).extra["history"]
    return {
        "input": config.model.spatial.upper(),
        "head": config.model.head,
        "backbone": f"R{config.model.depth}",
        "width": config.model.width,
        "parameters": count_parameters(model_from_checkpoint(ckpt)),
        "epochs": config.train.epochs,
        "steps": sum(h.get("steps", 0) for h in history),
        "train_minutes": round(sum(h["train_seconds"] for h in history) / 60, 1),
        "best_epoch": int(ckpt.extra["epoch"]) + 1,
        **{name: round(e.value, 4) for name, e in metrics.items()},
        **{f"{name}_ci": [round(e.low, 4), round(e.high, 4)] for name, e in metrics.items()},
        "n_test": len(items),
    }


def _write_table1(out_prefix: Path, rows: Sequence[dict[str, Any]], reduced: bool) -> None:
    with open(out_prefix.with_suffix(".csv"), "w", newline="") as fh:
        flat = [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    lines = [
        f"# Table 1{' (reduced budget)' if reduced else ''}: spatial input x quality head x backbone depth",
        "",
        (
            "Test split of the base config; 95 % CIs from a subject-level bootstrap. 'selected' = the epoch with "
            "the lowest validation L1 (best.pt, what `train` ships), 'last' = the final epoch. Training minutes are "
            "wall time of the training steps (validation and BatchNorm re-estimation excluded)."
        ),
        "",
        (
            "| input | head | backbone | width | parameters | epochs x steps | train min | selected epoch | SROCC "
            "(selected) | PLCC (selected) | RMSE (selected) | SROCC (last) | PLCC (last) | test volumes |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            r["input"],
            r["head"],
            r["backbone"],
            str(r["width"]),
            f"{r['parameters']:,}",
            f"{r['epochs']} x {r['steps'] // max(r['epochs'], 1)}",
            f"{r['train_minutes']:.1f}",
            str(r["best_epoch"]),
            *(
                f"{r[m]:.3f} [{r[m + '_ci'][0]:.3f}, {r[m + '_ci'][1]:.3f}]"
                for m in ("SROCC", "PLCC", "RMSE", "SROCC_last", "PLCC_last")
            ),
            str(r["n_test"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    out_prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- Table 2


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
        rows.append({"method": name, **{k: _fmt(v) for k, v in m.items()}})
    lines = [
        "# Table 2: HyS-net vs a classical no-reference baseline",
        "",
        (
            f"Same held-out test split ({len(test)} volumes, {len(set(groups))} subjects). Baseline features: "
            f"{', '.join(IQM_NAMES)}"
            f" computed by `trainer.evaluate.classical_iqms`; RandomForestRegressor(300 trees) fitted on "
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


# --------------------------------------------------------------------------------------------- Fig. 3


def pca_figure(checkpoint: str | Path, out_png: str | Path, severity: int = 4, max_subjects: int = 6) -> Path:
    """PCA of the generated predictor weights (all target layers, flattened) of the central test patch.

    One point per (subject, content): the clean scan and each artifact kind at ``severity``; colour =
    content, marker = dataset. Separated clusters mean the hyper-network writes content-specific predictors.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from sklearn.decomposition import PCA

    from trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from trainer.train import test_inputs

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt.train_config)
    model = model_from_checkpoint(ckpt)
    severity = min(severity, config.data.max_severity)
    items = [i for i in test_items(config) if i.kind == "clean" or (i.kind != "mixture" and i.severity == severity)]
    groups = sorted({i.group for i in items})[: max_subjects * 2]
    items = [i for i in items if i.group in groups]
    vectors, kinds, datasets = [], [], []
    with torch.no_grad():
        for item in items:
            inputs = test_inputs(load_volume(config.data.cache_dir, item), config)
            centre = torch.from_numpy(inputs[len(inputs) // 2 : len(inputs) // 2 + 1])
            weights = model.generated_weights(centre)
            vectors.append(np.concatenate([weights[k][0].reshape(-1).numpy() for k in sorted(weights)]))
            kinds.append(item.kind)
            datasets.append(item.dataset)
    points = PCA(n_components=2).fit_transform(np.array(vectors))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    markers = dict(zip(sorted(set(datasets)), "os^D"))
    colours = {k: plt.cm.tab10(i) for i, k in enumerate(sorted(set(kinds)))}
    for (x, y), kind, dataset in zip(points, kinds, datasets, strict=True):
        ax.scatter(x, y, color=colours[kind], marker=markers[dataset], s=36, alpha=0.85)
    for kind, colour in colours.items():
        ax.scatter([], [], color=colour, label=kind if kind == "clean" else f"{kind} (sev {severity})")
    for dataset, marker in markers.items():
        ax.scatter([], [], color="grey", marker=marker, label=dataset)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Generated predictor weights (PCA), held-out subjects")
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


# --------------------------------------------------------------------------------------------- sanity


def onnx_scorer(model_path: str | Path, threads: int = 2):
    """A function volume(RAS, float) + spacing -> score, exactly as the daemon computes it, with its ModelInfo."""
    import onnx
    import onnxruntime as ort

    from qc_daemon.model_contract import INPUT_NAME, ModelInfo
    from qc_daemon.preprocess import extract_patches, patch_grid, prepare_volume

    metadata = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    info = ModelInfo.from_metadata(metadata)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])

    def score(volume: np.ndarray, spacing_mm: Sequence[float]) -> float:
        prepared = prepare_volume(volume, tuple(spacing_mm), info.spacing_mm, info.normalisation, info.patch_size)
        patches = extract_patches(
            prepared, patch_grid(prepared.shape, info.patch_size, info.patch_step), info.patch_size
        )
        scores = [session.run(None, {INPUT_NAME: patches[i : i + 4]})[0] for i in range(0, len(patches), 4)]
        return float(np.clip(np.concatenate(scores).mean(), 0.0, 1.0))

    return score, info


def sanity_check(
    model_path: str | Path,
    checkpoint: str | Path,
    out_prefix: str | Path,
    per_dataset: int = 2,
    threshold: float = 0.5,
    seed: int = 1234,
    at: str = "native",
) -> dict[str, Any]:
    """Score held-out subjects (from ``checkpoint``'s split) with every artifact kind at every severity.

    ``at="native"``: artifacts are applied at the scan's native resolution, then the daemon's preprocessing
    runs, so this checks the shipped model on the path the daemon takes. ``at="model"``: the scan is first
    resampled to the model's spacing and the artifacts applied there (the grid on which the training
    severities are defined); the daemon's resampling is then a no-op. Writes ``{out_prefix}.md/.json/.png``.
    """
    if at not in ("native", "model"):
        raise ValueError(f"at must be 'native' or 'model', got {at!r}")
    from trainer import artifacts
    from trainer.checkpoint import load_checkpoint
    from trainer.data import find_clean_subjects, load_ras, to_model_grid

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt.train_config)
    score, info = onnx_scorer(model_path)
    test_groups = sorted({i.group for i in test_items(config)})
    roots = list(config.data.roots) if config.data.split == "holdout" else list(config.data.test_roots)
    sources = [s for s in find_clean_subjects(roots) if f"{s.dataset}/{s.subject}" in test_groups]
    chosen = []
    for dataset in sorted({s.dataset for s in sources}):
        chosen += [s for s in sources if s.dataset == dataset][:per_dataset]
    kinds = list(artifacts.KINDS)
    table = np.zeros((len(chosen), len(kinds), artifacts.MAX_SEVERITY + 1))
    for a, source in enumerate(chosen):
        volume, spacing = load_ras(source.path)
        if at == "model":
            volume, spacing = to_model_grid(volume, spacing, info.spacing_mm), info.spacing_mm
        clean_score = score(volume, spacing)
        for b, kind in enumerate(kinds):
            table[a, b, 0] = clean_score
            for s in range(1, artifacts.MAX_SEVERITY + 1):
                degraded, _ = artifacts.degrade(volume, spacing, kind, s, seed)
                table[a, b, s] = score(degraded, spacing)
    mean = table.mean(axis=0)
    names = [f"{s.dataset}/sub-{s.subject}" for s in chosen]
    lines = [
        (
            f"Mean score of {len(chosen)} held-out subjects ({', '.join(names)}); artifacts at {'native resolution' if at == 'native' else 'the model spacing'}, "
            f"daemon preprocessing, `{Path(model_path).name}`. **Bold** = below the alert threshold {threshold}."
        ),
        "",
        "| artifact | " + " | ".join(f"sev {s}" for s in range(artifacts.MAX_SEVERITY + 1)) + " |",
        "|---|" + "---|" * (artifacts.MAX_SEVERITY + 1),
    ]
    for b, kind in enumerate(kinds):
        cells = [f"**{v:.2f}**" if v < threshold else f"{v:.2f}" for v in mean[b]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Per dataset:", ""]
    for dataset in sorted({s.dataset for s in chosen}):
        idx = [i for i, s in enumerate(chosen) if s.dataset == dataset]
        sub = table[idx].mean(axis=0)
        lines.append(
            f"- {dataset}: "
            + "; ".join(f"{kind} " + "/".join(f"{v:.2f}" for v in sub[b]) for b, kind in enumerate(kinds))
        )
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out_prefix.with_suffix(".json").write_text(
        json.dumps(
            {"subjects": names, "kinds": kinds, "scores": table.tolist(), "threshold": threshold, "at": at}, indent=1
        )
    )
    sanity_plot(out_prefix.with_suffix(".json"), out_prefix.with_suffix(".png"))
    return {"mean": mean.tolist(), "subjects": names}


def sanity_plot(json_path: str | Path, png_path: str | Path) -> Path:
    """Heat map of a :func:`sanity_check` JSON: mean score per kind x severity, and how many subjects alert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    table = np.asarray(data["scores"])
    threshold, kinds = data["threshold"], data["kinds"]
    mean = table.mean(axis=0)
    n = table.shape[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(mean, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for b in range(len(kinds)):
        for s in range(mean.shape[1]):
            alerts = int((table[:, b, s] < threshold).sum())
            text = f"{mean[b, s]:.2f}" + (f"\n{alerts}/{n} alert" if alerts else "")
            ax.text(s, b, text, ha="center", va="center", fontsize=7, fontweight="bold" if alerts else "normal")
    ax.set_xticks(range(mean.shape[1]))
    ax.set_xlabel("severity (0 = clean)")
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(kinds)
    where = "native resolution" if data.get("at", "native") == "native" else "model spacing (2 mm)"
    ax.set_title(
        f"Mean score of {n} held-out subjects, artifacts at {where}\n"
        f"'k/{n} alert' = subjects scored below the alert threshold {threshold}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)
