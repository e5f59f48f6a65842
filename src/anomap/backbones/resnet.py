"""ResNet-18/34/50 and Wide-ResNet-50-2 with torchvision-identical state-dict keys.

Keys and shapes match torchvision exactly so its public ImageNet checkpoints load as they are.
The feature extractor only builds the stages it needs: on CPU, skipping layer4 (and the head)
is most of the speed gain for stride-16 pyramids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from anomap.backbones.base import Backbone, check_strides

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: stride of the output of layer1..layer4
STAGE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class ResNetSpec:
    """Architecture of one ResNet variant."""

    bottleneck: bool
    layers: tuple[int, int, int, int]
    width_per_group: int = 64

    @property
    def expansion(self) -> int:
        return 4 if self.bottleneck else 1


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(False, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(False, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(True, (3, 4, 6, 3)),
    "wide_resnet50_2": ResNetSpec(True, (3, 4, 6, 3), width_per_group=128),
}


def feature_channels(name: str) -> dict[int, int]:
    """Channels of the feature map at each available stride."""
    spec = RESNET_SPECS[name]
    return {s: 64 * 2**i * spec.expansion for i, s in enumerate(STAGE_STRIDES)}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs + identity (ResNet-18/34)."""

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: "ResNet v1.5"), 1x1 expand x4, + identity."""

    def __init__(
        self, cin: int, planes: int, stride: int, downsample: nn.Module | None, base_width: int
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _make_stage(spec: ResNetSpec, cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """One torchvision ``layerN``: the first block changes stride/width, the rest keep it."""
    cout = planes * spec.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    layers: list[nn.Module] = []
    for i in range(blocks):
        block_in = cin if i == 0 else cout
        block_stride = stride if i == 0 else 1
        block_down = downsample if i == 0 else None
        if spec.bottleneck:
            layers.append(
                Bottleneck(block_in, planes, block_stride, block_down, spec.width_per_group)
            )
        else:
            layers.append(BasicBlock(block_in, planes, block_stride, block_down))
    return nn.Sequential(*layers)


class ResNetBackbone(Backbone):
    """ResNet trunk truncated after the deepest requested stage; returns stage outputs."""

    def __init__(self, name: str, out_strides: tuple[int, ...] = (4, 8, 16)) -> None:
        out_strides = check_strides(name, out_strides, STAGE_STRIDES)
        channels = feature_channels(name)
        super().__init__(
            name, out_strides, [channels[s] for s in out_strides], IMAGENET_MEAN, IMAGENET_STD
        )
        spec = RESNET_SPECS[name]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        n_stages = max(STAGE_STRIDES.index(s) for s in out_strides) + 1
        self._stage_names: list[str] = []
        cin = 64
        for i in range(n_stages):
            planes = 64 * 2**i
            stage = _make_stage(spec, cin, planes, spec.layers[i], 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
            self._stage_names.append(f"layer{i + 1}")
            cin = planes * spec.expansion
        self._init_weights()
        self._use_channels_last()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self._nhwc(x)))))
        found: dict[int, torch.Tensor] = {}
        for stride, stage_name in zip(STAGE_STRIDES, self._stage_names, strict=False):
            x = getattr(self, stage_name)(x)
            found[stride] = x
        return [found[s].contiguous() for s in self.out_strides]


class ResNetClassifier(ResNetBackbone):
    """Full ImageNet classifier (all four stages + avgpool + fc), for checking weights."""

    def __init__(self, name: str, num_classes: int = 1000) -> None:
        super().__init__(name, (32,))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * RESNET_SPECS[name].expansion, num_classes)
        self._use_channels_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = super().forward(x)[0]
        return self.fc(torch.flatten(self.avgpool(features), 1))
