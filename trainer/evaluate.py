"""Held-out metrics of a checkpoint (``python -m trainer evaluate CKPT --out report.md``).

Test-set SROCC/PLCC/KRCC/RMSE with subject-level bootstrap CIs, overall, per dataset and per artifact kind, as
Markdown (+ JSON with every volume's prediction). The paper's other tables and figure have their own modules:
:mod:`trainer.ablation` (Table 1), :mod:`trainer.baseline` (Table 2), :mod:`trainer.pca` (Fig. 3) and
:mod:`trainer.sanity` (the exported model through the daemon's scorer).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig
from trainer.data import target_score
from trainer.heldout import config_from_checkpoint, test_items
from trainer.metrics import Estimate, all_metrics


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
        cells = [str(Estimate(**row[m])) for m in ("SROCC", "PLCC", "KRCC", "RMSE")]
        lines.append(f"| {row['subset']} | {row['n']} | " + " | ".join(cells) + " |")
    if clean.size:
        lines += ["", f"Clean held-out scans: mean score {clean.mean():.3f} (min {clean.min():.3f})."]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result

