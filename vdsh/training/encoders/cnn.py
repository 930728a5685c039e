"""CNN encoders for images (InputSpec(features="image")): normalised (N, C, H, W) in, `bits` real units out.

Three sizes, one pattern: 3x3 convolutions with BatchNorm and ReLU in stages that halve the resolution
and double the channels, global pooling, then the hashing head (one linear layer to `bits` units; the
codes are its signs). All weights start from MSRA (Kaiming fan-out) init, BN from (1, 0).

- `small_cnn`: three conv-BN-ReLU-maxpool stages; the fast default for 28-32 px images.
- `resnet9`: the ResNet-9 of the fast CIFAR-10 trainers (Page 2018, "How to train your ResNet"): prep
  conv, three pooled stages, residual blocks after the first and last, global max pool.
- `dwsep`: depthwise-separable stages (MobileNet v1 style); few multiply-adds, for fast CPU encoding at
  query time.

Every encoder exposes `features(x) -> (N, feature_dim)` (the trunk) and `head` (the hashing layer), so a
trainer can put something else on the trunk (a classifier for the classifier baseline, an MLP), and
`blocks()`, the same network cut into a sequence of stages for the block-wise local trainer (cnn-local).
"""

from __future__ import annotations

import torch
from torch import nn



def conv_bn_relu(c_in: int, c_out: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    """The unit every net here is made of; no conv bias (BN's shift replaces it)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + f(x) with f two conv-BN-ReLU units at the same width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def msra_init(module: nn.Module) -> None:
    """Kaiming init (fan-out for convs, as in ResNet; fan-in, linear gain for the head), BN at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(m.bias)


class ImageEncoder(nn.Module):
    """Shared shape checks, head and config for the CNN encoders; subclasses build `self.trunk`."""

    def __init__(self, in_channels: int, size: int, bits: int, width: int) -> None:
        super().__init__()
        if min(in_channels, size, bits, width) < 1:
            raise ValueError(f"in_channels, size, bits and width must be positive, got {in_channels}, {size}, {bits}, {width}")
        if size < 8:
            raise ValueError(f"CNN encoders pool the image three times: size must be >= 8 px, got {size}")
        self.in_channels, self.size, self.bits, self.width = in_channels, size, bits, width

    def build(self, trunk: nn.Module, feature_dim: int) -> None:
        self.trunk, self.feature_dim = trunk, feature_dim
        self.head = nn.Linear(feature_dim, self.bits)
        msra_init(self)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.size, self.size):
            raise ValueError(
                f"{type(self).__name__} expects (N, {self.in_channels}, {self.size}, {self.size}) images, got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk output (N, feature_dim): everything but the hashing head."""
        self.check_input(x)
        return self.trunk(x)

    def blocks(self) -> nn.Sequential:
        """The encoder as a sequence of stages sharing its modules (a view, not a copy): blocks()(x) == self(x).

        A stage starts at every convolution unit of the trunk (an nn.Sequential: conv-BN-ReLU or a
        depthwise-separable pair); pooling, residual and flatten layers join the stage before them, so
        every stage ends where the resolution or the channel count changes. The hashing head is the last
        stage. small_cnn: 3 conv stages + head; resnet9: 4 + head; dwsep: 5 + head.
        """
        stages: list[list[nn.Module]] = []
        for module in self.trunk:
            if isinstance(module, nn.Sequential) or not stages:
                stages.append([])
            stages[-1].append(module)
        return nn.Sequential(*(nn.Sequential(*stage) for stage in stages), self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "size": self.size, "bits": self.bits, "width": self.width}

    @classmethod
    def from_config(cls, config: dict) -> "ImageEncoder":
        return cls(**config)


class SmallCNN(ImageEncoder):
    """3 stages of conv-BN-ReLU + 2x2 max-pool at width w, 2w, 4w; global average pool; head."""

    kind = "small_cnn"

    def __init__(self, in_channels: int, size: int, bits: int, width: int = 32) -> None:
        super().__init__(in_channels, size, bits, width)
        stages, c_in = [], in_channels
        for c_out in (width, 2 * width, 4 * width):
            stages += [conv_bn_relu(c_in, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        self.build(nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c_in)


class ResNet9(ImageEncoder):
    """Prep conv (w) -> [conv 2w, pool, residual] -> [conv 4w, pool] -> [conv 8w, pool, residual] -> max pool.

    width=64 is the published 6.5 M-parameter network; smaller widths keep it trainable on a CPU.
    """

    kind = "resnet9"

    def __init__(self, in_channels: int, size: int, bits: int, width: int = 64) -> None:
        super().__init__(in_channels, size, bits, width)
        w = width
        trunk = nn.Sequential(
            conv_bn_relu(in_channels, w),
            conv_bn_relu(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn_relu(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.build(trunk, 8 * w)


def depthwise_separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv (per channel, spatial) + 1x1 pointwise conv (across channels): ~1/9 the cost."""
    return nn.Sequential(conv_bn_relu(c_in, c_in, stride=stride, groups=c_in), conv_bn_relu(c_in, c_out, kernel=1))


class DepthwiseSeparableCNN(ImageEncoder):
    """Stem conv (w) then depthwise-separable blocks, stride 2 where the channels double: w -> 2w -> 4w -> 8w."""

    kind = "dwsep"

    def __init__(self, in_channels: int, size: int, bits: int, width: int = 16) -> None:
        super().__init__(in_channels, size, bits, width)
        w = width
        trunk = nn.Sequential(
            conv_bn_relu(in_channels, w),
            depthwise_separable(w, 2 * w, stride=2),
            depthwise_separable(2 * w, 4 * w, stride=2),
            depthwise_separable(4 * w, 4 * w, stride=1),
            depthwise_separable(4 * w, 8 * w, stride=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.build(trunk, 8 * w)


CNN_KINDS = ("small_cnn", "resnet9", "dwsep")
