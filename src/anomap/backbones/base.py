"""What every backbone is: a module returning one feature map per requested stride."""

from __future__ import annotations

from collections.abc import Sequence

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
