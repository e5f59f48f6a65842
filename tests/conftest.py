"""Shared fixtures: a small defect dataset made from real texture photos, and
one STPM run trained on it, reused by the tests that need a trained model."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from anomap.demo import make_demo_dataset
from anomap.train import TrainingPlan, fit

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    return make_demo_dataset(root, "brick", n_train=40, n_test_good=10, n_test_per_defect=5,
                             tile_size=128, seed=1)


def fit_toy(method: str, data: Path, run: Path, *, epochs: int, image_size: int,
            recipe: dict[str, Any] | None = None, **options: Any) -> Path:
    """A short seeded training on the toy set (batch 8, stretched to a square; ``recipe``:
    more fields)."""
    fit(
        method,
        data,
        run,
        TrainingPlan(
            recipe={"epochs": epochs, "batch_size": 8, "image_size": image_size,
                    **(recipe or {})},
            resize_mode="stretch",
            seed=0,
            **options,
        ),
        device="cpu",
        progress=False,
    )
    return run


def assert_finds_toy_defects(run: Path, *, image: float, pixel: float, aupro: float
                             ) -> dict[str, Any]:
    """``anomap test`` on the toy set: each metric above its bound (chance is 0.5)."""
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings

    result = evaluate_run(run, settings=LoadSettings(device="cpu"), panels=False, progress=False)
    for key, bound in (("image_auroc", image), ("pixel_auroc", pixel), ("aupro", aupro)):
        assert result[key] > bound, (key, result)
    return result


@pytest.fixture(scope="session")
def trained_run(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_toy("stpm", toy_data, tmp_path_factory.mktemp("runs") / "stpm", epochs=10,
                   image_size=128)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small networks are too small to gain from threads, and a second thread on a
    busy 2-core machine made a learning test 20x slower (spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` pixels (a
    decompression bomb's signature), made without allocating them."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC
    return bytes(data)
