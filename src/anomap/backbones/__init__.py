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

from anomap.backbones import efficientnet_lite, resnet
from anomap.backbones.base import Backbone, check_strides
from anomap.backbones.weights import (
    IncompatibleWeightsError,
    WeightsUnavailableError,
    imagenet_available,
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
    "imagenet_available",
]
