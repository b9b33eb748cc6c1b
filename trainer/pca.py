"""Fig. 3 (``python -m trainer pca CKPT``): PCA of the generated predictor weights of held-out volumes, as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data import load_volume
from trainer.heldout import config_from_checkpoint, test_items


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

