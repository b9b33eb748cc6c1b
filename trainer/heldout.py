"""The held-out test split of a checkpoint: its training config rebuilt, and the test volumes of that config."""

from __future__ import annotations

from typing import Any

from trainer.config import TrainConfig
from trainer.data import VolumeItem, build_cache, split_items


def config_from_checkpoint(train_config: dict[str, Any]) -> TrainConfig:
    data = {k: v for k, v in train_config.items() if k in ("model", "data", "train")}
    return TrainConfig.from_dict(data)


def test_items(config: TrainConfig) -> list[VolumeItem]:
    items = build_cache(config.data)
    return split_items(items, config.data, seed=config.train.seed)["test"]

