"""Training-time flips and turns: every output is a variant of its own input, the
draws follow the generator, and unknown kinds are refused."""

from __future__ import annotations

import pytest
import torch

from anomap.methods import Recipe
from anomap.orientation import random_orientations


def _variants(image: torch.Tensor, turns: bool) -> list[torch.Tensor]:
    flips = [image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)]
    return flips + [f.transpose(-1, -2) for f in flips] if turns else flips


@pytest.mark.parametrize(("kind", "n_variants"), [("flip", 4), ("dihedral", 8)])
def test_each_image_becomes_one_of_its_own_variants(kind: str, n_variants: int) -> None:
    images = torch.rand(64, 3, 5, 5)
    before = images.clone()
    out = random_orientations(images, kind, torch.Generator().manual_seed(1))
    seen = set()
    for image, result in zip(images, out, strict=True):
        matches = [i for i, v in enumerate(_variants(image, kind == "dihedral"))
                   if torch.equal(v, result)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == n_variants  # 64 draws reach every variant (fixed seed)
    assert torch.equal(images, before)  # the input batch is left alone


def test_same_generator_seed_draws_the_same_variants() -> None:
    images = torch.rand(16, 1, 4, 4)
    first = random_orientations(images, "dihedral", torch.Generator().manual_seed(7))
    again = random_orientations(images, "dihedral", torch.Generator().manual_seed(7))
    other = random_orientations(images, "dihedral", torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_none_leaves_the_batch_as_it_is_and_unknown_kinds_are_refused() -> None:
    images = torch.rand(2, 3, 4, 4)
    assert random_orientations(images, "none", torch.Generator()) is images
    with pytest.raises(ValueError, match="unknown --augment 'rotate'"):
        random_orientations(images, "rotate", torch.Generator())
    with pytest.raises(ValueError, match="unknown --augment"):
        Recipe(augment="rotate")
    with pytest.raises(ValueError, match="square"):
        random_orientations(torch.rand(2, 3, 4, 6), "flip", torch.Generator())
