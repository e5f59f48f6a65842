"""Where anomaly textures come from.

DRAEM pastes pieces of *other* images (the DTD texture set in the paper) into
normal images. Anything works as long as it is varied and unlike the normal
data, so anomap offers four sources, chosen by name with
:func:`make_anomaly_source`:

``None`` / ``"builtin"`` (the default)
    Half photo crops, half procedural textures (per sample, at random). The
    photos are the colour and grey pictures bundled with scikit-image
    (astronaut, cat, coffee, rocket, Hubble field, retina, coins, moon, ...),
    cut into random square crops of 1/4 to all of their side. Why this
    default: it needs no download, so a fresh offline machine trains
    DRAEM out of the box; photos give natural edges and textures, procedural
    textures give unlimited colours, frequencies and orientations, and the
    mix is more varied than either alone. The three scikit-image texture photos
    (brick, grass, gravel) are left out of it because anomap's demo and test
    data use them as the *normal* class: a "defect" made of the normal
    texture would teach the model to flag normal texture.
``"procedural"``
    Only generated textures: fractal Perlin colour noise, stripes,
    checkerboards and per-channel colour noise, each with random colours,
    scale and orientation.
``"skimage"``
    Only the scikit-image photos, this time including brick, grass and gravel.
a folder path
    Every image under it, recursively (e.g. the DTD set the paper uses):
    each resized to the training size, as the official code does. Unreadable
    files are skipped with a warning naming them.

Decoded images are cached in memory as uint8; sampling is one ``grid_sample``
on the batch, with random draws made on the CPU (generator or torch's global
RNG), so a seed gives the same textures on any device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomap.data import IMAGE_EXTENSIONS, load_image
from anomap.synth.perlin import perlin_noise

# Pictures scikit-image ships with its wheel (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "coins", "moon", "camera", "cell", "clock",
                  "page", "text", "colorwheel")
SKIMAGE_TEXTURES = ("brick", "grass", "gravel")
PRELOAD_LIMIT = 1000  # folders up to this many images are decoded (and checked) up front

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None,
             *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


class AnomalySource:
    """Something that yields batches of anomaly textures (B, 3, H, W) in [0, 1]."""

    name: str = "source"

    def sample(self, batch: int, size: Size, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def from_folder(path: str | Path, resolution: int = 256, *,
                    crop_scale: tuple[float, float] = (1.0, 1.0),
                    preload: bool | None = None) -> ImageSource:
        """Every image under ``path`` (recursively); see :class:`ImageSource`."""
        return ImageSource.from_folder(path, resolution, crop_scale=crop_scale, preload=preload)

    @staticmethod
    def builtin(resolution: int = 256) -> AnomalySource:
        return make_anomaly_source("builtin", resolution)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ImageSource(AnomalySource):
    """Photos, from arrays or files, cached as uint8 (3, R, R) squares.

    A sample is a random crop of a random photo covering ``crop_scale`` of its
    side (1.0 = the whole photo, as the official DRAEM code), resampled to the
    requested size.
    """

    def __init__(self, entries: Sequence[np.ndarray | Path], *, resolution: int = 256,
                 crop_scale: tuple[float, float] = (1.0, 1.0), name: str = "images",
                 cache_mb: float = 1024.0) -> None:
        if not entries:
            raise ValueError("an image source needs at least one image")
        low, high = float(crop_scale[0]), float(crop_scale[1])
        if not 0 < low <= high <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        self.entries = list(entries)
        self.resolution = int(resolution)
        self.crop_scale = (low, high)
        self.name = name
        self.skipped: list[str] = []
        self._cache: dict[int, torch.Tensor] = {}
        self._bad: set[int] = set()
        # Beyond this many images (e.g. all 5640 of DTD at 512 px) decode on every use.
        self.max_cached = max(1, int(cache_mb * 2**20 // (3 * self.resolution ** 2)))

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_folder(cls, path: str | Path, resolution: int = 256, *,
                    crop_scale: tuple[float, float] = (1.0, 1.0),
                    preload: bool | None = None) -> ImageSource:
        """All images under ``path``; unreadable ones are skipped with a warning.

        Up to ``PRELOAD_LIMIT`` images are decoded now (``preload=None``), so a
        corrupt file is reported before training starts; larger folders are
        header-checked now and decoded on first use.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"anomaly source folder {root} does not exist")
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"anomaly source folder {root} holds no images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        source = cls(files, resolution=resolution, crop_scale=crop_scale, name=str(root))
        if preload is None:
            preload = len(files) <= PRELOAD_LIMIT
        for i, file in enumerate(files):
            if preload:
                source._get(i)
            else:
                try:
                    with Image.open(file) as image:
                        image.size  # noqa: B018 - reading the header is the check
                except Exception as error:  # any unreadable file is skipped
                    source._skip(i, error)
        if len(source._bad) == len(files):
            raise ValueError(f"none of the {len(files)} images in {root} could be read: "
                             + "; ".join(source.skipped[:3]))
        return source

    def _skip(self, i: int, error: Exception) -> None:
        self._bad.add(i)
        line = f"{self.entries[i]}: {type(error).__name__}: {error}"
        self.skipped.append(line)
        warnings.warn(f"anomaly source: skipping unreadable image {line}", stacklevel=3)

    def _decode(self, entry: np.ndarray | Path) -> torch.Tensor:
        # paths go through load_image: any mode and bit depth, like the training data
        image = Image.fromarray(entry) if isinstance(entry, np.ndarray) else load_image(entry)
        image = image.convert("RGB").resize((self.resolution, self.resolution),
                                            Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _get(self, i: int) -> torch.Tensor | None:
        if i in self._bad:
            return None
        cached = self._cache.get(i)
        if cached is None:
            try:
                cached = self._decode(self.entries[i])
            except Exception as error:  # any unreadable file is skipped
                self._skip(i, error)
                return None
            if len(self._cache) < self.max_cached:
                self._cache[i] = cached
        return cached

    def _get_valid(self, i: int) -> torch.Tensor:
        """Image i, or the next readable one after it (deterministic fallback)."""
        for step in range(len(self.entries)):
            tile = self._get((i + step) % len(self.entries))
            if tile is not None:
                return tile
        raise ValueError(f"none of the images of anomaly source {self.name} could be read")

    def sample(self, batch: int, size: Size, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        h, w = _hw(size)
        index = torch.randint(len(self.entries), (batch,), generator=generator)
        scale = _uniform(batch, *self.crop_scale, generator)
        centre = (torch.rand(batch, 2, generator=generator) * 2.0 - 1.0) * (1.0 - scale)[:, None]
        if batch == 0:
            return torch.zeros(0, 3, h, w, device=device)
        stack = torch.stack([self._get_valid(int(i)) for i in index]).to(device)
        zero = torch.zeros_like(scale)
        theta = torch.stack([torch.stack([scale, zero, centre[:, 0]], -1),
                             torch.stack([zero, scale, centre[:, 1]], -1)], 1)
        grid = F.affine_grid(theta.to(stack.device), [batch, 3, h, w], align_corners=False)
        out = F.grid_sample(stack.float() / 255.0, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.clamp(0, 1)


def _square_crops(photo: np.ndarray) -> list[np.ndarray]:
    """Cover a non-square photo with overlapping squares of its short side,
    so nothing is lost and nothing is stretched."""
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    photo = photo[:, :, :3]
    h, w = photo.shape[:2]
    side = min(h, w)
    count = math.ceil(max(h, w) / side)
    starts = np.linspace(0, max(h, w) - side, count).round().astype(int)
    if h >= w:
        return [photo[s:s + side] for s in starts]
    return [photo[:, s:s + side] for s in starts]


def skimage_source(resolution: int = 512, *, include_textures: bool = True,
                   crop_scale: tuple[float, float] = (0.25, 1.0)) -> ImageSource:
    """Photos bundled with scikit-image (offline), as random square crops."""
    import skimage.data

    names = SKIMAGE_PHOTOS + (SKIMAGE_TEXTURES if include_textures else ())
    crops: list[np.ndarray] = []
    for name in names:
        try:
            crops.extend(_square_crops(np.asarray(getattr(skimage.data, name)())))
        except Exception as error:  # a missing picture only shrinks the set
            warnings.warn(f"scikit-image picture {name!r} unavailable: {error}", stacklevel=2)
    if not crops:
        raise RuntimeError("no scikit-image pictures could be loaded")
    return ImageSource(crops, resolution=resolution, crop_scale=crop_scale, name="skimage")


class ProceduralSource(AnomalySource):
    """Generated textures: four kinds, random colours, scales and orientations."""

    name = "procedural"
    kinds = ("perlin", "stripes", "checker", "color_noise")

    def sample(self, batch: int, size: Size, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        h, w = _hw(size)
        kind = torch.randint(len(self.kinds), (batch,), generator=generator)
        out = torch.empty(batch, 3, h, w, device=device)
        for k, name in enumerate(self.kinds):
            index = (kind == k).nonzero().flatten()
            if index.numel():
                make = getattr(self, f"_{name}")
                out[index.to(out.device)] = make(index.numel(), h, w, generator, out.device)
        return out.clamp(0, 1)

    @staticmethod
    def _colours(n: int, generator: torch.Generator | None, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        pair = torch.rand(n, 2, 3, 1, 1, generator=generator).to(device)
        return pair[:, 0], pair[:, 1]

    @staticmethod
    def _coords(n: int, h: int, w: int, generator: torch.Generator | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample rotated coordinates u, v (n, 1, H, W), in image heights."""
        angle = (torch.rand(n, generator=generator) * math.pi).to(device)[:, None, None, None]
        y = torch.arange(h, device=device, dtype=torch.float32)[:, None] / h
        x = torch.arange(w, device=device, dtype=torch.float32)[None, :] / h
        u = x * angle.cos() + y * angle.sin()
        v = -x * angle.sin() + y * angle.cos()
        return u, v

    def _perlin(self, n: int, h: int, w: int, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
        k = torch.randint(1, 5, (n,), generator=generator)
        noise = perlin_noise(2 ** k, 2 ** k, h, w, max_res=16, generator=generator,
                             device=device)
        noise = noise + 0.5 * perlin_noise(2 ** (k + 1), 2 ** (k + 1), h, w, max_res=32,
                                           generator=generator, device=device)
        gain = _uniform(n, 2.0, 8.0, generator).to(device)[:, None, None]
        t = torch.sigmoid(noise * gain)[:, None]
        a, b = self._colours(n, generator, device)
        return torch.lerp(a, b, t)

    def _stripes(self, n: int, h: int, w: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
        u, _ = self._coords(n, h, w, generator, device)
        cycles = _uniform(n, 2.0, 24.0, generator).to(device)[:, None, None, None]
        phase = _uniform(n, 0.0, 2 * math.pi, generator).to(device)[:, None, None, None]
        sharp = _uniform(n, 1.0, 12.0, generator).to(device)[:, None, None, None]
        t = torch.sigmoid(torch.sin(2 * math.pi * cycles * u + phase) * sharp)
        a, b = self._colours(n, generator, device)
        return torch.lerp(a, b, t)

    def _checker(self, n: int, h: int, w: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
        u, v = self._coords(n, h, w, generator, device)
        cycles = _uniform(n, 1.5, 12.0, generator).to(device)[:, None, None, None]
        t = (torch.sin(2 * math.pi * cycles * u) * torch.sin(2 * math.pi * cycles * v) > 0)
        a, b = self._colours(n, generator, device)
        return torch.lerp(a, b, t.float())

    def _color_noise(self, n: int, h: int, w: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
        k = torch.randint(3, 7, (n,), generator=generator).repeat_interleave(3)
        noise = perlin_noise(2 ** k, 2 ** k, h, w, max_res=64, generator=generator,
                             device=device)
        return (0.5 + 0.5 * noise).reshape(n, 3, h, w)


class MixedSource(AnomalySource):
    """Each sample comes from one of several sources, picked with given weights."""

    def __init__(self, sources: Sequence[AnomalySource], weights: Sequence[float] | None = None,
                 name: str = "mixed") -> None:
        if not sources:
            raise ValueError("a mixed source needs at least one source")
        self.sources = list(sources)
        weights = [1.0] * len(self.sources) if weights is None else list(weights)
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.name = name

    def sample(self, batch: int, size: Size, *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        h, w = _hw(size)
        pick = torch.multinomial(self.weights, batch, replacement=True, generator=generator) \
            if batch else torch.zeros(0, dtype=torch.long)
        out = torch.empty(batch, 3, h, w, device=device)
        for k, source in enumerate(self.sources):
            index = (pick == k).nonzero().flatten()
            if index.numel():
                out[index.to(out.device)] = source.sample(index.numel(), (h, w),
                                                          generator=generator,
                                                          device=out.device)
        return out


def make_anomaly_source(spec: str | Path | None = None, size: int = 256) -> AnomalySource:
    """The source a name or folder stands for; see the module docstring.

    ``size`` is the training image size: folders are cached at it, photos at
    twice it (capped at 512) so random crops keep their detail.
    """
    photo_resolution = int(min(512, 2 * size))
    key = None if spec is None else str(spec)
    if key is None or key.lower() == "builtin":
        photos = skimage_source(photo_resolution, include_textures=False)
        return MixedSource([photos, ProceduralSource()], [0.5, 0.5], name="builtin")
    if key.lower() == "procedural":
        return ProceduralSource()
    if key.lower() == "skimage":
        return skimage_source(photo_resolution, include_textures=True)
    path = Path(key).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"anomaly source {key!r} is neither a folder nor one of builtin, procedural, skimage")
    return ImageSource.from_folder(path, size)


__all__ = ["AnomalySource", "ImageSource", "MixedSource", "ProceduralSource",
           "make_anomaly_source", "skimage_source"]
