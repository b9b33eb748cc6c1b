"""ResNet-18/34/50 backbones for 3D patches and 2D slices, in the style of Hara et al. (CVPR 2018).

One implementation, parametrised by the number of spatial dimensions (``ndim`` = 3 or 2): the same code builds
Conv3d/BatchNorm3d/MaxPool3d or Conv2d/BatchNorm2d/MaxPool2d, so the 2D ("non-spatial") ablation uses the 2D
ResNet of the same depth. torchvision is not needed.

Layout (as Hara et al., with an isotropic stem because MRI patches have no time axis)::

    conv1 7^n stride 2, BN, ReLU -> maxpool 3^n stride 2
    -> stage1 (width,   stride 1) -> stage2 (2*width, stride 2)
    -> stage3 (4*width, stride 2) -> stage4 (8*width, stride 2)

Blocks: BasicBlock (two 3^n convs) for depths 18/34, Bottleneck (1-3-1, expansion 4) for depth 50. Shortcuts are
identity where shapes match and a strided 1^n conv + BN otherwise (Hara's shortcut "B"). ``width`` is the base
channel count: 64 is the paper's ResNet, smaller values give CPU-sized models. The backbone returns the last
feature map, (B, 8*width*expansion, *S/32); pooling and the quality head live in :mod:`trainer.model`.

Init: Kaiming-normal (fan_out, ReLU) for convolutions, BN weight 1 and bias 0, as in Hara et al.
"""

from __future__ import annotations

from torch import Tensor, nn

# depth -> (block kind, blocks per stage)
STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


def _layers(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if ndim == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")


class BasicBlock(nn.Module):
    """Two 3^n convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, ndim: int, in_ch: int, ch: int, stride: int) -> None:
        super().__init__()
        conv, norm, _ = _layers(ndim)
        self.conv1 = conv(in_ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(ch)
        self.conv2 = conv(ch, ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(ndim, in_ch, ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1^n reduce, 3^n (strided) and 1^n expand convolutions with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, ndim: int, in_ch: int, ch: int, stride: int) -> None:
        super().__init__()
        conv, norm, _ = _layers(ndim)
        out_ch = ch * self.expansion
        self.conv1 = conv(in_ch, ch, 1, bias=False)
        self.bn1 = norm(ch)
        self.conv2 = conv(ch, ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(ch)
        self.conv3 = conv(ch, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(ndim, in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(ndim: int, in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    conv, norm, _ = _layers(ndim)
    return nn.Sequential(conv(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))


class ResNet(nn.Module):
    """ResNet backbone without pooling or classifier: ``forward`` returns the stage-4 feature map.

    Input (B, in_channels, *S) with len(S) == ndim; output (B, out_channels, *S'), S' = S / 32 (rounded up).
    """

    def __init__(self, depth: int, ndim: int = 3, width: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"depth must be one of {sorted(STAGES)}, got {depth!r}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width!r}")
        kind, blocks = STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        conv, norm, pool = _layers(ndim)
        self.depth, self.ndim, self.width = depth, ndim, width

        self.conv1 = conv(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = pool(kernel_size=3, stride=2, padding=1)

        in_ch = width
        stages = []
        for i, n_blocks in enumerate(blocks):
            ch = width * 2**i
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n_blocks):
                layers.append(block(ndim, in_ch, ch, stride if j == 0 else 1))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_ch

        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm3d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, width, *S/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (B, out_channels, *S/32)
