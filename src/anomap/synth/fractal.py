"""FractalAD's anomalies: a patch of the image itself, cut out by a fractal mask.

Masks come from random iterated function systems.
A system is a few random affine maps ``x -> A x + b``; each ``A = U diag(s) V``
with U, V random rotations (with random sign flips) and singular values
sampled so that the sum over maps of ``s1 + 2 s2`` equals ``a ~ U(3.5, 4.0)``
with every ``s`` in [0, 1]: the maps are contractive, so the system has a
bounded attractor, and that weighted sum keeps it from collapsing to a few
dots. Points on the attractor come from the chaos game: from a point on it,
apply a map picked with probability proportional to its ``|det A|``.

The chaos game is sequential; here many chains run side by side (NumPy, one
vector step per iteration), each starting at the fixed point of the first map,
which lies on the attractor, so no point is wasted on a burn-in. The points
are rendered into a square binary mask fitted to their bounding box, each
stamping the same random subset of its 3x3 neighbourhood (as the official
code does; an empty subset is drawn again). Everything comes from one
``numpy.random.Generator``: the same seed gives the same mask.

:func:`fractal_anomalies` pastes them as FractalAD does: a square patch cut
from the same image, one random colour change, random flips, a rotation of
15-75 degrees, multiplied by a fractal mask of its size and pasted somewhere
else; the mask is then dilated (3x3, three times) and half of the samples get
Gaussian noise inside it. Every sample gets an anomaly. On grey images the
patch is turned back to grey after its colour change (as ``anomap.synth``
does for DRAEM): a colour defect on a grey part would teach "colour means
defect", which no real grey defect shows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anomap.synth.augment import color_jitter, is_grayscale, luma, rotate
from anomap.synth.foreground import foreground_mask

#: FractalAD's systems: two maps, weighted singular-value sum in this range
N_MAPS = 2
WEIGHTED_SUM = (3.5, 4.0)
N_POINTS = 100_000


def sample_singular_values(n_maps: int, weighted_sum: float, rng: np.random.Generator
                           ) -> np.ndarray:
    """(n_maps, 2) singular values with 0 <= s2 <= s1 <= 1 per map and
    sum(s1 + 2 s2) == ``weighted_sum`` (which must lie in (0, 3 n_maps))."""
    if not 0 < weighted_sum < 3 * n_maps:
        raise ValueError(f"weighted sum {weighted_sum} must lie in (0, {3 * n_maps})")
    values = np.empty((n_maps, 2))
    left = weighted_sum  # what the remaining values must add up to
    low = weighted_sum - 3 * n_maps + 3  # what they must at least reach to stay feasible
    for i in range(n_maps - 1):
        s1 = rng.uniform(max(0.0, low / 3), min(1.0, left))
        low -= s1
        left -= s1
        s2 = rng.uniform(max(0.0, low / 2), min(s1, left / 2))
        low = low - 2 * s2 + 3
        left -= 2 * s2
        values[i] = s1, s2
    s2 = rng.uniform(max(0.0, (left - 1) / 2), left / 3)
    values[-1] = left - 2 * s2, s2
    return values


def _random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2, 2) rotations by U(-pi, pi), each column's sign flipped at random."""
    signs = np.sign(rng.random((n, 2, 1)) - 0.5) * np.eye(2)
    angle = rng.uniform(-np.pi, np.pi, n)
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return rotation @ signs


def sample_system(rng: np.random.Generator, n_maps: int = N_MAPS,
                  weighted_sum: tuple[float, float] = WEIGHTED_SUM,
                  translation: float = 1.0) -> np.ndarray:
    """(n_maps, 2, 3) contractive affine maps ``[A | b]``, b ~ U(-translation, translation)."""
    rotations = _random_rotations(2 * n_maps, rng)
    u, v = rotations[:n_maps], rotations[n_maps:]
    singular = sample_singular_values(n_maps, rng.uniform(*weighted_sum), rng)
    system = np.empty((n_maps, 2, 3))
    system[:, :, :2] = u * singular[:, None, :] @ v
    system[:, :, 2] = rng.uniform(-translation, translation, (n_maps, 2))
    return system


def fixed_point(matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The point x = A x + b of one contractive map (it lies on the attractor)."""
    return np.linalg.solve(np.eye(2) - matrix, offset)


def iterate(system: np.ndarray, n_points: int, rng: np.random.Generator, chains: int = 1000
            ) -> np.ndarray:
    """(n_points, 2) points of the system's attractor by the chaos game, ``chains`` at once."""
    matrices, offsets = system[:, :, :2], system[:, :, 2]
    weights = np.abs(np.linalg.det(matrices))
    total = weights.sum()
    probabilities = (weights / total if total > 0
                     else np.full(len(system), 1.0 / len(system)))
    chains = max(1, min(chains, n_points))
    steps = -(-n_points // chains)
    points = np.empty((steps, chains, 2))
    current = np.broadcast_to(fixed_point(matrices[0], offsets[0]), (chains, 2))
    picks = rng.choice(len(system), size=(steps, chains), p=probabilities)
    for step in range(steps):
        chosen = picks[step]
        current = np.einsum("nij,nj->ni", matrices[chosen], current) + offsets[chosen]
        points[step] = current
    return points.reshape(-1, 2)[:n_points]


def render_mask(points: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool mask of the points, scaled to fill it by their bounding box."""
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    cells = ((points - low) * ((size - 1) / span)).astype(np.int64)
    stamp = np.zeros(9, dtype=bool)
    while not stamp.any():
        stamp = rng.integers(0, 2, 9).astype(bool)
    offsets = np.stack(np.divmod(np.flatnonzero(stamp), 3), axis=1) - 1
    mask = np.zeros((size, size), dtype=bool)
    for dr, dc in offsets:
        rows, cols = cells[:, 0] + dr, cells[:, 1] + dc
        inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        mask[rows[inside], cols[inside]] = True
    return mask


def fractal_mask(size: int, rng: np.random.Generator, n_points: int = N_POINTS) -> np.ndarray:
    """One random fractal mask, (size, size) bool, as FractalAD draws them."""
    return render_mask(iterate(sample_system(rng), n_points, rng), size, rng)


#: FractalAD's anomaly parameters (official code): patch side as a share of the
#: image's shorter side, where corners may lie, rotation, noise
PATCH_SIDE = (0.1, 0.5)
#: on an object (foreground on): the patch side as a share of the object's shorter side
OBJECT_PATCH_SIDE = (0.05, 1.5)
CORNER_RANGE = (0.1, 0.9)
ROTATION_DEGREES = (15.0, 75.0)
NOISE_AMPLITUDE = 10 / 255
DILATIONS = 3


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _recolour(patch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One of FractalAD's three colour changes, picked at random: a small colour
    jitter (0.2), a strong brightness and contrast jitter (1.0), or two random
    channels (with repeats) scaled by U(0, 2)."""
    choice = int(torch.randint(3, (1,), generator=generator))
    if choice == 0:
        return color_jitter(patch[None], 0.2, generator)[0]
    if choice == 1:
        return color_jitter(patch[None], 1.0, generator, color=False)[0]
    patch = patch.clone()
    for channel in torch.randint(3, (2,), generator=generator).tolist():
        patch[channel] = (patch[channel] * 2 * float(torch.rand(1, generator=generator))
                          ).clamp(0, 1)
    return patch


def _corner(length: int, side: int, generator: torch.Generator | None) -> int:
    """A patch corner in [0.1, 0.9] of ``length`` less the patch ``side``."""
    low = min(CORNER_RANGE[0] * length, length - side)  # a patch too big starts earlier
    high = CORNER_RANGE[1] * length - side
    return int(_uniform(low, max(low, high), generator))


def _place(height: int, width: int, side: int, generator: torch.Generator | None,
           foreground: torch.Tensor | None, tries: int = 20) -> tuple[int, int]:
    """A patch's top-left corner; with a ``foreground`` (H, W) mask, one whose centre
    lies on it (the last draw when none of ``tries`` does)."""
    for _ in range(tries if foreground is not None else 1):
        top, left = _corner(height, side, generator), _corner(width, side, generator)
        if foreground is None or foreground[top + side // 2, left + side // 2]:
            break
    return top, left


def object_side(foreground: torch.Tensor) -> int:
    """The shorter side of the object's bounding box (the official code takes its
    rotated minimum-area rectangle's, from OpenCV)."""
    rows = torch.nonzero(foreground.any(dim=1)).flatten()
    cols = torch.nonzero(foreground.any(dim=0)).flatten()
    return int(min(rows[-1] - rows[0], cols[-1] - cols[0])) + 1


def paste_fractal_anomaly(image: torch.Tensor, generator: torch.Generator | None = None,
                          grey: bool = False, foreground: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) in [0, 1] -> (the image with one anomaly, its (H, W) 0/1 mask before
    dilation). The anomaly is never empty; ``grey``: the patch stays grey;
    ``foreground`` (H, W bool): cut and paste on the object only, the patch side
    a share of the object's, as the official code sizes it."""
    _, height, width = image.shape
    if foreground is not None and foreground.any():
        side = int(_uniform(*OBJECT_PATCH_SIDE, generator) * object_side(foreground))
    else:
        side = int(_uniform(*PATCH_SIDE, generator) * min(height, width))
    side = min(max(4, side), min(height, width) - 1)
    top, left = _place(height, width, side, generator, foreground)
    patch = _recolour(image[:, top:top + side, left:left + side], generator)
    if grey:
        patch = luma(patch[None])[0].expand(3, -1, -1)
    if float(torch.rand(1, generator=generator)) < 0.5:
        patch = patch.flip(-1)
    if float(torch.rand(1, generator=generator)) < 0.5:
        patch = patch.flip(-2)
    angle = _uniform(*ROTATION_DEGREES, generator)
    turned = rotate(torch.cat((patch, torch.ones_like(patch[:1])))[None], angle,
                    mode="nearest")[0]
    seed = int(torch.randint(2**62, (1,), generator=generator))
    shape = torch.from_numpy(fractal_mask(side, np.random.default_rng(seed))).to(image)
    mask = turned[3] * shape
    if not mask.any():  # the fractal fell where the turn cut the corners off: keep its shape
        mask = shape
    top, left = _place(height, width, side, generator, foreground)
    for _ in range(20 if foreground is not None else 0):  # the defect stays on the object
        on_object = mask * foreground[top:top + side, left:left + side].to(mask)
        if on_object.any():
            mask = on_object
            break
        top, left = _place(height, width, side, generator, foreground)
    out = image.clone()
    region = out[:, top:top + side, left:left + side]
    out[:, top:top + side, left:left + side] = region * (1 - mask) + turned[:3] * mask
    full = torch.zeros(height, width, dtype=image.dtype, device=image.device)
    full[top:top + side, left:left + side] = mask
    return out, full


def fractal_anomalies(images: torch.Tensor, generator: torch.Generator | None = None,
                      foreground: bool = False, scale: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [0, 1] -> (images each with one anomaly, masks (B, 1, H, W) 0/1),
    the masks dilated as FractalAD's targets are, noise in half of the samples.
    ``foreground``: on each image's object only (:mod:`anomap.synth.foreground`).
    ``scale`` > 1 cuts, turns and pastes at that multiple of the size and brings the
    anomaly back down with area averaging, as the official code pastes on the photo
    before resizing it: soft edges and fine fractal strokes instead of hard pixels.
    Outside the anomaly the images are untouched."""
    grey = is_grayscale(images).tolist()
    work = images if scale == 1 else F.interpolate(images, scale_factor=scale,
                                                   mode="bilinear", align_corners=False)
    objects = ([torch.from_numpy(foreground_mask(image)) for image in work] if foreground
               else [None] * len(images))
    pasted = [paste_fractal_anomaly(image, generator, g, fg)
              for image, g, fg in zip(work, grey, objects, strict=True)]
    out = torch.stack([image for image, _ in pasted])
    masks = torch.stack([mask for _, mask in pasted])[:, None]
    if scale != 1:  # the anomaly's share of each pixel blends it into the original
        cover = F.avg_pool2d(masks, scale)
        out = images * (1 - cover) + F.avg_pool2d(out * masks, scale)
        masks = (cover > 0).to(masks)  # every pixel the anomaly touches
    for _ in range(DILATIONS):
        masks = F.max_pool2d(masks, 3, stride=1, padding=1)
    noisy = (torch.rand(len(images), generator=generator) < 0.5).to(images)
    noise = torch.randn(len(images), 1, *images.shape[-2:], generator=generator).to(images)
    out = (out + NOISE_AMPLITUDE * noise * masks * noisy[:, None, None, None]).clamp(0, 1)
    return out, masks
