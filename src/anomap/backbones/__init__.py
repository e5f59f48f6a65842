"""Pretrained CNN feature extractors returning multi-scale feature pyramids.

``create_backbone(name, out_strides, weights)`` builds a network truncated after the deepest
requested stride (nothing deeper is built or computed: that is the CPU speed budget) and loads
its weights, never silently falling back to random ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn


class Backbone(nn.Module):
    """A feature extractor: ``bb(x)`` -> one feature map per stride in ``bb.out_strides``.

    ``x`` must already be normalised with ``bb.mean``/``bb.std`` (see :meth:`normalize`), because
    the weights only make sense for the input statistics they were trained on. Internally the
    computation runs channels-last (speed); returned features are ordinary contiguous NCHW.
    """

    def __init__(
        self,
        name: str,
        out_strides: tuple[int, ...],
        out_channels: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.name = name
        self.out_strides = out_strides
        self.out_channels = out_channels
        self.mean = mean
        self.std = std
        # Non-persistent: follow .to(device) but stay out of the state dict, whose keys must
        # match the upstream checkpoints exactly.
        self.register_buffer("_mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], (B,3,H,W) or (3,H,W), to the input statistics of the weights."""
        mean = self._mean.to(dtype=x01.dtype)
        std = self._std.to(dtype=x01.dtype)
        return (x01 - mean) / std

    def _use_channels_last(self) -> None:
        """Store conv weights NHWC; call at the end of every subclass __init__.

        On CPU (oneDNN) NHWC is ~1.3-1.7x faster at inference and, for depthwise convs, ~20x
        faster in backward (EfficientNet students): inputs are converted to match in forward.
        """
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def _nhwc(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def _init_weights(self) -> None:
        """He init for convs, unit BatchNorm: torchvision's and TF EfficientNet's choice,
        which matters for students trained from scratch."""
        if self._on_meta_device():
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _on_meta_device(self) -> bool:
        """True when built on the meta device (structure only): random init is then skipped,
        since normal_ on meta tensors pulls in torch's decomposition machinery (~1.5 s)."""
        return any(p.is_meta for p in self.parameters())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_strides={self.out_strides}, "
            f"out_channels={self.out_channels}"
        )


def check_strides(
    name: str, out_strides: Sequence[int], available: Sequence[int]
) -> tuple[int, ...]:
    """Validate requested strides early, with a message listing what exists."""
    strides = tuple(int(s) for s in out_strides)
    if not strides:
        raise ValueError(f"{name}: out_strides is empty; available strides: {tuple(available)}")
    if len(set(strides)) != len(strides):
        raise ValueError(f"{name}: duplicate strides in out_strides={strides}")
    bad = [s for s in strides if s not in available]
    if bad:
        raise ValueError(
            f"{name}: stride(s) {bad} not available; available strides: {tuple(available)}"
        )
    return strides


# Submodules subclass Backbone, so they are imported after it is defined.
from anomap.backbones import efficientnet_lite, resnet  # noqa: E402
from anomap.backbones.weights import (  # noqa: E402
    IncompatibleWeightsError,
    WeightsUnavailableError,
    imagenet_state_dict,
    load_checked,
    read_state_dict,
)


@dataclass(frozen=True)
class BackboneInfo:
    """What is known about a backbone without building it."""

    family: str
    channels: dict[int, int]  # stride -> channels of the feature map there
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # resolution the ImageNet weights were trained at
    offline_weights: bool  # ImageNet weights ship with an installed package (no download)
    backbone_cls: Callable[[str, tuple[int, ...]], Backbone]
    classifier_cls: Callable[[str], nn.Module]

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.channels)


def _resnet_info(name: str) -> BackboneInfo:
    return BackboneInfo(
        "resnet", resnet.feature_channels(name), resnet.IMAGENET_MEAN, resnet.IMAGENET_STD, 224,
        False, resnet.ResNetBackbone, resnet.ResNetClassifier,
    )


def _lite_info(name: str) -> BackboneInfo:
    return BackboneInfo(
        "efficientnet_lite", efficientnet_lite.feature_channels(name), efficientnet_lite.LITE_MEAN,
        efficientnet_lite.LITE_STD, efficientnet_lite.LITE_SCALING[name].resolution, True,
        efficientnet_lite.EfficientNetLiteBackbone, efficientnet_lite.EfficientNetLiteClassifier,
    )


#: name -> BackboneInfo; ``name in BACKBONES`` tells whether a name is valid.
BACKBONES: dict[str, BackboneInfo] = {
    **{name: _resnet_info(name) for name in resnet.RESNET_SPECS},
    **{name: _lite_info(name) for name in efficientnet_lite.LITE_SCALING},
}

WeightsArg = str | os.PathLike[str] | None


def _info(name: str) -> BackboneInfo:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}"
        ) from None


@cache
def _full_keys(name: str) -> frozenset[str]:
    """State-dict keys of the full classifier, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return frozenset(_info(name).classifier_cls(name).state_dict())


def _load_weights(model: nn.Module, name: str, weights: WeightsArg) -> None:
    """Fill ``model`` from ``weights`` ("imagenet", a path, or None/"none"/"random")."""
    if weights is None or (isinstance(weights, str) and weights.lower() in ("none", "random")):
        return
    if isinstance(weights, str) and weights.lower() == "imagenet":
        state = imagenet_state_dict(name)
        source = f"ImageNet weights of {name!r}"
    else:
        state = read_state_dict(weights)
        source = os.fspath(weights)
    load_checked(model, state, _full_keys(name), source)
    # Pretrained networks are used frozen: eval mode keeps their BatchNorm statistics.
    model.eval()


def create_backbone(
    name: str, out_strides: Sequence[int] = (4, 8, 16), weights: WeightsArg = "imagenet"
) -> Backbone:
    """Build ``name`` truncated after the deepest of ``out_strides`` and load ``weights``.

    ``weights``: "imagenet" (pretrained; raises WeightsUnavailableError if it cannot be had),
    a path to a state dict (raw, or under "state_dict"/"model"), or None for random init.
    With weights the module is returned in eval mode; with None, in train mode.
    """
    info = _info(name)
    model = info.backbone_cls(name, tuple(out_strides))
    _load_weights(model, name, weights)
    return model


def create_classifier(name: str, weights: WeightsArg = "imagenet") -> nn.Module:
    """The full ImageNet classifier (logits (B, 1000)), to check that weights are right."""
    info = _info(name)
    model = info.classifier_cls(name)
    _load_weights(model, name, weights)
    return model


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneInfo",
    "IncompatibleWeightsError",
    "WeightsUnavailableError",
    "check_strides",
    "create_backbone",
    "create_classifier",
]
