"""Table 1 (``python -m trainer ablation``): {2D, 3D} x {plain, hyper} x {R18, R34, R50} as Markdown + CSV.

Every row is trained from one base config with only the architecture changed, at the config's budget or a
reduced one (fewer epochs / volumes per epoch / width), and tested on the base config's held-out split.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import TrainConfig, replace
from trainer.data import VolumeItem, target_score
from trainer.heldout import test_items
from trainer.metrics import Estimate, all_metrics


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

