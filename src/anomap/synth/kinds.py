"""A family of synthetic anomaly kinds, to judge models without a defective image.

Each kind turns held-out normal images into the same images with one anomaly
each and its mask (in the evaluation frame): textures pasted through Perlin
masks (``texture``), fractal self-patches (``fractal``), cut-paste of the
image's own patches (``cutpaste``), thin scratches and cracks (``line``), small
dark or bright blobs and holes (``blob``), local blur (``blur``), and colour
or brightness shifts (``colour``). Sizes run from one-pixel lines to a fifth
of the image. A method that trains on some of them names them
(:meth:`anomap.methods.base.AnomalyModel.synthetic_kinds`), and ``--model
auto`` never judges it on those (docs/auto.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from anomap.data import Geometry, LoadedSet, to_float
from anomap.synth.check import line_check_set, synthetic_check_set
from anomap.synth.fractal import fractal_anomalies

#: kind -> what it imitates (for reports)
KINDS = {
    "texture": "foreign textures pasted through Perlin-noise masks",
    "fractal": "the image's own patches pasted through fractal masks",
    "cutpaste": "a rectangle of the image's own texture pasted elsewhere",
    "line": "thin scratches and cracks, 1-3 pixels wide",
    "blob": "small dark or bright spots and holes",
    "blur": "a locally blurred region",
    "colour": "a region with shifted brightness or colour",
}

#: a region's side, as a share of the photo's shorter side: one-pixel-wide detail (lines)
#: to a fifth of the image
REGION_SHARE = (0.03, 0.2)


def _keep_found(images: torch.Tensor, masks: torch.Tensor, val_set: LoadedSet,
                geometry: Geometry) -> LoadedSet:
    """The set with its masks in the evaluation frame; images whose anomaly fell
    outside the photo (on letterbox padding) are dropped."""
    restored = geometry.restore(masks.float(), val_set.boxes) > 0.5
    keep = restored.flatten(1).any(dim=1).nonzero().flatten().tolist()
    return LoadedSet(samples=[val_set.samples[i] for i in keep], images=images[keep],
                     boxes=[val_set.boxes[i] for i in keep], masks=restored[keep], skipped=[])


def _ellipse(box_width: int, box_height: int, rng: np.random.Generator,
             share: tuple[float, float] = REGION_SHARE) -> np.ndarray:
    """A filled ellipse of log-uniform size at a random place inside the photo's box."""
    side = min(box_width, box_height)
    low, high = max(2.0, share[0] * side), max(3.0, share[1] * side)
    rx, ry = (float(np.exp(rng.uniform(np.log(low), np.log(high)))) / 2 for _ in range(2))
    cx, cy = rng.uniform(rx, box_width - rx), rng.uniform(ry, box_height - ry)
    canvas = Image.new("L", (box_width, box_height), 0)
    ImageDraw.Draw(canvas).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return np.asarray(canvas) > 127


def _regional(val_set: LoadedSet, geometry: Geometry, seed: int,
              change: Callable[[torch.Tensor, np.random.Generator], torch.Tensor]) -> LoadedSet:
    """Each image changed by ``change`` (a float (3, h, w) photo in [0, 1] -> the
    changed photo) inside one random ellipse of the photo."""
    rng = np.random.default_rng(seed)
    images = val_set.images.clone()
    masks = torch.zeros(len(val_set), geometry.size, geometry.size)
    for index, box in enumerate(val_set.boxes):
        window = (slice(None), slice(box.top, box.top + box.height),
                  slice(box.left, box.left + box.width))
        photo = to_float(images[index][window])
        region = torch.from_numpy(_ellipse(box.width, box.height, rng))
        changed = change(photo, rng)
        out = torch.where(region[None], changed, photo)
        images[index][window] = out.mul(255).round().clamp(0, 255).to(torch.uint8)
        masks[index, box.top:box.top + box.height, box.left:box.left + box.width] = \
            region.float()
    return _keep_found(images, masks, val_set, geometry)


def _blob(photo: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    level = float(rng.uniform(0.0, 0.15)) if rng.random() < 0.5 else float(rng.uniform(0.85, 1))
    return torch.full_like(photo, level)


def _blur(photo: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    size = int(rng.integers(2, 5)) * 2 + 1
    padded = F.pad(photo[None], (size // 2,) * 4, mode="replicate")
    return F.avg_pool2d(padded, size, stride=1)[0]


def _colour(photo: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    gain = torch.tensor([float(rng.uniform(0.6, 1.4)) for _ in range(3)])
    if rng.random() < 0.5:  # a brightness change (every channel alike)
        gain[:] = gain[0]
    return (photo * gain[:, None, None]).clamp(0, 1)


def _cutpaste(val_set: LoadedSet, geometry: Geometry, seed: int) -> LoadedSet:
    rng = np.random.default_rng(seed)
    images = val_set.images.clone()
    masks = torch.zeros(len(val_set), geometry.size, geometry.size)
    for index, box in enumerate(val_set.boxes):
        side = min(box.width, box.height)
        h = w = max(3, int(np.exp(rng.uniform(np.log(REGION_SHARE[0] * side * 2),
                                               np.log(REGION_SHARE[1] * side)))))
        h = min(h, box.height - 1)
        w = min(max(3, int(w * rng.uniform(0.5, 2.0))), box.width - 1)
        sy, sx = int(rng.integers(0, box.height - h)), int(rng.integers(0, box.width - w))
        ty, tx = int(rng.integers(0, box.height - h)), int(rng.integers(0, box.width - w))
        patch = images[index, :, box.top + sy:box.top + sy + h, box.left + sx:box.left + sx + w]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        images[index, :, box.top + ty:box.top + ty + h, box.left + tx:box.left + tx + w] = \
            patch.clone()
        masks[index, box.top + ty:box.top + ty + h, box.left + tx:box.left + tx + w] = 1.0
    return _keep_found(images, masks, val_set, geometry)


def _fractal(val_set: LoadedSet, geometry: Geometry, seed: int) -> LoadedSet:
    generator = torch.Generator().manual_seed(seed)
    images, masks = [], []
    with torch.no_grad():
        for start in range(0, len(val_set), 32):
            batch, mask = fractal_anomalies(to_float(val_set.images[start:start + 32]),
                                            generator)
            images.append(batch.mul(255).round().clamp(0, 255).to(torch.uint8))
            masks.append(mask[:, 0])
    return _keep_found(torch.cat(images), torch.cat(masks), val_set, geometry)


def anomaly_set(kind: str, val_set: LoadedSet, geometry: Geometry, seed: int) -> LoadedSet:
    """``val_set`` with one anomaly of ``kind`` in each image (fixed by ``seed``)."""
    if kind == "texture":
        return synthetic_check_set(val_set, geometry, seed)
    if kind == "line":
        return line_check_set(val_set, geometry, seed)
    if kind == "fractal":
        return _fractal(val_set, geometry, seed)
    if kind == "cutpaste":
        return _cutpaste(val_set, geometry, seed)
    changes = {"blob": _blob, "blur": _blur, "colour": _colour}
    if kind not in changes:
        raise ValueError(f"unknown anomaly kind {kind!r}: one of {', '.join(KINDS)}")
    return _regional(val_set, geometry, seed, changes[kind])
