"""Held-out normal images with a synthetic anomaly pasted into each: what a run
is judged on where no defective image may be used (choosing the kept epoch, checking
that an int8 export keeps the run's decisions)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from anomap.data import Geometry, LoadedSet, to_float
from anomap.synth import synthesize
from anomap.synth.sources import make_anomaly_source


def synthetic_check_set(val_set: LoadedSet, geometry: Geometry, seed: int,
                        source: str = "builtin",
                        beta_range: tuple[float, float] = (0.0, 0.8)) -> LoadedSet:
    """The held-out normals with a synthetic anomaly pasted into each (fixed
    seed, so every epoch is judged on the same images); masks in the
    evaluation frame. Images whose anomaly fell on letterbox padding only are
    dropped. ``beta_range``: how much of the image shows through the anomaly
    (0 opaque; near 1 faint)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    textures = make_anomaly_source(source, geometry.size)
    images, masks = [], []
    with torch.no_grad():
        for start in range(0, len(val_set), 64):  # in chunks: float copies of a big set add up
            batch, mask = synthesize(to_float(val_set.images[start:start + 64]), textures,
                                     p_anomaly=1.0, generator=generator,
                                     beta_range=beta_range)
            images.append(batch.mul_(255.0).add_(0.5).to(torch.uint8))
            masks.append(geometry.restore(mask[:, 0], val_set.boxes[start:start + 64]) > 0.5)
    restored = torch.cat(masks)
    keep = restored.flatten(1).any(dim=1).nonzero().flatten().tolist()
    return LoadedSet(samples=[val_set.samples[i] for i in keep], images=torch.cat(images)[keep],
                     boxes=[val_set.boxes[i] for i in keep], masks=restored[keep], skipped=[])


def line_check_set(val_set: LoadedSet, geometry: Geometry, seed: int) -> LoadedSet:
    """The held-out normals with thin lines drawn into each: 1-3 pixels wide, dark or
    bright, partly transparent, like scratches and cracks. Fine anomalies are what
    coarse noise in a map (int8, bfloat16) hides first, and what texture pastes,
    which cover tens of pixels, do not test. Masks in the evaluation frame."""
    rng = np.random.default_rng(seed + 104729)
    images = val_set.images.clone()
    masks = torch.zeros(len(val_set), geometry.size, geometry.size)
    for index, box in enumerate(val_set.boxes):
        canvas = Image.new("L", (box.width, box.height), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 3))):
            points = [(float(rng.uniform(0.1, 0.9) * box.width),
                       float(rng.uniform(0.1, 0.9) * box.height)) for _ in range(3)]
            draw.line(points, fill=255, width=int(rng.integers(1, 4)), joint="curve")
        line = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
        alpha = float(rng.uniform(0.6, 1.0))
        target = 255.0 * float(rng.integers(0, 2)) + (20.0 if rng.random() < 0.5 else -20.0)
        region = images[index, :, box.top:box.top + box.height, box.left:box.left + box.width]
        blended = region.float() * (1 - alpha * line) + min(max(target, 0.0), 255.0) * alpha * line
        images[index, :, box.top:box.top + box.height, box.left:box.left + box.width] = \
            blended.round().clamp(0, 255).to(torch.uint8)
        masks[index, box.top:box.top + box.height, box.left:box.left + box.width] = line
    restored = geometry.restore(masks, val_set.boxes) > 0.5
    keep = restored.flatten(1).any(dim=1).nonzero().flatten().tolist()
    return LoadedSet(samples=[val_set.samples[i] for i in keep], images=images[keep],
                     boxes=[val_set.boxes[i] for i in keep], masks=restored[keep], skipped=[])
