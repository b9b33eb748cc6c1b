"""The training loop, top to bottom: ``python -m trainer train --config trainer/configs/default.toml``.

1. Seeds everywhere (numpy per epoch from ``[seed, epoch]``, torch from ``seed``), device = CUDA when present.
2. Data: build or reuse the cache (:mod:`trainer.data`), split by subject, fit the label -> score calibration on
   the training labels.
3. Model: ``build_model(config.to_model_config(), seed)``; Adam, lr halved every ``lr_halve_every`` epochs
   (:func:`lr_at`, a pure function); L1 loss between patch scores and the volume's score.
4. Each step draws ``volumes_per_step`` training volumes and ``patches_per_volume`` (9) random patches from each;
   with ``reorient`` each patch gets a random axis permutation and flips (:func:`trainer.patches.reorient_randomly`).
5. Optionally (``bn_recalib_batches``) BatchNorm statistics are re-estimated on training batches, and with
   ``freeze_bn`` the network trains on those population statistics (BN in eval mode), so a patch's score does
   not depend on the other volumes in its batch and training matches test time. Each epoch ends with a
   validation pass using the daemon's test-time patching (mean of patch scores per
   volume); ``last.pt`` is always written (with the optimizer state, for ``resume``), ``best.pt`` when the
   validation L1 improves (the last epoch's when there is no validation set).
6. With ``average_from_epoch`` the weights of every epoch from that one on are averaged (stochastic weight
   averaging, kept in ``average-running.pt`` for ``resume``); after the last epoch the average gets its own
   BatchNorm statistics and a validation pass and is written to ``averaged.pt``. On this small, noisy data one
   epoch's weights swing from one validation to the next; their average does not depend on which epoch happened
   to validate best on four subjects of the training sites.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint import load_checkpoint, make_model_meta, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import (
    NORMALISATION,
    VolumeItem,
    build_cache,
    fit_calibration,
    load_volume,
    split_items,
    target_score,
)
from trainer.labels import LABEL_NAME
from trainer.metrics import plcc, srocc
from trainer.model import HySNet, build_model
from trainer.patches import (
    reorient_randomly,
    sample_patches,
    sample_slices,
    slice_size,
    test_patches,
    test_slices,
    volume_score,
)

LICENCES = {
    "ds000011": "OpenfMRI ds000011, PDDL 1.0",
    "ds002748": "OpenNeuro ds002748 v1.0.5, CC0 (Bezmaternykh et al., Neural Plasticity 2021)",
    "ds002608": "OpenNeuro ds002608 v1.0.1, PDDL 1.0 (Spisak et al., Nat Commun 2019)",
    "studyforrest": "studyforrest, PDDL 1.0 (Hanke et al., Sci Data 2014)",
}


def lr_at(epoch: int, base_lr: float, halve_every: int) -> float:
    """Learning rate of 0-based ``epoch``: ``base_lr`` halved every ``halve_every`` epochs."""
    return base_lr * 0.5 ** (epoch // halve_every)


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_inputs(volume: np.ndarray, config: TrainConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """The random network inputs of one volume: 3D patches, or 2D slices for the 2D ablation."""
    size = config.data.patch_size
    if config.model.spatial == "2d":
        inputs = sample_slices(volume, slice_size(size), n, rng)
    else:
        inputs = sample_patches(volume, size, n, rng, fill=NORMALISATION.floor)
    return reorient_randomly(inputs, rng) if config.train.reorient else inputs


def test_inputs(volume: np.ndarray, config: TrainConfig) -> np.ndarray:
    """The daemon's test-time inputs of one volume (patch grid), or every other slice for 2D."""
    if config.model.spatial == "2d":
        return test_slices(volume, slice_size(config.data.patch_size))
    return test_patches(volume, config.data.patch_size, config.data.patch_step, fill=NORMALISATION.floor)


@torch.no_grad()
def predict_volume(
    model: HySNet, volume: np.ndarray, config: TrainConfig, device: torch.device, batch: int = 4
) -> float:
    """Volume score as the daemon computes it: mean of the patch scores, clipped to [0, 1]."""
    model.eval()
    inputs = test_inputs(volume, config)
    scores = [
        model(torch.from_numpy(inputs[i : i + batch]).to(device)).cpu().numpy() for i in range(0, len(inputs), batch)
    ]
    return volume_score(np.concatenate(scores))


def predict_items(
    model: HySNet, items: Sequence[VolumeItem], config: TrainConfig, device: torch.device, progress: bool = False
) -> np.ndarray:
    seq: Any = items
    if progress:
        from tqdm import tqdm

        seq = tqdm(items, desc="scoring", unit="vol", leave=False)
    return np.array([predict_volume(model, load_volume(config.data.cache_dir, item), config, device) for item in seq])


def training_batch(
    items: Sequence[VolumeItem], indices: Sequence[int], config: TrainConfig, calibration, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (patches or slices) and score targets of one step: ``patches_per_volume`` from each volume."""
    n = config.train.patches_per_volume
    inputs, targets = [], []
    for index in indices:
        item = items[int(index)]
        inputs.append(training_inputs(load_volume(config.data.cache_dir, item), config, n, rng))
        targets.append(np.full(n, target_score(item, calibration), np.float32))
    return np.concatenate(inputs), np.concatenate(targets)


@torch.no_grad()
def recalibrate_batchnorm(
    model: HySNet,
    items: Sequence[VolumeItem],
    config: TrainConfig,
    calibration,
    device: torch.device,
    n_batches: int,
    seed: int,
) -> None:
    """Re-estimate every BatchNorm's running mean/var as the plain average over ``n_batches`` training batches.

    The default exponential average (momentum 0.1) mostly reflects the last ~10 batches; with small batches
    mixing very different scans (full-head vs skull-stripped) that makes eval-mode scores drift from epoch to
    epoch. A cumulative average over many batches (as SWA's ``update_bn`` does) removes that noise.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or not items:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    rng = np.random.default_rng([seed, 4242])
    for _ in range(n_batches):
        picks = rng.integers(0, len(items), size=config.train.volumes_per_step)
        x, _ = training_batch(items, picks, config, calibration, rng)
        model(torch.from_numpy(x).to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def model_meta(config: TrainConfig, calibration, train_items: Sequence[VolumeItem]) -> dict[str, Any]:
    """The checkpoint's ``model_meta``: everything the export writes into the contract besides parity/sha."""
    datasets = sorted({item.dataset for item in train_items})
    subjects = len({item.group for item in train_items})
    names = ", ".join(LICENCES.get(d, d) for d in datasets)
    if config.data.source == "clean":
        label = (
            f"{LABEL_NAME}: mean SSIM (1.5 mm window) inside the head mask between the scan and its clean original on "
            "the scan's own grid, after artifacts simulated at acquisition (noise, shot-to-shot motion, ghosting, "
            "spike, blur, bias field and mixtures); per-kind calibration anchored to physical severities: a scan "
            "to repeat scores 0.3; score 1 = clean"
        )
        training = (
            f"{names}; {subjects} training subjects, re-acquired (trainer.acquisition) with artifacts simulated "
            "on the native grid (trainer.artifacts)"
        )
    else:
        label = f"MRIQC IQM {config.data.target} ({'higher' if config.data.higher_is_better else 'lower'} is better)"
        training = f"{names}; {subjects} training subjects, rated scans from {Path(config.data.table).name}"
    return make_model_meta(
        spacing_mm=tuple(config.data.spacing_mm),
        patch_size=config.data.patch_size,
        patch_step=config.data.patch_step,
        normalisation=NORMALISATION,
        calibration=calibration,
        label=label,
        training_data=training,
    )


def train(config: TrainConfig, config_path: str | None = None) -> Path:
    """Train as ``config`` says; returns the path of ``best.pt``."""
    t = config.train
    seed_everything(t.seed)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = select_device(t.device)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # --- data
    items = build_cache(config.data, progress=t.progress)
    parts = split_items(items, config.data, seed=t.seed)
    if not parts["train"]:
        raise ValueError("no training volumes: check data.roots / data.table and the split")
    calibration = fit_calibration(parts["train"], config.data)
    meta = model_meta(config, calibration, parts["train"])
    (out / "split.json").write_text(
        json.dumps({name: sorted({item.group for item in part}) for name, part in parts.items()}, indent=1)
    )
    val_rng = np.random.default_rng([t.seed, 999_999])
    val_items = [parts["val"][i] for i in val_rng.permutation(len(parts["val"]))]
    val_items = val_items[: t.val_volumes] if t.val_volumes else val_items
    train_config = {**config.to_dict(), "config_path": config_path}

    # --- model, optimiser, resume
    model_config = config.to_model_config()
    model = build_model(model_config, seed=t.seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    start_epoch, best, history = 0, float("inf"), []
    if t.resume and (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt")
        model.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(ckpt.extra["optimizer"])
        start_epoch, best, history = ckpt.extra["epoch"] + 1, ckpt.extra["best"], ckpt.extra["history"]
        print(f"resuming from {out / 'last.pt'} at epoch {start_epoch}", flush=True)
    elif t.init_from:
        init = load_checkpoint(t.init_from)
        if init.model_config != model_config:
            raise ValueError(
                f"train.init_from: {t.init_from} is {init.model_config}, the config asks for {model_config}"
            )
        model.load_state_dict(init.state_dict)
        print(f"initialised from {t.init_from}", flush=True)

    averaged, n_averaged = None, 0
    if t.average_from_epoch:
        averaged = build_model(model_config, seed=t.seed).to(device)
        running = out / "average-running.pt"
        if t.resume and start_epoch and running.exists():
            ckpt = load_checkpoint(running)
            averaged.load_state_dict(ckpt.state_dict)
            n_averaged = int(ckpt.extra["n_averaged"])

    def validate(net: HySNet) -> dict[str, float]:
        if not val_items:
            return {}
        pred = predict_items(net, val_items, config, device)
        target = np.array([target_score(item, calibration) for item in val_items])
        return {"val_l1": float(np.mean(np.abs(pred - target))), "val_srocc": srocc(pred, target), "val_plcc": plcc(pred, target)}

    # --- epochs
    for epoch in range(start_epoch, t.epochs):
        lr = lr_at(epoch, t.lr, t.lr_halve_every)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = np.random.default_rng([t.seed, epoch])
        order = rng.permutation(len(parts["train"]))
        if t.volumes_per_epoch:
            order = np.resize(order, t.volumes_per_epoch)  # repeats the permutation if asked for more
        steps = [order[i : i + t.volumes_per_step] for i in range(0, len(order), t.volumes_per_step)]
        if t.freeze_bn and epoch == start_epoch:  # population statistics to train on
            recalibrate_batchnorm(
                model,
                parts["train"],
                config,
                calibration,
                device,
                t.bn_recalib_batches,
                seed=t.seed + 7919 * (epoch + 1),
            )
        model.train()
        if t.freeze_bn:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        started, losses = time.time(), []
        bar: Any = steps
        if t.progress:
            from tqdm import tqdm

            bar = tqdm(steps, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step")
        for step in bar:
            inputs, targets = training_batch(parts["train"], step, config, calibration, rng)
            x = torch.from_numpy(inputs).to(device)
            y = torch.from_numpy(targets).to(device)
            loss = torch.nn.functional.l1_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
            optimizer.step()
            losses.append(loss.item())
            if t.progress:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.1e}")

        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "steps": len(steps),
            "train_l1": float(np.mean(losses)),
            "train_seconds": round(time.time() - started, 1),
        }
        if t.bn_recalib_batches:
            recalibrate_batchnorm(
                model, parts["train"], config, calibration, device, t.bn_recalib_batches, seed=t.seed + epoch
            )
        record.update(validate(model))
        history.append(record)
        print(json.dumps(record), flush=True)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        score = record.get("val_l1", record["train_l1"] if not val_items else float("inf"))
        improved = score < best or not val_items
        if improved:
            best = score if val_items else best
            save_checkpoint(
                out / "best.pt", model, model_config, train_config, meta, extra={"epoch": epoch, "history": history}
            )
        save_checkpoint(
            out / "last.pt",
            model,
            model_config,
            train_config,
            meta,
            extra={"epoch": epoch, "best": best, "history": history, "optimizer": optimizer.state_dict()},
        )
        if averaged is not None and epoch >= t.average_from_epoch:
            n_averaged += 1
            with torch.no_grad():
                for mine, theirs in zip(averaged.parameters(), model.parameters(), strict=True):
                    mine += (theirs.detach() - mine) / n_averaged
            save_checkpoint(
                out / "average-running.pt", averaged, model_config, train_config, meta, extra={"n_averaged": n_averaged}
            )
    if averaged is None or not n_averaged:
        return out / "best.pt"
    recalibrate_batchnorm(
        averaged, parts["train"], config, calibration, device, t.bn_recalib_batches or 30, seed=t.seed + 104729
    )
    record = {"epoch": "average", "averaged_epochs": n_averaged, "from_epoch": t.average_from_epoch}
    record.update(validate(averaged))
    print(json.dumps(record), flush=True)
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    extra = {"epoch": t.epochs - 1, "averaged_epochs": n_averaged, "history": history + [record]}
    return save_checkpoint(out / "averaged.pt", averaged, model_config, train_config, meta, extra=extra)
