"""trainer.config: TOML loading; unknown keys and bad values fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

from trainer.config import ConfigError, Device, Head, Source, Spatial, Split, TrainConfig, load_config, replace

CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "configs"


def test_shipped_configs_load():
    for path in sorted(CONFIGS.glob("*.toml")):
        config = load_config(path)
        assert isinstance(config, TrainConfig)
    default = load_config(CONFIGS / "default.toml")
    assert default.model.depth == 18 and default.data.patch_size == 96
    assert default.to_model_config().architecture == "hysnet-r18-3d-hyper"


def test_paper_config_is_the_paper_recipe_on_the_default_data():
    paper, default = load_config(CONFIGS / "paper.toml"), load_config(CONFIGS / "default.toml")
    t = paper.train
    assert (t.epochs, t.lr, t.lr_halve_every, t.patches_per_volume, t.volumes_per_step) == (50, 1e-4, 10, 9, 1)
    assert t.volumes_per_epoch == 0 and paper.model.width == 64 and paper.data.patch_step == 48
    assert paper.data == default.data  # same cache, split and labels: the paper's budget is the only difference
    assert load_config(CONFIGS / "ablation-cpu.toml").data == default.data


def test_defaults_and_round_trip():
    config = TrainConfig()
    assert config.train.lr == 1e-4 and config.train.epochs == 50 and config.train.patches_per_volume == 9
    assert TrainConfig.from_dict(config.to_dict()) == config
    changed = replace(config, train={"epochs": 3})
    assert changed.train.epochs == 3 and config.train.epochs == 50


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[train]\nlrr = 1e-4\n", "train.lrr"),
        ("[train]\nlr = -1.0\n", "train.lr"),
        ("[train]\nepochs = 2.5\n", "train.epochs"),
        ('[model]\nwidth = "wide"\n', "model.width"),
        ("[model]\ndepth = 19\n", "model.depth"),
        ("[data]\nspacing_mm = [2.0, 2.0]\n", "data.spacing_mm"),
        ('[data]\nkinds = ["noise", "zipper"]\n', "data.kinds"),
        ('[data]\nsplit = "cross"\n', "data.train_roots"),
        ('[data]\nsource = "table"\n', "data.table"),
        ("[optimizer]\nlr = 1\n", "optimizer"),
        ("[train]\nprogress = 1\n", "train.progress"),
    ],
)
def test_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(key), str(info.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(path)


def test_config_is_frozen():
    config = TrainConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.train.lr = 1.0  # type: ignore[misc]


def test_modes_are_enums_and_checkpoint_dict_is_plain_json():
    config = TrainConfig.from_dict(
        {"model": {"spatial": "2d", "head": "plain"}, "data": {"split": "cross", "train_roots": ["a"],
                                                              "test_roots": ["b"]}, "train": {"device": "cpu"}}
    )
    assert (config.model.spatial, config.model.head) == (Spatial.D2, Head.PLAIN)
    assert (config.data.source, config.data.split, config.train.device) == (Source.CLEAN, Split.CROSS, Device.CPU)
    assert config.data.train_roots == ("a",)
    stored = json.loads(json.dumps(config.to_dict()))  # what a checkpoint holds
    assert stored["model"]["spatial"] == "2d" and stored["data"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert TrainConfig.from_dict(stored) == config


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"head": "hyperr"}}, "model.head = 'hyperr': expected one of 'hyper', 'plain'"),
        ({"data": {"source": "tables"}}, "data.source = 'tables': expected one of 'clean', 'table'"),
        ({"train": {"device": "gpu"}}, "train.device = 'gpu': expected one of 'auto', 'cpu', 'cuda'"),
        ({"data": {"patch_size": 32, "patch_step": 48}}, "data.patch_step = 48: expected <= data.patch_size (32)"),
        ({"train": {"freeze_bn": True}}, "train.freeze_bn = True: needs train.bn_recalib_batches > 0"),
    ],
)
def test_errors_name_the_value_and_the_choices(raw, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(raw)
    assert str(info.value) == message
