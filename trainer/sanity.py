"""The exported model on held-out subjects x artifact kind x severity (``python -m trainer sanity MODEL.onnx``).

Scores go through the daemon's own :class:`qc_daemon.scorer.Scorer` (its model checks: contract metadata,
parity report, weights hash; its preprocessing and patch grid), so the table is what the daemon would say.
Markdown table + JSON + PNG marking what falls below the alert threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qc_daemon.scorer import Scorer
from qc_daemon.settings import Device, ScoringSettings
from qc_daemon.volume import Volume
from trainer.heldout import config_from_checkpoint, test_items


def sanity_check(
    model_path: str | Path,
    checkpoint: str | Path,
    out_prefix: str | Path,
    per_dataset: int = 2,
    threshold: float = 0.5,
    seed: int = 1234,
    at: str = "native",
    threads: int = 2,
) -> dict[str, Any]:
    """Score held-out subjects (from ``checkpoint``'s split) with every artifact kind at every severity.

    ``at="native"``: artifacts are applied at the scan's native resolution, then the daemon's preprocessing
    runs, so this checks the shipped model on the path the daemon takes (the model is refused, as by the
    daemon, when its metadata, parity report or weights hash do not check out). ``at="model"``: the scan is first
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
    scorer = Scorer(ScoringSettings(model_path=str(model_path), device=Device.CPU, threads=threads))
    info = scorer.info

    def score(volume: np.ndarray, spacing_mm) -> float:
        spacing_mm = tuple(float(s) for s in spacing_mm)
        affine = np.diag([*spacing_mm, 1.0])  # the scorer reads data and spacing only
        return scorer.score_volume(Volume(volume.astype(np.float32), spacing_mm, affine)).score

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
