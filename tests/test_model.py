"""HyS-net model, config and checkpoint tests (tiny widths and patches, a few seconds in all)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qc_daemon.model_contract import Normalisation, ScoreCalibration  # noqa: E402
from trainer.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    make_model_meta,
    model_from_checkpoint,
    save_checkpoint,
)
from trainer.model import (  # noqa: E402
    HyperBranch,
    Head,
    ModelConfig,
    Spatial,
    build_model,
    count_parameters,
    target_layer_sizes,
    volume_to_slices,
)

pytestmark = pytest.mark.torch

PATCH = 32
SLICE = 64


def _inputs(spatial: Spatial, batch: int, seed: int = 0) -> torch.Tensor:
    """Samples that differ in content: uniform noise, a smooth ramp, a dark blob, ..."""
    gen = torch.Generator().manual_seed(seed)
    shape = (PATCH,) * 3 if spatial is Spatial.D3 else (SLICE,) * 2
    out = []
    for i in range(batch):
        if i % 3 == 0:
            x = torch.rand(shape, generator=gen)
        elif i % 3 == 1:
            x = torch.linspace(0.0, 1.0, shape[0]).reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        else:
            x = 0.2 * torch.rand(shape, generator=gen)
            x[(slice(4, 12),) * len(shape)] = 1.0
        out.append(x.clamp(1e-3, 1.0))
    return torch.stack(out).unsqueeze(1)  # (B, 1, *S)


@pytest.mark.parametrize("depth", [18, 34, 50])
@pytest.mark.parametrize("spatial", list(Spatial))
@pytest.mark.parametrize("head", list(Head))
def test_forward_shape_every_variant(depth: int, spatial: Spatial, head: Head) -> None:
    config = ModelConfig(depth=depth, spatial=spatial, head=head, width=2)
    model = build_model(config, seed=0).eval()
    x = _inputs(spatial, 2)
    with torch.no_grad():
        score = model(x)
    assert score.shape == (2,)
    assert score.dtype == torch.float32
    assert torch.all((score > 0) & (score < 1))
    # train mode too (BatchNorm with batch statistics), and gradients reach the first convolution
    model.train()
    model(x).sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [16, 40, 64])
def test_any_cubic_patch_size(size: int) -> None:
    model = build_model(ModelConfig(width=2), seed=0).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, size, size, size)).shape == (1,)


def test_rejects_wrong_input_rank() -> None:
    model = build_model(ModelConfig(width=2)).eval()
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(2, 2, 32, 32, 32\)"):
        model(torch.rand(2, 2, 32, 32, 32))


@pytest.mark.parametrize("spatial", list(Spatial))
def test_generated_weights_shapes_and_per_sample(spatial: Spatial) -> None:
    model = build_model(ModelConfig(spatial=spatial, width=4), seed=1).eval()
    x = _inputs(spatial, 3)
    with torch.no_grad():
        gen = model.generated_weights(x)
        gen_single = model.generated_weights(x[1:2])
    c, h1, h2, out = model.layer_sizes
    assert (c, h1, h2, out) == target_layer_sizes(4 * 8)
    expected = {
        "fc1.weight": (3, c, h1),
        "fc1.bias": (3, h1),
        "fc2.weight": (3, h1, h2),
        "fc2.bias": (3, h2),
        "fc3.weight": (3, h2, out),
        "fc3.bias": (3, out),
    }
    assert {k: tuple(v.shape) for k, v in gen.items()} == expected
    for name in ("fc1.weight", "fc2.weight", "fc3.weight", "fc1.bias"):
        w = gen[name]
        # content-adaptive: every pair of samples gets different parameters
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert (w[i] - w[j]).abs().max() > 1e-5, (name, i, j)
        # ... which depend on that sample only (eval mode)
        torch.testing.assert_close(gen_single[name][0], w[1], rtol=1e-4, atol=1e-6)


def test_forward_uses_the_generated_weights() -> None:
    model = build_model(ModelConfig(width=4), seed=2).eval()
    x = _inputs(Spatial.D3, 3)
    with torch.no_grad():
        gen = model.generated_weights(x)
        h = model.backbone(x).mean(dim=(2, 3, 4))  # (B, C)
        for k in (1, 2, 3):
            h = torch.einsum("bi,bio->bo", h, gen[f"fc{k}.weight"]) + gen[f"fc{k}.bias"]
            if k < 3:
                h = torch.relu(h)
        manual = torch.sigmoid(h)[:, 0]
        torch.testing.assert_close(model(x), manual, rtol=1e-5, atol=1e-6)
        # perturbing one generator changes the output: the head really is written by the hyper-network
        model.head.hyper2.fc.bias.add_(0.5)
        assert (model(x) - manual).abs().max() > 1e-4


def test_plain_head_has_no_per_sample_parameters() -> None:
    plain = build_model(ModelConfig(head=Head.PLAIN, width=4), seed=0).eval()
    hyper = build_model(ModelConfig(head=Head.HYPER, width=4), seed=0)
    assert not any(isinstance(m, HyperBranch) for m in plain.modules())
    linears = [plain.head.fc1, plain.head.fc2, plain.head.fc3]
    assert all(isinstance(m, torch.nn.Linear) for m in linears)
    sizes = plain.layer_sizes
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(sizes[:-1], sizes[1:], strict=True))
    assert plain.layer_sizes == hyper.layer_sizes
    head_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert count_parameters(plain.head) == head_params
    assert count_parameters(hyper.head) > head_params
    with pytest.raises(TypeError, match="plain head"):
        plain.generated_weights(torch.rand(1, 1, PATCH, PATCH, PATCH))


def test_default_width16_r18_stays_small() -> None:
    model = build_model(ModelConfig())  # R18 3D hyper, width 16
    assert count_parameters(model) < 4_000_000
    assert model.layer_sizes == (128, 64, 32, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"depth": 20}, ValueError, "20"),
        ({"depth": True}, ValueError, "True"),
        ({"width": 1}, ValueError, "1"),
        ({"width": 8.0}, ValueError, "8.0"),
        ({"spatial": "3d"}, TypeError, "'3d'"),
        ({"head": "hyper"}, TypeError, "'hyper'"),
    ],
)
def test_config_validation_names_bad_value(kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error) as info:
        ModelConfig(**kwargs)
    field = next(iter(kwargs))
    assert needle in str(info.value)
    assert field in str(info.value)


def test_config_dict_round_trip_and_architecture() -> None:
    config = ModelConfig(depth=50, spatial=Spatial.D2, head=Head.PLAIN, width=4)
    assert config.architecture == "hysnet-r50-2d-plain"
    assert ModelConfig().architecture == "hysnet-r18-3d-hyper"
    data = config.to_dict()
    assert data == {"depth": 50, "spatial": "2d", "head": "plain", "width": 4}
    assert ModelConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="'4d'"):
        ModelConfig.from_dict({**data, "spatial": "4d"})
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.width = 8  # type: ignore[misc]


def test_build_model_seed_is_reproducible_and_leaves_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(ModelConfig(width=2), seed=7)
    after = torch.rand(1)
    b = build_model(ModelConfig(width=2), seed=7)
    assert torch.equal(before, after)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_volume_to_slices_pads_and_crops() -> None:
    vol = np.random.default_rng(0).random((400, 10, 7)).astype(np.float32) + 0.5
    slices = volume_to_slices(vol, size=384)
    assert isinstance(slices, np.ndarray) and slices.shape == (7, 1, 384, 384) and slices.dtype == np.float32
    # axis 0 (400) is centre-cropped by 8, axis 1 (10) centre-padded by 187 with the volume minimum
    np.testing.assert_array_equal(slices[3, 0, :, 187:197], vol[8:392, :, 3])
    assert np.all(slices[:, 0, :, :187] == vol.min())
    assert np.all(slices[:, 0, :, 197:] == vol.min())
    as_tensor = volume_to_slices(torch.from_numpy(vol), size=384, fill=0.0)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (7, 1, 384, 384)
    assert float(as_tensor[0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        volume_to_slices(np.zeros((4, 4)))


def test_2d_model_scores_slices_of_a_volume() -> None:
    model = build_model(ModelConfig(spatial=Spatial.D2, width=2), seed=0).eval()
    vol = np.random.default_rng(1).random((50, 60, 5)).astype(np.float32)
    with torch.no_grad():
        scores = model(torch.from_numpy(volume_to_slices(vol, size=SLICE)))
    assert scores.shape == (5,)
    assert 0.0 < float(scores.mean()) < 1.0


def _meta(**overrides: object) -> dict:
    meta = make_model_meta(
        spacing_mm=(2.0, 2.0, 2.0),
        patch_size=PATCH,
        patch_step=16,
        normalisation=Normalisation(),
        calibration=ScoreCalibration("ssim", 0.5, 1.0),
        label="ssim to the clean image",
        training_data="synthetic test data",
    )
    meta.update(overrides)
    return meta


def test_checkpoint_round_trip_reproduces_outputs(tmp_path) -> None:
    config = ModelConfig(width=4)
    model = build_model(config, seed=3)
    # move BatchNorm running statistics away from their init so they must be saved
    model.train()
    with torch.no_grad():
        model(_inputs(Spatial.D3, 3, seed=9))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)  # one step, so its state is non-trivial
    model(_inputs(Spatial.D3, 2)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()
    x = _inputs(Spatial.D3, 3)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "sub" / "ckpt.pt"
    extra = {"epoch": 2, "val_srcc": np.float64(0.8), "optimizer": optimizer.state_dict()}
    save_checkpoint(path, model, config, {"lr": 1e-4, "epochs": 2}, _meta(), extra=extra)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == config
    assert ckpt.train_config == {"lr": 1e-4, "epochs": 2}
    assert ckpt.model_meta == _meta()
    assert ckpt.extra["epoch"] == 2 and type(ckpt.extra["val_srcc"]) is float and ckpt.extra["val_srcc"] == 0.8
    torch.optim.Adam(model.parameters(), lr=1e-4).load_state_dict(ckpt.extra["optimizer"])
    restored = model_from_checkpoint(ckpt)
    assert not restored.training
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_checkpoint_rejects_bad_meta_and_mismatched_config(tmp_path) -> None:
    config = ModelConfig(width=2)
    model = build_model(config)
    with pytest.raises(CheckpointError, match="spacing_mm"):
        save_checkpoint(tmp_path / "a.pt", model, config, {}, _meta(spacing_mm=[2.0, 2.0]))
    with pytest.raises(CheckpointError, match="patch_step"):
        save_checkpoint(tmp_path / "a.pt", model, config, {}, _meta(patch_step=0))
    with pytest.raises(CheckpointError, match="calibration"):
        save_checkpoint(tmp_path / "a.pt", model, config, {}, _meta(calibration={"label_name": "x"}))
    meta = _meta()
    del meta["label"]
    with pytest.raises(CheckpointError, match="label"):
        save_checkpoint(tmp_path / "a.pt", model, config, {}, meta)
    with pytest.raises(CheckpointError, match="width=4"):
        save_checkpoint(tmp_path / "a.pt", model, ModelConfig(width=4), {}, _meta())
    with pytest.raises(CheckpointError, match=r"extra\['where'\] is a PosixPath"):
        save_checkpoint(tmp_path / "a.pt", model, config, {}, _meta(), extra={"where": tmp_path})
    assert not list(tmp_path.iterdir())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
