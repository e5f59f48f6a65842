"""Shared fixtures: a small defect dataset made from real texture photos, and
one STPM run trained on it, reused by the tests that need a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomap.demo import make_demo_dataset
from anomap.train import fit

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    return make_demo_dataset(root, "brick", n_train=40, n_test_good=10, n_test_per_defect=5,
                             tile_size=128, seed=1)


@pytest.fixture(scope="session")
def trained_run(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "stpm"
    fit("stpm", toy_data, run, recipe_overrides={"epochs": 10, "batch_size": 8,
                                                 "image_size": 128},
        resize_mode="stretch", device="cpu", seed=0, progress=False)
    return run
