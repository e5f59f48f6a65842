"""Where the object is: foreground masks for objects photographed on a plain
background (bottles, screws), so synthetic anomalies land on the part, not on
the backdrop where no real defect can be.

As FractalAD's official code does it: the background colour is the mean of the
top-left corner (20 x 20 at 256 px), the foreground is where the blurred photo
differs from it by more than a threshold, kept as its largest connected region
with holes filled. :func:`decide_foreground` turns ``auto`` into on or off for a
data set from its normal images: textures differ from their corner everywhere
(or in scattered speckles), objects on a backdrop leave a clear margin.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

#: corner side as a fraction of the image side (20 px at 256 px)
CORNER = 20 / 256
#: a pixel is foreground when it differs from the corner's colour by more than this
THRESHOLD = 0.1
#: ``auto`` turns the foreground on when, on the median normal image, the photo's
#: border is backdrop (at most this share of it unlike the corner: textures measured
#: 0.18-0.48, MTD's letterboxed tiles 0.46, an object on a plain background 0) ...
BORDER_SHARE = 0.05
#: ... and the object covers a share of the frame in this range (less: no object)
OBJECT_SHARE = (0.02, 0.95)
FOREGROUND_MODES = ("auto", "on", "off")


def _differs(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) -> (H, W) bool: where the blurred photo is unlike its corner's colour."""
    array = image.detach().cpu().float().numpy()
    corner = max(2, round(CORNER * array.shape[-1]))
    background = array[:, :corner, :corner].mean(axis=(1, 2))
    blurred = ndimage.uniform_filter(array, size=(1, 5, 5))
    return np.abs(blurred - background[:, None, None]).max(axis=0) > THRESHOLD


def foreground_mask(image: torch.Tensor, differs: np.ndarray | None = None) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W) bool: the largest region unlike the corner
    (``differs``: :func:`_differs` of the image, when the caller has it)."""
    differs = _differs(image) if differs is None else differs
    labels, count = ndimage.label(differs)
    if count == 0:
        return differs
    sizes = ndimage.sum_labels(differs, labels, index=np.arange(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def decide_foreground(images: torch.Tensor) -> tuple[bool, str]:
    """(N, 3, H, W) normal images -> (use the foreground?, the reason in words)."""
    border, share = [], []
    for image in images:
        differs = _differs(image)
        ring = np.concatenate([differs[0], differs[-1], differs[:, 0], differs[:, -1]])
        border.append(float(ring.mean()))
        share.append(float(foreground_mask(image, differs).mean()))
    border_median, share_median = float(np.median(border)), float(np.median(share))
    use = border_median <= BORDER_SHARE and OBJECT_SHARE[0] <= share_median <= OBJECT_SHARE[1]
    if use:
        return True, (f"the photos' borders are plain backdrop ({border_median:.0%} unlike "
                      f"the corner) around an object covering {share_median:.0%} of the frame")
    return False, (f"{border_median:.0%} of the photos' borders differ from the corner's "
                   f"colour (at most {BORDER_SHARE:.0%} for an object on a plain backdrop): "
                   "a texture or a part filling the frame")
