"""HyS-net: a ResNet backbone with a content-adaptive hyper-network that writes the quality head's weights.

Data flow (S = spatial dims: (D, H, W) for 3D patches, (H, W) for 2D slices)::

    x (B, 1, *S) -> ResNet -> fmap (B, C, *S/32)
        predictor input  v = global AVERAGE pool of fmap                       (B, C)
        hyper branch k   W_k, b_k = FC_k(global MAX pool(conv1x1 -> ReLU -> conv1x1 (fmap)))
        quality          score = sigmoid(fc3(relu(fc2(relu(fc1(v))))))          (B,)
                         where fc_k(h) = h @ W_k + b_k with per-sample W_k (B, in, out), b_k (B, out)

The "plain" head (baseline rows of the paper's Table 1) uses ordinary nn.Linear layers of the same sizes.
The 2D variant ("non-spatial" ablation) uses the 2D ResNet of the same depth on axial slices padded to 384x384
(:func:`volume_to_slices`); the caller averages slice scores per volume.

Choices the paper leaves open (written down here so they are not guessed elsewhere):

* Target (quality predictor) layer sizes: C -> h1 -> h2 -> 1 with h1 = clamp(C // 2, 8, 64) and
  h2 = clamp(C // 4, 4, 32) (C = backbone channels: 8*width, or 32*width for ResNet-50). For R18 at width 16
  that is 128 -> 64 -> 32 -> 1; at the paper width 512 -> 64 -> 32 -> 1. The caps keep the generating FC
  layers (C*h1 + h1 outputs each) small: R18 width 16 has ~2.4M parameters in all.
* Hyper branches: conv1x1 C -> c_h, ReLU, conv1x1 c_h -> c_h (with bias), global max pool, FC c_h -> in*out + out,
  with c_h = clamp(C // 4, 8, 32). The FC output is split into the weight matrix (first in*out values,
  reshaped row-major to (in, out)) and the bias (last out values). The three branches share nothing.
* Activations: ReLU between target layers (none after the last); output sigmoid, so the score is in (0, 1):
  training labels are mapped to [0, 1] by ``ScoreCalibration`` (1 = best) and the daemon's contract wants a
  score on that scale.
* Init: backbone as Hara et al. (Kaiming-normal fan_out, BN 1/0). Generating FC layers: weights
  N(0, 1 / (c_h * in)) and zero bias, so a generated weight has variance ~E[g^2]/in at the start
  (fan-in scaled, like a default nn.Linear) whatever the width; hyper 1x1 convs and plain nn.Linear keep
  PyTorch's default init.
* Input size: any patch (3D) or slice (2D) size; the network downsamples by 32 (stride-2 stem, max pool and
  three strided stages), smaller inputs still work because every stride-2 layer is padded. The export fixes
  96^3 by default (the paper's patch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import Head, Spatial
from trainer.resnet import STAGES, ResNet


DEPTHS = tuple(sorted(STAGES))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What ``build_model`` needs; ``to_dict``/``from_dict`` give its JSON form for checkpoints."""

    depth: int = 18
    spatial: Spatial = Spatial.D3
    head: Head = Head.HYPER
    width: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.depth, bool) or self.depth not in DEPTHS:
            raise ValueError(f"ModelConfig.depth must be one of {DEPTHS}, got {self.depth!r}")
        if not isinstance(self.spatial, Spatial):
            raise TypeError(f"ModelConfig.spatial must be a Spatial, got {self.spatial!r} (use Spatial(...))")
        if not isinstance(self.head, Head):
            raise TypeError(f"ModelConfig.head must be a Head, got {self.head!r} (use Head(...))")
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 2:
            raise ValueError(f"ModelConfig.width must be an integer >= 2, got {self.width!r}")

    @property
    def architecture(self) -> str:
        """The contract's ``qc.architecture`` string, e.g. ``"hysnet-r18-3d-hyper"``."""
        return f"hysnet-r{self.depth}-{self.spatial.value}-{self.head.value}"

    def to_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "spatial": self.spatial.value, "head": self.head.value, "width": self.width}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}")
        kwargs = dict(data)
        for key, enum_cls in (("spatial", Spatial), ("head", Head)):
            if key in kwargs:
                try:
                    kwargs[key] = enum_cls(kwargs[key])
                except ValueError:
                    choices = [e.value for e in enum_cls]
                    raise ValueError(f"ModelConfig.{key} must be one of {choices}, got {kwargs[key]!r}") from None
        return cls(**kwargs)


def target_layer_sizes(feat_channels: int) -> tuple[int, int, int, int]:
    """Sizes (in, h1, h2, out) of the three quality-predictor layers for a backbone with ``feat_channels``."""
    h1 = min(64, max(8, feat_channels // 2))
    h2 = min(32, max(4, feat_channels // 4))
    return feat_channels, h1, h2, 1


def hyper_channels(feat_channels: int) -> int:
    """Channels of the hyper branches' 1x1 convolutions."""
    return min(32, max(8, feat_channels // 4))


def _spatial_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(2, 2 + ndim))


class HyperBranch(nn.Module):
    """Writes one target layer's per-sample weight (B, in, out) and bias (B, out) from the feature map."""

    def __init__(self, ndim: int, feat_channels: int, channels: int, in_features: int, out_features: int) -> None:
        super().__init__()
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        self.ndim, self.in_features, self.out_features = ndim, in_features, out_features
        self.conv = nn.Sequential(conv(feat_channels, channels, 1), nn.ReLU(inplace=True), conv(channels, channels, 1))
        self.fc = nn.Linear(channels, in_features * out_features + out_features)
        nn.init.normal_(self.fc.weight, std=(channels * in_features) ** -0.5)
        nn.init.zeros_(self.fc.bias)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(fmap)  # (B, c_h, *S)
        h = h.amax(dim=_spatial_dims(self.ndim))  # (B, c_h): global max pool
        params = self.fc(h)  # (B, in*out + out)
        n_weight = self.in_features * self.out_features
        weight = params[:, :n_weight].reshape(-1, self.in_features, self.out_features)  # (B, in, out)
        bias = params[:, n_weight:]  # (B, out)
        return weight, bias


class PerSampleLinear(nn.Module):
    """h @ W + b with a different W, b for every sample: a batched MatMul whose weight is a computed tensor."""

    def forward(self, h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        out = torch.bmm(h.unsqueeze(1), weight)  # (B, 1, in) x (B, in, out) -> (B, 1, out)
        return out.flatten(1) + bias  # (B, out)


TARGET_LAYERS = ("fc1", "fc2", "fc3")


class HyperHead(nn.Module):
    def __init__(self, ndim: int, feat_channels: int) -> None:
        super().__init__()
        sizes = target_layer_sizes(feat_channels)
        channels = hyper_channels(feat_channels)
        # hyperK writes the parameters of target layer fcK.
        self.hyper1 = HyperBranch(ndim, feat_channels, channels, sizes[0], sizes[1])
        self.hyper2 = HyperBranch(ndim, feat_channels, channels, sizes[1], sizes[2])
        self.hyper3 = HyperBranch(ndim, feat_channels, channels, sizes[2], sizes[3])
        # Parameter-free modules, so the exported target-layer nodes are named /head/fcK/MatMul.
        self.fc1, self.fc2, self.fc3 = PerSampleLinear(), PerSampleLinear(), PerSampleLinear()

    def generate(self, fmap: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Target layer name -> (weight (B, in, out), bias (B, out))."""
        return {"fc1": self.hyper1(fmap), "fc2": self.hyper2(fmap), "fc3": self.hyper3(fmap)}

    def forward(self, fmap: Tensor, pooled: Tensor) -> Tensor:
        params = self.generate(fmap)
        h = torch.relu(self.fc1(pooled, *params["fc1"]))  # (B, h1)
        h = torch.relu(self.fc2(h, *params["fc2"]))  # (B, h2)
        return self.fc3(h, *params["fc3"])  # (B, 1)


class PlainHead(nn.Module):
    def __init__(self, feat_channels: int) -> None:
        super().__init__()
        sizes = target_layer_sizes(feat_channels)
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, fmap: Tensor, pooled: Tensor) -> Tensor:
        h = torch.relu(self.fc1(pooled))
        h = torch.relu(self.fc2(h))
        return self.fc3(h)  # (B, 1)


class HySNet(nn.Module):
    """forward(x): (B, 1, *S) float32 in (0, 1] -> (B,) quality score in (0, 1), 1 = best."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.ndim = config.spatial.ndim
        self.backbone = ResNet(config.depth, ndim=self.ndim, width=config.width, in_channels=1)
        feat = self.backbone.out_channels
        self.layer_sizes = target_layer_sizes(feat)
        self.head: nn.Module = HyperHead(self.ndim, feat) if config.head is Head.HYPER else PlainHead(feat)

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            if x.dim() != self.ndim + 2 or x.shape[1] != 1:
                want = "(B, 1, D, H, W)" if self.ndim == 3 else "(B, 1, H, W)"
                raise ValueError(f"{self.config.architecture} expects {want}, got {tuple(x.shape)}")
        fmap = self.backbone(x)  # (B, C, *S/32)
        pooled = fmap.mean(dim=_spatial_dims(self.ndim))  # (B, C): global average pool
        return fmap, pooled

    def forward(self, x: Tensor) -> Tensor:
        fmap, pooled = self._features(x)
        return torch.sigmoid(self.head(fmap, pooled)).reshape(-1)  # (B, 1) -> (B,)

    def generated_weights(self, x: Tensor) -> dict[str, Tensor]:
        """Per-sample target-layer parameters for a batch: ``fcK.weight`` (B, in, out), ``fcK.bias`` (B, out).

        These are the tensors the paper's Fig. 3 analyses with PCA. Gradients flow unless the caller wraps
        the call in ``torch.no_grad()``. Raises TypeError for a plain head, which has no per-sample weights.
        """
        if not isinstance(self.head, HyperHead):
            raise TypeError(
                f"{self.config.architecture} has a plain head: its FC weights are ordinary parameters shared by "
                "all samples, not generated per sample"
            )
        fmap, _ = self._features(x)
        out: dict[str, Tensor] = {}
        for name, (weight, bias) in self.head.generate(fmap).items():
            out[f"{name}.weight"] = weight
            out[f"{name}.bias"] = bias
        return out


def build_model(config: ModelConfig, seed: int | None = None) -> HySNet:
    """A freshly initialised HyS-net; ``seed`` makes the init reproducible without touching the global RNG."""
    if seed is None:
        return HySNet(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HySNet(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def volume_to_slices(volume: np.ndarray | Tensor, size: int = 384, fill: float | None = None) -> np.ndarray | Tensor:
    """Axial slices of a (X, Y, Z) RAS volume as (Z, 1, size, size), each centre-padded or centre-cropped.

    Input for the 2D ablation (the paper pads slices to 384x384). ``fill`` defaults to the volume's minimum,
    which after :func:`qc_daemon.preprocess.normalise` is the normalisation floor. Returns the input's type
    (float32 numpy array, or float32 tensor on the input's device).
    """
    is_tensor = isinstance(volume, Tensor)
    arr = volume.detach().cpu().numpy() if is_tensor else np.asarray(volume)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"expected a non-empty 3D (X, Y, Z) volume, got shape {arr.shape}")
    if size < 1:
        raise ValueError(f"slice size must be positive, got {size}")
    value = float(arr.min()) if fill is None else float(fill)
    slices = np.moveaxis(arr.astype(np.float32, copy=False), 2, 0)  # (Z, X, Y)
    out = np.full((slices.shape[0], 1, size, size), value, dtype=np.float32)  # (Z, 1, size, size)
    src, dst = [], []
    for extent in slices.shape[1:]:
        n = min(extent, size)
        s0, d0 = (extent - n) // 2, (size - n) // 2
        src.append(slice(s0, s0 + n))
        dst.append(slice(d0, d0 + n))
    out[:, 0, dst[0], dst[1]] = slices[:, src[0], src[1]]
    if is_tensor:
        return torch.from_numpy(out).to(volume.device)
    return out
