"""The ten texture augmentations DRAEM applies to its anomaly source, in torch.

Why: a handful of source photos must yield anomalies of any colour, contrast
and orientation, so that the model learns "this does not belong here" rather
than "this looks like the source set". DRAEM draws 3 of these 10 per sample,
in random order, with the official code's imgaug ranges:

====================  =======================================================
gamma_contrast        x ** gamma, gamma ~ U(0.5, 2.0) per channel
brightness            luma * U(0.8, 1.2) + U(-30, 30)/255 (YCbCr Y only)
sharpness             PIL Sharpness, factor ~ U(0, 2)
hue_saturation        hue and saturation each + U(-50, 50)/255 (of a turn / of 1)
solarize              with p 0.5: pixels >= U(32, 128)/255 become 1 - x
posterize             keep U{1..8} high bits of the 8-bit value
invert                1 - x
autocontrast          per channel stretch, U(0, 20)% clipped at each end
equalize              per channel histogram equalisation (8-bit levels)
rotate                U(-45, 45) degrees about the centre, corners black
====================  =======================================================

Every function takes a float batch (B, 3, H, W) in [0, 1] with per-sample
parameters as tensors and returns a batch of the same shape in [0, 1]; the
``random_*`` wrappers draw those parameters on the CPU from a generator (or
torch's global RNG), so results are reproducible on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Generator = torch.Generator | None


def _per_sample(values: torch.Tensor | float, x: torch.Tensor, dims: int = 3) -> torch.Tensor:
    """A (B,) tensor or scalar, as (B, 1, 1, 1) on x's device for broadcasting."""
    v = torch.as_tensor(values, dtype=x.dtype).to(x.device)
    if v.dim() == 0:
        v = v.expand(x.shape[0])
    return v.reshape(v.shape[0], *([1] * dims)) if v.dim() == 1 else v


def _uniform(n: int, low: float, high: float, generator: Generator, *shape: int
             ) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


# --- geometry ---------------------------------------------------------------------------------

def rotate(images: torch.Tensor, degrees: torch.Tensor | float, *, mode: str = "bilinear"
           ) -> torch.Tensor:
    """Rotate each sample about its centre; outside the source is filled with 0."""
    n, _, h, w = images.shape
    angle = torch.as_tensor(degrees, dtype=torch.float32).reshape(-1).expand(n) * (math.pi / 180)
    c, s = angle.cos(), angle.sin()
    zero = torch.zeros_like(c)
    # Normalised coordinates stretch x by w/2 and y by h/2: correct for non-square images.
    theta = torch.stack([torch.stack([c, s * h / w, zero], -1),
                         torch.stack([-s * w / h, c, zero], -1)], 1)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape),
                         align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


# --- photometric ------------------------------------------------------------------------------

def gamma_contrast(x: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """x ** gamma; gamma (B,), (B, 3) for per-channel, or a scalar."""
    g = torch.as_tensor(gamma, dtype=x.dtype).to(x.device)
    g = g[:, :, None, None] if g.dim() == 2 else _per_sample(g, x)
    return x.clamp(0, 1).pow(g)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma (B, 1, H, W), the Y of YCbCr."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * weights[None, :, None, None]).sum(1, keepdim=True)


def is_grayscale(images: torch.Tensor, tolerance: float = 1.5 / 255) -> torch.Tensor:
    """(B,) bool: the sample's channels are equal (a grey photo read as RGB)."""
    if images.shape[1] == 1:
        return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    spread = images.amax(dim=1) - images.amin(dim=1)
    return spread.flatten(1).amax(dim=1) <= tolerance


def brightness(x: torch.Tensor, mul: torch.Tensor | float, add: torch.Tensor | float
               ) -> torch.Tensor:
    """Y -> Y * mul + add with chroma kept: in RGB every channel moves by the change of Y."""
    y = luma(x)
    return (x + (y * _per_sample(mul, x) + _per_sample(add, x) - y)).clamp(0, 1)


def sharpness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with PIL's SMOOTH-filtered image;
    factor 0 blurs, 1 is identity, 2 sharpens; the 1-pixel border is kept."""
    # PIL's kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (3x3 box sum + 4 * centre) / 13.
    smooth = (9.0 * F.avg_pool2d(x, 3, stride=1) + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return torch.lerp(degenerate, x, _per_sample(factor, x).expand_as(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV, hue in turns [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                      torch.zeros_like(maxc))
    return torch.stack((hue, sat, maxc), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device)[None, :, None, None]
    k = (n + h[:, None] * 6.0) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def hue_saturation(x: torch.Tensor, hue_shift: torch.Tensor | float,
                   sat_shift: torch.Tensor | float) -> torch.Tensor:
    """Add hue_shift (turns) to the hue and sat_shift to the saturation."""
    hsv = rgb_to_hsv(x.clamp(0, 1))
    h = (hsv[:, 0] + _per_sample(hue_shift, x, 2)) % 1.0
    s = (hsv[:, 1] + _per_sample(sat_shift, x, 2)).clamp(0, 1)
    return hsv_to_rgb(torch.stack((h, s, hsv[:, 2]), 1)).clamp(0, 1)


def color_jitter(x: torch.Tensor, strength: float, generator: Generator = None, *,
                 color: bool = True) -> torch.Tensor:
    """torchvision's ColorJitter with one strength: brightness, contrast (about the
    mean grey) and, with ``color``, saturation factors in [1 - strength, 1 + strength],
    and a hue shift in [-strength, strength] turns (hue capped at half a turn),
    drawn per sample and applied in that order."""
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return _per_sample(_uniform(n, max(0.0, 1 - strength), 1 + strength, generator), x)

    x = (x * factor()).clamp(0, 1)
    grey = luma(x).mean(dim=(2, 3), keepdim=True)
    x = (grey + factor() * (x - grey)).clamp(0, 1)
    if color:
        y = luma(x)
        x = (y + factor() * (x - y)).clamp(0, 1)
        shift = min(strength, 0.5)
        x = hue_saturation(x, _uniform(n, -shift, shift, generator), 0.0)
    return x


def solarize(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Pixels at or above the threshold become 1 - x; a threshold > 1 is a no-op."""
    return torch.where(x >= _per_sample(threshold, x), 1.0 - x, x)


def posterize(x: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits of each 8-bit value (8 = unchanged)."""
    step = 2.0 ** (8 - _per_sample(torch.as_tensor(bits).float(), x))
    levels = (x.clamp(0, 1) * 255.0).round()
    return (levels / step).floor() * step / 255.0


def invert(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


def _channel_histograms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit levels (B*C, H*W) and their histograms (B*C, 256), in one bincount."""
    n, c, h, w = x.shape
    levels = (x.clamp(0, 1) * 255.0).round().long().reshape(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device)[:, None] * 256
    counts = torch.bincount((levels + offsets).reshape(-1), minlength=n * c * 256)
    return levels, counts.reshape(n * c, 256)


def autocontrast(x: torch.Tensor, cutoff: torch.Tensor | float = 0.0) -> torch.Tensor:
    """PIL's autocontrast per channel: drop ``cutoff`` (a fraction) of the pixels
    at each end of the 8-bit histogram, stretch the rest to [0, 1]; a channel
    with a single level is kept."""
    n, c, h, w = x.shape
    _, counts = _channel_histograms(x)
    cut = _per_sample(cutoff, x, 1).expand(n, c).reshape(n * c, 1) * (h * w)
    below = counts.cumsum(1).to(x.dtype)  # pixels at or below each level
    above = counts.flip(1).cumsum(1).flip(1).to(x.dtype)  # pixels at or above each level
    lo = (below <= cut).sum(1).clamp(max=255).to(x.dtype)
    hi = ((above > cut).sum(1) - 1).clamp(min=0).to(x.dtype)
    lo, hi = lo.reshape(n, c, 1, 1) / 255.0, hi.reshape(n, c, 1, 1) / 255.0
    span = hi - lo
    stretched = (x - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, stretched, x).clamp(0, 1)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel on 8-bit levels (the imgaug "pillike"
    op DRAEM uses), all channels of all samples at once."""
    n, c, h, w = x.shape
    levels, counts = _channel_histograms(x)
    top = 255 - (counts.flip(1) > 0).int().argmax(1, keepdim=True)  # highest level present
    step = torch.div(h * w - counts.gather(1, top), 255, rounding_mode="floor")
    safe = step.clamp(min=1)
    before = counts.cumsum(1) - counts  # pixels strictly below each level
    lut = torch.div(before + torch.div(safe, 2, rounding_mode="floor"), safe,
                    rounding_mode="floor").clamp(max=255)
    out = lut.gather(1, levels)
    out = torch.where(step > 0, out, levels)  # PIL leaves near-flat channels alone
    return out.to(x.dtype).reshape(n, c, h, w) / 255.0


# --- random parameters, the official ranges ---------------------------------------------------

def _random_gamma(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return gamma_contrast(x, _uniform(x.shape[0], 0.5, 2.0, g, x.shape[1]))


def _random_brightness(x: torch.Tensor, g: Generator) -> torch.Tensor:
    n = x.shape[0]
    return brightness(x, _uniform(n, 0.8, 1.2, g), _uniform(n, -30 / 255, 30 / 255, g))


def _random_sharpness(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return sharpness(x, _uniform(x.shape[0], 0.0, 2.0, g))


def _random_hue_saturation(x: torch.Tensor, g: Generator) -> torch.Tensor:
    n = x.shape[0]
    return hue_saturation(x, _uniform(n, -50 / 255, 50 / 255, g),
                          _uniform(n, -50 / 255, 50 / 255, g))


def _random_solarize(x: torch.Tensor, g: Generator) -> torch.Tensor:
    n = x.shape[0]
    threshold = _uniform(n, 32 / 255, 128 / 255, g)
    applied = torch.rand(n, generator=g) < 0.5
    return solarize(x, torch.where(applied, threshold, torch.full_like(threshold, 2.0)))


def _random_posterize(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return posterize(x, torch.randint(1, 9, (x.shape[0],), generator=g))


def _random_invert(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return invert(x)


def _random_autocontrast(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return autocontrast(x, _uniform(x.shape[0], 0.0, 0.2, g))


def _random_equalize(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return equalize(x)


def _random_rotate(x: torch.Tensor, g: Generator) -> torch.Tensor:
    return rotate(x, _uniform(x.shape[0], -45.0, 45.0, g))


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, Generator], torch.Tensor]] = {
    "gamma_contrast": _random_gamma,
    "brightness": _random_brightness,
    "sharpness": _random_sharpness,
    "hue_saturation": _random_hue_saturation,
    "solarize": _random_solarize,
    "posterize": _random_posterize,
    "invert": _random_invert,
    "autocontrast": _random_autocontrast,
    "equalize": _random_equalize,
    "rotate": _random_rotate,
}


def random_augment(x: torch.Tensor, n_ops: int = 3, *, generator: Generator = None
                   ) -> torch.Tensor:
    """Apply ``n_ops`` distinct augmentations per sample, in random order.

    Per step, each augmentation runs once on the samples that drew it, so the
    cost is about n_ops passes over the batch, not 10.
    """
    names = list(AUGMENTATIONS)
    if not 0 <= n_ops <= len(names):
        raise ValueError(f"n_ops must be in 0..{len(names)}")
    n = x.shape[0]
    # A random permutation per sample; its first n_ops entries are the ops, in order.
    order = torch.rand(n, len(names), generator=generator).argsort(1)[:, :n_ops]
    out = x.clone()
    for step in range(n_ops):
        for k, name in enumerate(names):
            chosen = (order[:, step] == k).nonzero().flatten()
            if chosen.numel():
                index = chosen.to(x.device)
                out[index] = AUGMENTATIONS[name](out[index], generator)
    return out


def random_rotate(images: torch.Tensor, *, p: float = 0.3, max_angle: float = 90.0,
                  generator: Generator = None) -> torch.Tensor:
    """With probability p per sample, rotate by U(-max_angle, max_angle) degrees
    (DRAEM's rotation of the normal training images: p 0.3, 90 degrees)."""
    n = images.shape[0]
    applied = torch.rand(n, generator=generator) < p
    angles = (torch.rand(n, generator=generator) * 2.0 - 1.0) * max_angle
    index = applied.nonzero().flatten()
    if index.numel() == 0:
        return images
    out = images.clone()
    out[index.to(images.device)] = rotate(images[index.to(images.device)], angles[index])
    return out


__all__ = [
    "AUGMENTATIONS", "autocontrast", "brightness", "color_jitter", "equalize", "gamma_contrast",
    "hsv_to_rgb", "is_grayscale",
    "hue_saturation", "invert", "luma", "posterize", "random_augment", "random_rotate",
    "rgb_to_hsv", "rotate", "sharpness", "solarize",
]
