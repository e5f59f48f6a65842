"""Held-out normal images with a synthetic anomaly pasted into each: what a run
is judged on where no defective image may be used (choosing the kept epoch, checking
that an int8 export keeps the run's decisions)."""

from __future__ import annotations

import torch

from anomap.data import Geometry, LoadedSet, to_float
from anomap.synth import synthesize
from anomap.synth.sources import make_anomaly_source


def synthetic_check_set(val_set: LoadedSet, geometry: Geometry, seed: int,
                        source: str = "builtin") -> LoadedSet:
    """The held-out normals with a synthetic anomaly pasted into each (fixed
    seed, so every epoch is judged on the same images); masks in the
    evaluation frame. Images whose anomaly fell on letterbox padding only are
    dropped."""
    generator = torch.Generator().manual_seed(seed + 7919)
    textures = make_anomaly_source(source, geometry.size)
    images, masks = [], []
    with torch.no_grad():
        for start in range(0, len(val_set), 64):  # in chunks: float copies of a big set add up
            batch, mask = synthesize(to_float(val_set.images[start:start + 64]), textures,
                                     p_anomaly=1.0, generator=generator)
            images.append(batch.mul_(255.0).add_(0.5).to(torch.uint8))
            masks.append(geometry.restore(mask[:, 0], val_set.boxes[start:start + 64]) > 0.5)
    restored = torch.cat(masks)
    keep = restored.flatten(1).any(dim=1).nonzero().flatten().tolist()
    return LoadedSet(samples=[val_set.samples[i] for i in keep], images=torch.cat(images)[keep],
                     boxes=[val_set.boxes[i] for i in keep], masks=restored[keep], skipped=[])
