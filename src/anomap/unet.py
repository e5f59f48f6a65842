"""DRAEM's discriminative U-Net, shared: DRAEM segments [reconstruction, input]
with it, RSTPM's discriminator segments its summed student-teacher maps.

Six encoder levels of two conv3x3-BN-ReLU (widths b, 2b, 4b, 8b, 8b, 8b,
max-pooling between), a decoder of bilinear x2 upsampling (corners aligned)
and conv blocks with skip connections, and 2-class logits at full size
(the official ``DiscriminativeSubNetwork``, VitjanZ/DRAEM model_unet.py).
Trained with :func:`focal_loss` on the softmax, initialised by
:func:`init_weights` as the official code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    """conv3x3 -> BN -> ReLU (the order export.fuse_conv_bn folds)."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def conv_block(cin: int, cout: int, mid: int | None = None) -> nn.Sequential:
    mid = cout if mid is None else mid
    return nn.Sequential(*conv_bn_relu(cin, mid), *conv_bn_relu(mid, cout))


def upsampling(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *conv_bn_relu(cin, cout))


class DiscriminativeNetwork(nn.Module):
    """U-Net (6 levels, skips) segmenting where input and reconstruction differ."""

    def __init__(self, base_width: int = 64, in_channels: int = 6, out_channels: int = 2
                 ) -> None:
        super().__init__()
        b = base_width
        widths = (b, 2 * b, 4 * b, 8 * b, 8 * b, 8 * b)
        self.encoder = nn.ModuleList(
            conv_block(cin, cout) for cin, cout in zip((in_channels, *widths[:-1]), widths,
                                                    strict=True))
        # Upsample deepest -> shallowest: (channels in, channels out, skip channels).
        levels = ((8 * b, 8 * b, 8 * b), (8 * b, 4 * b, 8 * b), (4 * b, 2 * b, 4 * b),
                  (2 * b, b, 2 * b), (b, b, b))
        self.ups = nn.ModuleList(upsampling(cin, cout) for cin, cout, _ in levels)
        self.decoder = nn.ModuleList(conv_block(cout + skip, cout) for _, cout, skip in levels)
        self.head = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.decoder, strict=True):
            x = block(torch.cat((up(x), skips.pop()), dim=1))
        return self.head(x)


#: the discriminative U-Net pools five times: its input sides are multiples of this
MULTIPLE = 32


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> torch.Tensor:
    """Edge-pad (B, C, H, W) on the bottom and right to sides divisible by ``multiple``;
    the caller crops outputs back to ``x``'s size."""
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def init_weights(module: nn.Module) -> None:
    """The official initialisation: conv weights N(0, 0.02), BN scale N(1, 0.02), BN shift 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               smooth: float = 1e-5) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma * log(p_t) over pixels.

    ``probs`` (B, C, H, W) are softmax outputs, ``target`` (B, 1, H, W) class
    indices. As the official loss: the one-hot target is clamped to
    [smooth / (C - 1), 1 - smooth] and p_t = <one-hot, p> + smooth, so log
    never sees 0. Down-weights the many easy background pixels, so the small
    anomalous regions drive learning.
    """
    classes = probs.shape[1]
    one_hot = F.one_hot(target[:, 0].long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()
