"""DRAEM: architecture size, losses, scoring, persistence, and that it learns."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap import Detector
from anomap.evaluate import evaluate_run
from anomap.methods import METHODS, build_model
from anomap.methods.draem import (
    CPU_CONFIG,
    DRAEM,
    count_macs,
    focal_loss,
    ssim,
)
from anomap.run import LoadSettings
from anomap.runfolder import CONFIG_FILE, WEIGHTS_FILE, load_json
from anomap.scoring import image_score
from anomap.train import TrainingPlan, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**config: object) -> DRAEM:
    return DRAEM(base_width=8, disc_base_width=8, anomaly_source="procedural", **config)


def test_registered_and_recipe() -> None:
    assert METHODS["draem"] is DRAEM
    recipe = DRAEM.default_recipe()
    assert (recipe.epochs, recipe.batch_size, recipe.image_size) == (700, 8, 256)
    assert (recipe.optimizer, recipe.lr, recipe.lr_milestones, recipe.lr_gamma) == (
        "adam", 1e-4, (0.8, 0.9), 0.2)
    assert DRAEM.cpu_recipe().image_size == 128
    assert set(CPU_CONFIG) <= set(DRAEM.default_config())
    json.dumps(DRAEM.default_config())


def test_full_size_matches_the_paper() -> None:
    with torch.device("meta"):
        model = DRAEM()
    n = sum(p.numel() for p in model.parameters())
    assert n == 97_422_725  # "about 97 M": recon 69.0 M + discriminative 28.4 M
    assert math.isclose(count_macs(), 198e9, rel_tol=0.01)


def test_shapes_and_losses() -> None:
    torch.manual_seed(0)
    model = tiny()
    images = torch.rand(4, 3, 32, 32)
    losses = model.training_loss(images)
    assert set(losses) == {"loss", "l2", "ssim", "focal"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"].detach(),
                               losses["l2"] + losses["ssim"] + losses["focal"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    maps, scores = model(images)
    assert maps.shape == (4, 32, 32) and scores.shape == (4,)
    assert maps.min() >= 0 and maps.max() <= 1
    assert model.anomaly_map(torch.rand(2, 3, 40, 48)).shape == (2, 40, 48)  # padded to 32s


def test_training_loss_is_seeded() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    values = []
    for _ in range(2):
        torch.manual_seed(5)
        model = tiny()
        values.append(model.training_loss(images)["loss"].item())
    assert values[0] == values[1]


def test_focal_loss_hand_value() -> None:
    probs = torch.tensor([[0.3, 0.9], [0.7, 0.1]]).reshape(1, 2, 1, 2)  # (B, C, H, W)
    target = torch.tensor([[1.0, 0.0]]).reshape(1, 1, 1, 2)
    eps = 1e-5
    pt1 = eps * 0.3 + (1 - eps) * 0.7 + eps  # smoothed one-hot . p + smooth
    pt2 = (1 - eps) * 0.9 + eps * 0.1 + eps
    expected = (-(1 - pt1) ** 2 * math.log(pt1) - (1 - pt2) ** 2 * math.log(pt2)) / 2
    assert math.isclose(focal_loss(probs, target).item(), expected, rel_tol=1e-5)
    assert math.isclose(expected, (0.09 * -math.log(0.7) + 0.01 * -math.log(0.9)) / 2,
                        rel_tol=1e-3)


def test_ssim() -> None:
    a = torch.rand(2, 3, 32, 32)
    assert math.isclose(ssim(a, a.clone()).item(), 1.0, abs_tol=1e-5)
    assert ssim(a, torch.rand(2, 3, 32, 32)).item() < 0.2


def test_image_score_is_max_of_21x21_mean() -> None:
    model = tiny()
    maps = torch.zeros(3, 32, 32)
    maps[0, 10:15, 10:15] = 1.0  # a 5x5 block: best window holds all 25 pixels
    maps[1, 0, 0] = 1.0  # a corner pixel: padding counts in the mean, as the official code
    maps[2] = 0.5
    scores = image_score(maps, model.config)
    torch.testing.assert_close(scores, torch.tensor([25 / 441, 1 / 441, 0.5]))


def test_save_load_round_trip_and_unknown_options_refused() -> None:
    torch.manual_seed(0)
    model = tiny()
    model.training_loss(torch.rand(4, 3, 32, 32))  # moves the BatchNorm statistics
    config = json.loads(json.dumps(model.config))
    assert "weights" not in config and "backbone" not in config
    with pytest.raises(ValueError, match="draem has no option backbone"):
        build_model("draem", **config, backbone="resnet18")
    fresh = build_model("draem", **config)
    fresh.load_state_dict(model.state_dict())
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval().anomaly_map(images), fresh.eval().anomaly_map(images))
    clone = copy.deepcopy(model)  # the texture cache is not copied along
    assert model.textures.built and not clone.textures.built
    replica = model._replicate_for_data_parallel()  # what DataParallel does per GPU
    assert replica.anomaly_source is model.anomaly_source


def _stripes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Normal class: horizontal warm stripes at a random phase, a little noise."""
    y = torch.arange(size).float()[:, None] / size
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    t = 0.5 + 0.25 * torch.sin(2 * math.pi * 4 * y + phase) + 0.03 * torch.randn(
        n, size, size, generator=g)
    return (t[:, None] * torch.tensor([0.96, 0.72, 0.48])[None, :, None, None]).clamp(0, 1)


def _defective(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stripes with a disk that is dark (a hole) or colour-swapped (a stain):
    shapes and colours unlike anything in the training textures' generator.
    Returns the images and the disks' masks (n, size, size)."""
    images = _stripes(n, size, g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(),
                            indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * size * 0.5 + size * 0.25).tolist()
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.12 * size) ** 2
        masks[i] = disk
        if i % 2:
            images[i, :, disk] = torch.tensor([0.1, 0.1, 0.15])[:, None]
        else:
            images[i, :, disk] = images[i, :, disk].flip(0)
    return images, masks


def _write_stripes_dataset(root: Path, g: torch.Generator, size: int = 32) -> Path:
    """The stripes and their defects as an MVTec-layout folder, with exact masks."""
    def save(images: torch.Tensor, folder: Path) -> None:
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
            Image.fromarray(array).save(folder / f"{i:03d}.png")

    save(_stripes(64, size, g), root / "train" / "good")
    save(_stripes(20, size, g), root / "test" / "good")
    bad, masks = _defective(20, size, g)
    save(bad, root / "test" / "disk")
    (root / "ground_truth" / "disk").mkdir(parents=True)
    for i, mask in enumerate(masks):
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(
            root / "ground_truth" / "disk" / f"{i:03d}_mask.png")
    return root


def test_trains_through_the_generic_loop_and_learns_the_defects(tmp_path: Path) -> None:
    """About 150 Adam steps through ``fit`` at 32 px, widths 8, from chance (0.46
    untrained) to finding the stripes' disks, shapes and colours unlike anything in
    the training textures' generator; the run reloads to the same maps."""
    data = _write_stripes_dataset(tmp_path / "stripes", torch.Generator().manual_seed(0))
    run = tmp_path / "draem"
    result = fit(
        "draem",
        data,
        run,
        TrainingPlan(
            model={
                "base_width": 8,
                "disc_base_width": 8,
                "anomaly_source": "procedural",
                "weights": None,
                "backbone": None,
            },
            recipe={"epochs": 24, "batch_size": 8, "image_size": 32, "lr": 1e-3},
            resize_mode="stretch",
            seed=0,
        ),
        device="cpu",
        progress=False,
    )
    assert math.isfinite(result["threshold"])
    config = load_json(run / CONFIG_FILE)
    assert config["method"] == "draem" and config["model"]["anomaly_source"] == "procedural"
    metrics = evaluate_run(run, settings=LoadSettings(device="cpu"), panels=False, progress=False)
    # measured over training seeds 0-2: image AUROC 1.0, pixel AUROC 0.9989-0.9998
    assert metrics["image_auroc"] > 0.9, metrics
    assert metrics["pixel_auroc"] > 0.95, metrics
    model = build_model("draem", **config["model"])
    state = torch.load(run / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    images = torch.rand(2, 3, 32, 32)
    saved = Detector.load(run, "cpu").model.anomaly_map(images)
    torch.testing.assert_close(model.eval().anomaly_map(images), saved, rtol=1e-4, atol=1e-5)


def test_training_samples_show_masks_that_match_the_pasted_anomalies(tmp_path: Path
                                                                    ) -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    path = tiny().write_training_samples(images, tmp_path / "s.png", n=3)
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    pad, side = 2, 32
    assert grid.shape == (3 * side + 4 * pad, 3 * side + 4 * pad, 3)
    for row in range(3):
        top = pad + row * (side + pad)

        def cell(column: int, top: int = top) -> np.ndarray:
            left = pad + column * (side + pad)
            return grid[top:top + side, left:left + side]

        normal, anomalous, mask = cell(0), cell(1), cell(2)[..., 0] > 127
        expected = (images[row].permute(1, 2, 0).numpy() * 255 + 0.5).astype(int)
        np.testing.assert_array_equal(normal, expected)  # the normal column is the input
        assert mask.any(), "every row gets an anomaly"
        changed = np.abs(anomalous - normal).max(axis=2) > 1
        assert not changed[~mask].any(), "outside the mask the image is untouched"
        assert changed[mask].mean() > 0.5, "inside it the texture is pasted"


def test_resume_gives_bit_identical_weights(toy_data: Path, tmp_path: Path) -> None:
    """DRAEM draws its anomalies from the global RNG: resume must restore its state."""
    def train(run: Path, epochs: int, resume: bool = False) -> None:
        fit(
            "draem",
            toy_data,
            run,
            TrainingPlan(
                model={"base_width": 8, "disc_base_width": 8, "anomaly_source": "procedural"},
                recipe={"epochs": epochs, "batch_size": 8, "image_size": 32},
                resize_mode="stretch",
                seed=4,
            ),
            device="cpu",
            resume=resume,
            progress=False,
        )

    train(tmp_path / "whole", 3)
    train(tmp_path / "parts", 2)
    torch.manual_seed(123)  # a resumed process starts from another RNG state
    train(tmp_path / "parts", 3, resume=True)
    whole, parts = (torch.load(tmp_path / name / "last.pt", weights_only=False)
                    for name in ("whole", "parts"))
    assert parts["epoch"] == whole["epoch"] == 3
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    # the RNG mattered: a run whose state is not restored learns other weights
    train(tmp_path / "reseeded", 2)
    state = torch.load(tmp_path / "reseeded" / "last.pt", weights_only=False)
    state["rng"] = torch.manual_seed(7).get_state()
    torch.save(state, tmp_path / "reseeded" / "last.pt")
    train(tmp_path / "reseeded", 3, resume=True)
    other = torch.load(tmp_path / "reseeded" / "last.pt", weights_only=False)["model"]
    assert any(not torch.equal(v, other[k]) for k, v in whole["model"].items())
