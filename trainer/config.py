"""The trainer's settings: a typed, frozen :class:`TrainConfig` loaded from TOML.

Layout (every key optional; defaults are the paper's recipe where it has one)::

    [model]   depth = 18, spatial = "3d", head = "hyper", width = 16
    [data]    source = "clean" | "table", roots, cache_dir, spacing_mm, patch_size, patch_step, ...
    [train]   epochs = 50, lr = 1e-4, lr_halve_every = 10, patches_per_volume = 9, seed = 0, ...

Unknown sections or keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key
(e.g. ``train.lr: must be > 0, got -1.0``). Relative paths are resolved against the current directory by the
code that uses them (run the CLI from the repository root).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad configuration; the message starts with the offending key (``section.key``)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    depth: int = 18
    spatial: str = "3d"
    head: str = "hyper"
    width: int = 16


@dataclasses.dataclass(frozen=True)
class DataSection:
    # "clean": folders of clean NIfTI volumes + simulated artifacts; "table": an MRIQC-style table of rated scans
    source: str = "clean"
    roots: tuple[str, ...] = ("../shared/data/t1w/ds000011", "../shared/data/t1w/ds002748")
    cache_dir: str = "runs/cache/default"
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    patch_size: int = 96
    patch_step: int = 48
    # clean source: artifacts are simulated on each scan's native grid (trainer.artifacts), then the daemon's
    # preprocessing makes the model input. versions_per_subject = 0: 1 clean + every kind at every severity
    # 1..max + mixtures; > 0: that many versions per subject (2 clean, the kinds in turn at random severities,
    # then mixtures_per_subject mixtures); a dataset with few subjects gets at least min_versions_per_dataset.
    kinds: tuple[str, ...] = ("noise", "motion", "ghosting", "spike", "blur", "bias")
    max_severity: int = 5
    mixtures_per_subject: int = 4
    versions_per_subject: int = 0
    min_versions_per_dataset: int = 0
    max_subjects_per_dataset: int = 0  # 0 = every subject under each root
    # re-acquire each version of a clean scan first (trainer.acquisition: contrast curve, field of view, thick
    # slices, noise floor); its label is computed against the re-acquired clean scan
    acquisition: bool = False
    workers: int = 1  # processes building the cache
    # splits (by subject): "holdout" = random test/val subjects from every root; "cross" = train on
    # train_roots, test on test_roots (val drawn from the training subjects)
    split: str = "holdout"
    test_fraction: float = 0.25
    val_fraction: float = 0.15
    train_roots: tuple[str, ...] = ()
    test_roots: tuple[str, ...] = ()
    # label -> score calibration. Clean source: per artifact kind, anchored to physical severities: the median
    # label of severity artifacts.REPEAT_SEVERITY (a scan to repeat) maps to calib_repeat_score, of the severity
    # below it to calib_moderate_score, 1 to 1. Table source: score 1 at the (100 - p)-th and 0 at the p-th
    # percentile (p = calib_low_percentile) of the training labels (reversed when lower is better).
    calib_repeat_score: float = 0.3
    calib_moderate_score: float = 0.65
    calib_low_percentile: float = 2.0
    # table source (MRIQC-style TSV/CSV)
    table: str = ""
    bids_root: str = ""
    path_column: str = "path"
    name_column: str = "bids_name"
    subject_column: str = "subject"
    target: str = "snr_total"
    higher_is_better: bool = True
    max_volumes: int = 0  # 0 = all; >0 caps the number of volumes (smoke tests)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: int = 50
    lr: float = 1e-4
    lr_halve_every: int = 10
    grad_clip_norm: float = 0.0  # 0 = no clipping; else clip the global gradient norm to this
    bn_recalib_batches: int = 0  # >0: before each validation, re-estimate BatchNorm statistics on this many batches
    freeze_bn: bool = False  # train with BatchNorm in eval mode on those statistics (needs bn_recalib_batches > 0)
    patches_per_volume: int = 9
    reorient: bool = False  # random axis permutation + flips of every training patch (label-preserving)
    volumes_per_step: int = 1
    volumes_per_epoch: int = 0  # 0 = every training volume once per epoch
    val_volumes: int = 0  # 0 = every validation volume
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda"
    num_threads: int = 0  # 0 = torch's default
    out_dir: str = "runs/default"
    resume: bool = True  # continue from out_dir/last.pt when it exists
    init_from: str = ""  # fine-tuning: start from this checkpoint's weights (same model section) instead of random
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(dataclasses.asdict(getattr(self, name))) for name in ("model", "data", "train")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sections)})")
        built = {}
        for name in sections:
            raw = data.get(name, {})
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{name}: must be a table, got {raw!r}")
            built[name] = _build_section(name, hints[name], raw)
        config = cls(**built)
        _validate(config)
        return config

    def model_config(self):  # -> trainer.model.ModelConfig (imported lazily: torch)
        from trainer.model import ModelConfig

        try:
            return ModelConfig.from_dict(dataclasses.asdict(self.model))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model: {exc}") from exc


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a TOML file; errors name the key (and the file for TOML syntax errors)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return TrainConfig.from_dict(data)


def replace(config: TrainConfig, **sections: Mapping[str, Any]) -> TrainConfig:
    """A copy with some keys changed, e.g. ``replace(cfg, train={"epochs": 1})``; checked like a file."""
    data = config.to_dict()
    for name, changes in sections.items():
        if name not in data:
            raise ConfigError(f"{name}: unknown section")
        data[name].update(changes)
    return TrainConfig.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build_section(name: str, section_cls: type, raw: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    hints = typing.get_type_hints(section_cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    kwargs = {key: _coerce(f"{name}.{key}", hints[key], value) for key, value in raw.items()}
    return section_cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: must have {len(args)} items, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if isinstance(hint, types.UnionType):  # pragma: no cover - no unions in use
        raise ConfigError(f"{key}: unsupported type {hint}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


def _validate(config: TrainConfig) -> None:
    from trainer.artifacts import KINDS, MAX_SEVERITY  # numpy/torchio only

    m, d, t = config.model, config.data, config.train
    _check(m.depth in (18, 34, 50), "model.depth", "must be 18, 34 or 50", m.depth)
    _check(m.spatial in ("3d", "2d"), "model.spatial", 'must be "3d" or "2d"', m.spatial)
    _check(m.head in ("hyper", "plain"), "model.head", 'must be "hyper" or "plain"', m.head)
    _check(m.width >= 2, "model.width", "must be >= 2", m.width)
    _check(d.source in ("clean", "table"), "data.source", 'must be "clean" or "table"', d.source)
    _check(all(s > 0 for s in d.spacing_mm), "data.spacing_mm", "must be three positive numbers", d.spacing_mm)
    _check(d.patch_size >= 8, "data.patch_size", "must be >= 8", d.patch_size)
    _check(0 < d.patch_step <= d.patch_size, "data.patch_step", "must be in 1..patch_size", d.patch_step)
    bad = [k for k in d.kinds if k not in KINDS]
    _check(not bad and len(d.kinds) > 0, "data.kinds", f"must be a non-empty list of {KINDS}", d.kinds)
    _check(1 <= d.max_severity <= MAX_SEVERITY, "data.max_severity", f"must be in 1..{MAX_SEVERITY}", d.max_severity)
    _check(d.mixtures_per_subject >= 0, "data.mixtures_per_subject", "must be >= 0", d.mixtures_per_subject)
    _check(d.versions_per_subject >= 0, "data.versions_per_subject", "must be >= 0", d.versions_per_subject)
    _check(d.min_versions_per_dataset >= 0, "data.min_versions_per_dataset", "must be >= 0", d.min_versions_per_dataset)
    _check(d.max_subjects_per_dataset >= 0, "data.max_subjects_per_dataset", "must be >= 0", d.max_subjects_per_dataset)
    _check(d.workers >= 1, "data.workers", "must be >= 1", d.workers)
    _check(
        0.0 < d.calib_repeat_score < d.calib_moderate_score < 1.0,
        "data.calib_moderate_score",
        "must satisfy 0 < calib_repeat_score < calib_moderate_score < 1",
        d.calib_moderate_score,
    )
    _check(d.split in ("holdout", "cross"), "data.split", 'must be "holdout" or "cross"', d.split)
    _check(0.0 <= d.test_fraction < 1.0, "data.test_fraction", "must be in [0, 1)", d.test_fraction)
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)", d.val_fraction)
    _check(
        d.test_fraction + d.val_fraction < 1.0,
        "data.val_fraction",
        "test_fraction + val_fraction must be < 1",
        d.val_fraction,
    )
    if d.split == "cross":
        _check(len(d.train_roots) > 0, "data.train_roots", 'must be set when split = "cross"', d.train_roots)
        _check(len(d.test_roots) > 0, "data.test_roots", 'must be set when split = "cross"', d.test_roots)
    _check(
        0.0 <= d.calib_low_percentile < 50.0, "data.calib_low_percentile", "must be in [0, 50)", d.calib_low_percentile
    )
    if d.source == "table":
        _check(bool(d.table), "data.table", 'must name a TSV/CSV file when source = "table"', d.table)
    else:
        _check(len(d.roots) > 0 or d.split == "cross", "data.roots", "must list at least one folder", d.roots)
    _check(d.max_volumes >= 0, "data.max_volumes", "must be >= 0", d.max_volumes)
    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _check(t.lr_halve_every >= 1, "train.lr_halve_every", "must be >= 1", t.lr_halve_every)
    _check(t.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0", t.grad_clip_norm)
    _check(t.bn_recalib_batches >= 0, "train.bn_recalib_batches", "must be >= 0", t.bn_recalib_batches)
    _check(
        not t.freeze_bn or t.bn_recalib_batches > 0,
        "train.freeze_bn",
        "needs train.bn_recalib_batches > 0",
        t.freeze_bn,
    )
    _check(t.patches_per_volume >= 1, "train.patches_per_volume", "must be >= 1", t.patches_per_volume)
    _check(t.volumes_per_step >= 1, "train.volumes_per_step", "must be >= 1", t.volumes_per_step)
    _check(t.volumes_per_epoch >= 0, "train.volumes_per_epoch", "must be >= 0", t.volumes_per_epoch)
    _check(t.val_volumes >= 0, "train.val_volumes", "must be >= 0", t.val_volumes)
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", 'must be "auto", "cpu" or "cuda"', t.device)
    _check(t.num_threads >= 0, "train.num_threads", "must be >= 0", t.num_threads)
    _check(bool(t.out_dir), "train.out_dir", "must be a folder", t.out_dir)
