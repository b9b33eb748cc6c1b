"""The trainer's settings: a typed, frozen :class:`TrainConfig` loaded from TOML.

Layout (every key optional; defaults are the paper's recipe where it has one)::

    [model]   depth = 18, spatial = "3d", head = "hyper", width = 16
    [data]    source = "clean" | "table", roots, cache_dir, spacing_mm, patch_size, patch_step, ...
    [train]   epochs = 50, lr = 1e-4, lr_halve_every = 10, patches_per_volume = 9, seed = 0, ...

Unknown sections or keys, wrong types and out-of-range values raise :class:`ConfigError`, one line per problem,
each starting with the key and naming the value (``train.lr = -1.0: input should be greater than 0``); the
strict TOML reading is :mod:`qc_daemon.config_base`, shared with the daemon's settings. Relative paths are
resolved against the current directory by the code that uses them (run the CLI from the repository root).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from qc_daemon.config_base import InvalidValue, Section, read_toml, validate_toml
from qc_daemon.settings import Device


class ConfigError(ValueError):
    """A bad configuration; the message starts with the offending key (``section.key``)."""


class Spatial(enum.StrEnum):
    D3 = "3d"  # 3D patches (B, 1, P, P, P): the daemon's model
    D2 = "2d"  # 2D axial slices (B, 1, H, W): the paper's "non-spatial" ablation

    @property
    def ndim(self) -> int:
        return 3 if self is Spatial.D3 else 2


class Head(enum.StrEnum):
    HYPER = "hyper"  # per-sample FC weights written by the hyper-network
    PLAIN = "plain"  # ordinary nn.Linear layers of the same sizes


class Source(enum.StrEnum):
    CLEAN = "clean"  # folders of clean NIfTI volumes + simulated artifacts (SSIM labels)
    TABLE = "table"  # an MRIQC-style table of rated scans (an IQM column as the label)


class Split(enum.StrEnum):
    HOLDOUT = "holdout"  # random test/val subjects from every root
    CROSS = "cross"  # train on train_roots, test on test_roots (val drawn from the training subjects)


DEPTHS = (18, 34, 50)


def _depth(value: int) -> int:
    if value not in DEPTHS:
        raise ValueError("expected one of " + ", ".join(map(str, DEPTHS)))
    return value


def _artifact_kind(value: str) -> str:
    from trainer.artifacts import KINDS  # numpy/scipy: only when a config names kinds

    if value not in KINDS:
        raise ValueError("expected one of " + ", ".join(map(repr, KINDS)))
    return value


def _max_severity(value: int) -> int:
    from trainer.artifacts import MAX_SEVERITY

    if not 1 <= value <= MAX_SEVERITY:
        raise ValueError(f"expected 1..{MAX_SEVERITY}")
    return value


Positive = Annotated[float, Field(gt=0)]


class ModelSection(Section):
    depth: Annotated[int, AfterValidator(_depth)] = 18
    spatial: Spatial = Spatial.D3
    head: Head = Head.HYPER
    width: int = Field(16, ge=2)


class DataSection(Section):
    source: Source = Source.CLEAN
    roots: tuple[str, ...] = ("../shared/data/t1w/ds000011", "../shared/data/t1w/ds002748")
    cache_dir: str = "runs/cache/default"
    spacing_mm: tuple[Positive, Positive, Positive] = (2.0, 2.0, 2.0)
    patch_size: int = Field(96, ge=8)
    patch_step: int = Field(48, ge=1)  # <= patch_size
    # clean source: artifacts are simulated on each scan's native grid (trainer.artifacts), then the daemon's
    # preprocessing makes the model input. versions_per_subject = 0: 1 clean + every kind at every severity
    # 1..max + mixtures; > 0: that many versions per subject (clean_versions_per_subject clean ones, the kinds in
    # turn at random severities, then mixtures_per_subject mixtures); a dataset with few subjects gets at least
    # min_versions_per_dataset.
    kinds: tuple[Annotated[str, AfterValidator(_artifact_kind)], ...] = Field(
        ("noise", "motion", "ghosting", "spike", "blur", "bias"), min_length=1
    )
    # versions_per_subject > 0: how many turns each kind gets among the single-artifact versions (1 when absent);
    # {ghosting = 3} makes ghosts three times as frequent as each other kind
    kind_weights: dict[Annotated[str, AfterValidator(_artifact_kind)], Annotated[int, Field(ge=1)]] = {}
    max_severity: Annotated[int, AfterValidator(_max_severity)] = 5
    mixtures_per_subject: int = Field(4, ge=0)
    versions_per_subject: int = Field(0, ge=0)
    clean_versions_per_subject: int = Field(2, ge=1)  # each re-acquired differently (versions_per_subject > 0)
    min_versions_per_dataset: int = Field(0, ge=0)
    max_subjects_per_dataset: int = Field(0, ge=0)  # 0 = every subject under each root
    # re-acquire each version of a clean scan first (trainer.acquisition: contrast curve, field of view, thick
    # slices, noise floor); its label is computed against the re-acquired clean scan
    acquisition: bool = False
    # > 0: the re-acquisition puts air of up to this fraction of the head box's extent on each side (most axes)
    # before anything else, so that ghosts can fall outside the head as in a scanner's field of view
    fov_margin: float = Field(0.0, ge=0.0, le=1.0)
    workers: int = Field(1, ge=1)  # processes building the cache
    # splits (by subject), see Split; fractions of the subjects
    split: Split = Split.HOLDOUT
    test_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    train_roots: tuple[str, ...] = ()
    test_roots: tuple[str, ...] = ()
    # label -> score calibration. Clean source: per artifact kind, anchored to physical severities: the median
    # label of severity artifacts.REPEAT_SEVERITY (a scan to repeat) maps to calib_repeat_score, of the severity
    # below it to calib_moderate_score, 1 to 1. Table source: score 1 at the (100 - p)-th and 0 at the p-th
    # percentile (p = calib_low_percentile) of the training labels (reversed when lower is better).
    calib_repeat_score: float = Field(0.3, gt=0.0, lt=1.0)
    # kinds whose curve is anchored on the physical magnitude itself (artifacts.SEVERITY_TABLE), not on the label:
    # for ghosts and spikes the SSIM label depends on where they fall more than on how strong they are
    calib_physical_kinds: tuple[Annotated[str, AfterValidator(_artifact_kind)], ...] = ()
    calib_moderate_score: float = Field(0.65, gt=0.0, lt=1.0)
    calib_low_percentile: float = Field(2.0, ge=0.0, lt=50.0)
    # table source (MRIQC-style TSV/CSV)
    table: str = ""
    bids_root: str = ""
    path_column: str = "path"
    name_column: str = "bids_name"
    subject_column: str = "subject"
    target: str = "snr_total"
    higher_is_better: bool = True
    max_volumes: int = Field(0, ge=0)  # 0 = all; >0 caps the number of volumes (smoke tests)

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        """Checks across keys; each names the key to change."""
        if self.patch_step > self.patch_size:
            raise InvalidValue("patch_step", self.patch_step, f"expected <= data.patch_size ({self.patch_size})")
        if self.calib_repeat_score >= self.calib_moderate_score:
            raise InvalidValue(
                "calib_moderate_score", self.calib_moderate_score, "expected > data.calib_repeat_score"
            )
        for kind in self.kind_weights:
            if kind not in self.kinds:
                raise InvalidValue("kind_weights", kind, f"expected one of data.kinds {list(self.kinds)}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise InvalidValue("val_fraction", self.val_fraction, "expected data.test_fraction + val_fraction < 1")
        if self.split is Split.CROSS:
            for key in ("train_roots", "test_roots"):
                if not getattr(self, key):
                    raise InvalidValue(key, [], 'expected at least one folder when split = "cross"')
        if self.source is Source.TABLE and not self.table:
            raise InvalidValue("table", self.table, 'expected a TSV/CSV file when source = "table"')
        if self.source is Source.CLEAN and not self.roots and self.split is not Split.CROSS:
            raise InvalidValue("roots", [], "expected at least one folder")
        return self


class TrainSection(Section):
    epochs: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_halve_every: int = Field(10, ge=1)
    grad_clip_norm: float = Field(0.0, ge=0)  # 0 = no clipping; else clip the global gradient norm to this
    # >0: before each validation, re-estimate BatchNorm statistics on this many batches
    bn_recalib_batches: int = Field(0, ge=0)
    freeze_bn: bool = False  # train with BatchNorm in eval mode on those statistics (needs bn_recalib_batches > 0)
    patches_per_volume: int = Field(9, ge=1)
    reorient: bool = False  # random axis permutation + flips of every training patch (label-preserving)
    volumes_per_step: int = Field(1, ge=1)
    volumes_per_epoch: int = Field(0, ge=0)  # 0 = every training volume once per epoch
    val_volumes: int = Field(0, ge=0)  # 0 = every validation volume
    seed: int = 0
    device: Device = Device.AUTO
    num_threads: int = Field(0, ge=0)  # 0 = torch's default
    out_dir: str = Field("runs/default", min_length=1)
    resume: bool = True  # continue from out_dir/last.pt when it exists
    init_from: str = ""  # fine-tuning: start from this checkpoint's weights (same model section) instead of random
    # > 0: average the weights of every epoch from this one on (stochastic weight averaging); the average, its
    # BatchNorm statistics re-estimated, is validated and written to averaged.pt, which train() then returns
    average_from_epoch: int = Field(0, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TrainSection:
        if self.freeze_bn and self.bn_recalib_batches == 0:
            raise InvalidValue("freeze_bn", self.freeze_bn, "needs train.bn_recalib_batches > 0")
        return self


class TrainConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (enums as their strings, tuples as lists): what checkpoints store."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return validate_toml(cls, data, ConfigError)

    def to_model_config(self):  # -> trainer.model.ModelConfig (imported lazily: torch)
        from trainer.model import ModelConfig

        m = self.model
        return ModelConfig(depth=m.depth, spatial=m.spatial, head=m.head, width=m.width)


def load_config(path: str | Path) -> TrainConfig:
    """Read and check a TOML file; errors name the key (and the file when it is missing or not TOML)."""
    return TrainConfig.from_dict(read_toml(Path(path), ConfigError))


def replace(config: TrainConfig, **sections: Mapping[str, Any]) -> TrainConfig:
    """A copy with some keys changed, e.g. ``replace(cfg, train={"epochs": 1})``; checked like a file."""
    data = config.to_dict()
    for name, changes in sections.items():
        if name not in data:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(data)})")
        data[name].update(changes)
    return TrainConfig.from_dict(data)
