"""anomap.synth.fractal: FractalAD's random iterated function systems and their masks."""

from __future__ import annotations

import numpy as np
import pytest

from anomap.synth.fractal import (
    WEIGHTED_SUM,
    fixed_point,
    fractal_mask,
    iterate,
    render_mask,
    sample_singular_values,
    sample_system,
)


def test_singular_values_meet_every_constraint() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        target = rng.uniform(*WEIGHTED_SUM)
        values = sample_singular_values(2, target, rng)
        assert values.shape == (2, 2)
        assert bool((values >= 0).all()) and bool((values <= 1 + 1e-12).all())
        assert bool((values[:, 1] <= values[:, 0] + 1e-12).all())
        assert (values[:, 0] + 2 * values[:, 1]).sum() == pytest.approx(target)
    with pytest.raises(ValueError, match="weighted sum"):
        sample_singular_values(2, 6.5, rng)


def test_systems_are_contractive_so_the_attractor_is_bounded() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        system = sample_system(rng)
        assert system.shape == (2, 2, 3)
        singular = np.linalg.svd(system[:, :, :2], compute_uv=False)
        assert bool((singular <= 1 + 1e-9).all())
        weighted = (singular[:, 0] + 2 * singular[:, 1]).sum()
        assert WEIGHTED_SUM[0] - 1e-9 <= weighted <= WEIGHTED_SUM[1] + 1e-9
        points = iterate(system, 5000, rng)
        assert points.shape == (5000, 2) and bool(np.isfinite(points).all())


def test_chaos_game_starts_on_the_attractor_and_stays_in_the_maps_images() -> None:
    rng = np.random.default_rng(2)
    system = sample_system(rng)
    matrix, offset = system[0, :, :2], system[0, :, 2]
    start = fixed_point(matrix, offset)
    np.testing.assert_allclose(matrix @ start + offset, start, atol=1e-12)
    points = iterate(system, 2000, rng, chains=100)
    # every point is the image of the previous one of its chain under one of the maps
    chains = points.reshape(20, 100, 2)
    previous, following = chains[:-1].reshape(-1, 2), chains[1:].reshape(-1, 2)
    images = np.einsum("kij,nj->nki", system[:, :, :2], previous) + system[None, :, :, 2]
    assert bool((np.abs(images - following[:, None]).max(axis=2) < 1e-9).any(axis=1).all())


def test_masks_are_binary_non_empty_and_fill_their_square() -> None:
    rng = np.random.default_rng(3)
    for size in (16, 64, 200):
        for _ in range(10):
            mask = fractal_mask(size, rng)
            assert mask.dtype == bool and mask.shape == (size, size)
            assert mask.any()
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            # fitted to the points' bounding box: spans the square, less the 3x3 stamp's play
            assert rows[-1] - rows[0] >= size - 3 and cols[-1] - cols[0] >= size - 3


def test_every_point_stamps_the_same_subset_of_its_3x3_neighbourhood() -> None:
    points = np.array([[0.0, 0.0], [10.0, 10.0], [5.0, 5.0]])  # cells (0,0), (10,10), (5,5)
    for seed in range(20):
        mask = render_mask(points, 11, np.random.default_rng(seed))
        stamp = mask[4:7, 4:7]  # around the middle point, away from the borders
        assert stamp.any()
        np.testing.assert_array_equal(mask[0:2, 0:2], stamp[1:, 1:])  # clipped at a corner
        np.testing.assert_array_equal(mask[9:, 9:], stamp[:2, :2])
        assert mask.sum() == stamp.sum() + stamp[1:, 1:].sum() + stamp[:2, :2].sum()


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    a = fractal_mask(64, np.random.default_rng(5))
    b = fractal_mask(64, np.random.default_rng(5))
    c = fractal_mask(64, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
