"""Training-time augmentation of the normal images: random flips and right-angle turns.

A student trained on a few hundred photos sees every one of them hundreds of
times; flipping or turning them shows it more normal texture for the same
data. It only makes sense where a flipped or turned normal photo is still
normal (textures without a direction, parts that may lie any way round), so it
is off by default: on MTD, whose tiles are photographed one way up, flips cost
0.06 image AUROC (docs/results/mtd.md).

``flip`` flips each image left-right and/or top-bottom (4 orientations);
``dihedral`` also swaps the axes (8: every flip and 90-degree turn). Inputs are
square batches (B, C, S, S), so every orientation keeps the shape. Training
with either recomputes a frozen teacher's targets every step (they change
with the orientation), so an STPM epoch costs about 1.2x more.
"""

from __future__ import annotations

import torch

ORIENTATIONS = ("none", "flip", "dihedral")


def check_orientation(kind: str) -> None:
    """Refuse an unknown ``--augment`` value, naming the known ones."""
    if kind not in ORIENTATIONS:
        raise ValueError(f"unknown --augment {kind!r}: {', '.join(ORIENTATIONS)}")


def random_orientations(images: torch.Tensor, kind: str, generator: torch.Generator
                        ) -> torch.Tensor:
    """Each image of ``images`` (B, C, S, S) turned to one of its ``kind``
    orientations, drawn independently from ``generator`` (seeded by the caller,
    so a resumed run draws what the uninterrupted run drew)."""
    check_orientation(kind)
    if kind == "none":
        return images
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"augmentation needs square images, got {tuple(images.shape[-2:])}")
    # drawn on the CPU generator (same draws on every device), applied where the images are
    draws = (torch.rand(3, len(images), generator=generator) < 0.5).to(images.device)
    out = images.clone()
    out[draws[0]] = out[draws[0]].flip(-1)
    out[draws[1]] = out[draws[1]].flip(-2)
    if kind == "dihedral":
        out[draws[2]] = out[draws[2]].transpose(-1, -2)
    return out
