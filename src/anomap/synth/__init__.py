"""Synthetic anomalies for methods that learn from fake defects (DRAEM, and
the RSTPM / FractalAD family).

An anomaly is a texture from an :class:`AnomalySource`, changed by 3 random
augmentations (:mod:`anomap.synth.augment`), pasted through a thresholded
Perlin-noise mask (:mod:`anomap.synth.perlin`) and blended with the image:

    I_a = I * (1 - M) + (1 - beta) * A * M + beta * I * M,  beta ~ U[0, 0.8)

Half of the samples stay clean (mask all zero), so the model also learns that
a normal image has nothing to find. On grayscale images (three equal
channels) the texture is reduced to its luma: a colour anomaly on a grey part
would teach "colour means defect", which no real grey defect shows.
Everything is batched torch on the images' device; random draws come from
torch's global RNG (seeded by the training loop) or an explicit ``generator``.

FractalAD's anomalies (:mod:`anomap.synth.fractal`) are shaped by fractal masks
from random iterated function systems instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomap.synth.augment import (
    AUGMENTATIONS,
    is_grayscale,
    luma,
    random_augment,
    random_rotate,
    rotate,
)
from anomap.synth.perlin import perlin_mask, perlin_noise
from anomap.synth.sources import (
    AnomalySource,
    ImageSource,
    MixedSource,
    ProceduralSource,
    make_anomaly_source,
    skimage_source,
)


def blend(images: torch.Tensor, textures: torch.Tensor, masks: torch.Tensor,
          beta: torch.Tensor | float) -> torch.Tensor:
    """I * (1 - M) + (1 - beta) * A * M + beta * I * M, beta per sample or scalar.

    beta > 0 keeps some of the image under the texture: partly transparent
    anomalies are the hard, realistic ones.
    """
    b = torch.as_tensor(beta, dtype=images.dtype).to(images.device)
    if b.dim() == 1:
        b = b[:, None, None, None]
    return images * (1 - masks) + (1 - b) * textures * masks + b * images * masks


def synthesize(images: torch.Tensor, source: AnomalySource, *, p_anomaly: float = 0.5,
               beta_range: tuple[float, float] = (0.0, 0.8), n_augment: int = 3,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] -> (images with anomalies, masks (B, 1, H, W) of 0/1).

    Each sample gets an anomaly with probability ``p_anomaly`` (its Perlin
    mask can still come out empty: 1 in 20 at 64 px and up, more in smaller
    images); the others are returned
    unchanged with an all-zero mask. Only the anomalous samples cost any work.
    """
    n, _, h, w = images.shape
    device = images.device
    anomalous = (torch.rand(n, generator=generator) < p_anomaly).nonzero().flatten()
    out = images.clone()
    masks = torch.zeros(n, 1, h, w, dtype=images.dtype, device=device)
    k = anomalous.numel()
    if k == 0:
        return out, masks
    beta = beta_range[0] + (beta_range[1] - beta_range[0]) * torch.rand(k, generator=generator)
    textures = source.sample(k, (h, w), generator=generator, device=device)
    textures = random_augment(textures, n_augment, generator=generator).to(images.dtype)
    mask = perlin_mask(k, h, w, generator=generator, device=device).to(images.dtype)
    index = anomalous.to(device)
    gray = is_grayscale(images[index])
    if gray.any():
        textures[gray] = luma(textures[gray]).expand(-1, textures.shape[1], -1, -1)
    out[index] = blend(images[index], textures, mask, beta)
    masks[index] = mask
    return out, masks


class LazyAnomalySource:
    """A method's anomaly source, built on first use at the training image size.

    Folder sources are cached at one size, which is known only once a batch
    arrives. Copies (deepcopy, pickle) leave the built source behind: it can
    be large and is rebuilt on demand; DataParallel replicas, which copy a
    module's attributes shallowly, share this object and so one source.
    """

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.size = 256
        self._source: AnomalySource | None = None

    @property
    def built(self) -> bool:
        return self._source is not None

    def get(self, size: int | None = None) -> AnomalySource:
        """The source; ``size`` (the images' side) is used if it is not built yet."""
        if self._source is None:
            if size is not None:
                self.size = int(size)
            self._source = make_anomaly_source(self.spec, self.size)
        return self._source

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "size": self.size, "_source": None}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, 3) uint8; one channel is repeated."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_sample_grid(images: torch.Tensor, source: AnomalySource, path: str | Path, n: int = 8,
                      *, pad: int = 2, generator: torch.Generator | None = None,
                      **synth_options: Any) -> Path:
    """One PNG with a row per image: normal | synthetic anomaly | mask.

    Shows exactly what the model is trained on; every row gets an anomaly
    (p_anomaly 1 unless given), since clean rows would show nothing. The PNG
    is (3 * W + 4 * pad) wide and (n * H + (n + 1) * pad) high, white gaps.
    """
    images = images[:n]
    options = {"p_anomaly": 1.0, **synth_options}
    with torch.no_grad():
        augmented, masks = synthesize(images, source, generator=generator, **options)
    return save_sample_grid(images, augmented, masks, path, pad=pad)


def save_sample_grid(images: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor,
                     path: str | Path, *, pad: int = 2) -> Path:
    """The PNG of :func:`write_sample_grid` for anomalies made any other way."""
    rows, _, h, w = images.shape
    columns = [_to_uint8(images), _to_uint8(augmented), _to_uint8(masks)]
    canvas = np.full((rows * h + (rows + 1) * pad, 3 * w + 4 * pad, 3), 255, dtype=np.uint8)
    for r in range(rows):
        top = pad + r * (h + pad)
        for c, column in enumerate(columns):
            left = pad + c * (w + pad)
            canvas[top:top + h, left:left + w] = column[r]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


__all__ = [
    "AUGMENTATIONS", "AnomalySource", "ImageSource", "LazyAnomalySource", "MixedSource",
    "ProceduralSource", "blend",
    "is_grayscale", "make_anomaly_source", "perlin_mask", "perlin_noise", "random_augment",
    "random_rotate", "rotate", "save_sample_grid", "skimage_source", "synthesize",
    "write_sample_grid",
]
