"""Fractal masks from random iterated function systems (FractalAD's anomaly shapes).

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
"""

from __future__ import annotations

import numpy as np

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
