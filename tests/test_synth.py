"""Synthetic anomalies: Perlin masks, the blend, augmentations, sources, the preview grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from anomap.synth import (
    AUGMENTATIONS,
    AnomalySource,
    ImageSource,
    blend,
    make_anomaly_source,
    perlin_mask,
    random_augment,
    rotate,
    synthesize,
    write_sample_grid,
)
from anomap.synth import augment as aug


class ConstantSource(AnomalySource):
    """Every texture is the same grey: makes the blend checkable by hand."""

    name = "constant"

    def __init__(self, value: float) -> None:
        self.value = value

    def sample(self, batch: int, size: int | tuple[int, int], *,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        h, w = (size, size) if isinstance(size, int) else size
        return torch.full((batch, 3, h, w), self.value, device=device)


# --- Perlin masks -----------------------------------------------------------------------------

def test_perlin_mask_shape_and_binary() -> None:
    masks = perlin_mask(6, 32, 48)
    assert masks.shape == (6, 1, 32, 48)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_perlin_mask_coverage_statistics() -> None:
    # Measured (4 seeds x 1000 masks, 64 px): 3.9-4.1% of pixels, 94-95% of masks non-empty;
    # 5.7% without rotation, matching the official numpy code's 5.4% at 256 px.
    masks = perlin_mask(1000, 64, 64, generator=torch.Generator().manual_seed(7))
    coverage = masks.mean(dim=(1, 2, 3))
    assert 0.03 < coverage.mean() < 0.055
    assert 0.90 < (coverage > 0).float().mean() < 0.98
    assert coverage.max() > 0.15  # a few large blobs exist


def test_perlin_mask_deterministic_and_seed_dependent() -> None:
    torch.manual_seed(3)
    a = perlin_mask(4, 32, 32)
    torch.manual_seed(3)
    b = perlin_mask(4, 32, 32)
    assert torch.equal(a, b)
    c = perlin_mask(4, 32, 32, generator=torch.Generator().manual_seed(3))
    d = perlin_mask(4, 32, 32, generator=torch.Generator().manual_seed(3))
    e = perlin_mask(4, 32, 32, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, d)
    assert not torch.equal(c, e)


# --- blend and synthesize ---------------------------------------------------------------------

def test_blend_formula_exact() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 8, 8, generator=g)
    masks = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    beta = torch.tensor([0.0, 0.25, 0.75])
    out = blend(images, torch.full_like(images, 0.2), masks, beta)
    for i in range(3):
        inside = (1 - beta[i]) * 0.2 + beta[i] * images[i]
        expected = torch.where(masks[i].bool(), inside, images[i])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)


def test_synthesize_applies_blend_with_drawn_mask() -> None:
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out, masks = synthesize(images, ConstantSource(0.9), p_anomaly=1.0, beta_range=(0.3, 0.3),
                            n_augment=0, generator=torch.Generator().manual_seed(2))
    assert out.shape == images.shape and masks.shape == (16, 1, 32, 32)
    expected = images * (1 - masks) + 0.7 * 0.9 * masks + 0.3 * images * masks
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert masks.sum() > 0


class RedSource(AnomalySource):
    """Pure red textures: a grey image must not receive them as colour."""

    name = "red"

    def sample(self, batch: int, size: int | tuple[int, int], *,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        h, w = (size, size) if isinstance(size, int) else size
        texture = torch.zeros(batch, 3, h, w, device=device)
        texture[:, 0] = 1.0
        return texture


def test_grey_images_get_grey_anomalies_colour_images_keep_colour() -> None:
    g = torch.Generator().manual_seed(4)
    grey = torch.rand(6, 1, 32, 32, generator=g).expand(-1, 3, -1, -1).contiguous()
    colour = torch.rand(6, 3, 32, 32, generator=g)
    out, masks = synthesize(torch.cat((grey, colour)), RedSource(), p_anomaly=1.0,
                            beta_range=(0.0, 0.0), n_augment=0,
                            generator=torch.Generator().manual_seed(5))
    inside = masks[:, 0] > 0
    assert inside[:6].any() and inside[6:].any()
    # grey: red (1, 0, 0) becomes its BT.601 luma 0.299 in every channel
    assert torch.allclose(out[:6].permute(1, 0, 2, 3)[:, inside[:6]], torch.tensor(0.299))
    red = out[6:].permute(1, 0, 2, 3)[:, inside[6:]]
    assert torch.all(red[0] == 1.0) and torch.all(red[1:] == 0.0)


def test_about_half_of_the_samples_stay_clean() -> None:
    n = 800
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, masks = synthesize(images, ConstantSource(0.5), n_augment=0,
                            generator=torch.Generator().manual_seed(1))
    empty = masks.flatten(1).amax(1) == 0
    # P(empty) = 0.5 + 0.5 * P(empty Perlin mask), the latter measured 0.10 at 32 px
    # (0.29 at 16 px, 0.06 at 64 px: small images cut fewer blobs): 0.55, sd 0.018.
    assert 0.48 < empty.float().mean() < 0.62
    assert torch.equal(out[empty], images[empty])  # clean samples are untouched
    assert not torch.equal(out[~empty], images[~empty])
    none, none_masks = synthesize(images[:8], ConstantSource(0.5), p_anomaly=0.0)
    assert torch.equal(none, images[:8]) and none_masks.sum() == 0


def test_synthesize_deterministic_under_seed() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    source = make_anomaly_source("procedural")
    torch.manual_seed(11)
    a = synthesize(images, source, p_anomaly=1.0)
    torch.manual_seed(11)
    b = synthesize(images, source, p_anomaly=1.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- augmentations ----------------------------------------------------------------------------

#: augmentations that leave a sample as it is by design, with some probability
SOMETIMES_IDENTITY = {"solarize", "posterize"}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augmentation_changes_the_image_and_keeps_shape_and_range(name: str) -> None:
    # a low-contrast texture: autocontrast and equalize have room to act on it
    x = 0.3 + 0.4 * torch.rand(16, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    y = AUGMENTATIONS[name](x, torch.Generator().manual_seed(1))
    assert torch.equal(x, before), "the input is left as it was"
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert torch.isfinite(y).all()
    changed = (y - x).abs().flatten(1).mean(dim=1) > 0.002
    if name in SOMETIMES_IDENTITY:  # as DRAEM's: solarize half the time, posterize 1-8 bits
        assert int(changed.sum()) >= 4, (name, changed)
    else:
        assert bool(changed.all()), (name, changed)  # every sample, not only some


def test_ten_augmentations() -> None:
    assert len(AUGMENTATIONS) == 10


def test_invert_and_solarize() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(aug.invert(x), 1 - x)
    y = aug.solarize(x, 0.5)
    torch.testing.assert_close(y, torch.where(x >= 0.5, 1 - x, x))
    half = torch.full((1, 3, 2, 2), 0.5)
    assert torch.equal(aug.solarize(half, 0.5), half)  # 0.5 is the fixed point of 1 - x
    assert torch.equal(aug.solarize(x, 2.0), x)  # threshold above 1: unchanged


def test_posterize_gamma_and_brightness() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(aug.posterize(x, 8), (x * 255).round() / 255)
    one_bit = aug.posterize(x, 1)
    assert set(one_bit.unique().mul(255).round().tolist()) <= {0.0, 128.0}
    torch.testing.assert_close(aug.gamma_contrast(x, 2.0), x ** 2)
    grey = torch.full((1, 3, 4, 4), 0.4)
    torch.testing.assert_close(aug.brightness(grey, 1.0, 0.1), grey + 0.1)


def test_pil_equivalents() -> None:
    """sharpness, autocontrast and equalize reproduce PIL (what imgaug's pillike ops call)."""
    rng = np.random.default_rng(0)
    array = (rng.random((32, 32, 3)) ** 2 * 200 + 20).astype(np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255

    def ours(y: torch.Tensor) -> np.ndarray:
        return y[0].permute(1, 2, 0).numpy() * 255

    image = Image.fromarray(array)
    np.testing.assert_allclose(ours(aug.equalize(x)), np.asarray(ImageOps.equalize(image)),
                               atol=1e-3)
    np.testing.assert_allclose(ours(aug.autocontrast(x, 0.1)),
                               np.asarray(ImageOps.autocontrast(image, cutoff=10)), atol=1.01)
    np.testing.assert_allclose(ours(aug.sharpness(x, 2.0)),
                               np.asarray(ImageEnhance.Sharpness(image).enhance(2.0)), atol=1.01)


def test_hsv_round_trip_and_rotate() -> None:
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(aug.hsv_to_rgb(aug.rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug.hue_saturation(x, 0.0, 0.0), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 0.0), x, atol=1e-5, rtol=0)
    quarter = rotate(x, 90.0)
    assert any(torch.allclose(quarter, torch.rot90(x, k, (2, 3)), atol=1e-4) for k in (1, -1))


def test_random_augment_deterministic_per_generator() -> None:
    x = torch.rand(6, 3, 16, 16)
    a = random_augment(x, generator=torch.Generator().manual_seed(5))
    b = random_augment(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(random_augment(x, 0), x)


# --- sources ----------------------------------------------------------------------------------

def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), value, dtype=np.uint8)).save(path)


def test_from_folder_skips_corrupt_files_and_names_them(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", 10)
    _write_png(tmp_path / "nested" / "deeper" / "b.jpg", 200)
    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match="bad.png"):
        source = AnomalySource.from_folder(tmp_path, 16)
    assert len(source) == 3 and len(source.skipped) == 1 and "bad.png" in source.skipped[0]
    textures = source.sample(6, 16, generator=torch.Generator().manual_seed(0))
    assert textures.shape == (6, 3, 16, 16)
    values = set((textures * 255).round().unique().tolist())
    assert values <= {10.0, 200.0}  # whole-image crops of the two flat pictures


def test_from_folder_lazy_mode_skips_truncated_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "good.png", 50)
    _write_png(tmp_path / "cut.png", 90)
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixels missing
    source = ImageSource.from_folder(tmp_path, 8, preload=False)
    with pytest.warns(UserWarning, match="cut.png"):
        textures = source.sample(8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(textures, torch.full_like(textures, 50 / 255), atol=1e-6)


def test_from_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        AnomalySource.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        AnomalySource.from_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        make_anomaly_source("no-such-source")
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="could be read"):
        AnomalySource.from_folder(tmp_path)


@pytest.mark.parametrize("spec", [None, "builtin", "procedural", "skimage"])
def test_offline_sources(spec: str | None) -> None:
    source = make_anomaly_source(spec, 32)
    a = source.sample(6, 32, generator=torch.Generator().manual_seed(0))
    b = source.sample(6, 32, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert a.std() > 0.02  # real texture, not a flat fill
    assert source.sample(0, 32).shape == (0, 3, 32, 32)


def test_folder_spec(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", 77)
    source = make_anomaly_source(tmp_path, 16)
    assert source.sample(2, 16).shape == (2, 3, 16, 16)


# --- preview ----------------------------------------------------------------------------------

def test_write_sample_grid(tmp_path: Path) -> None:
    images = torch.rand(5, 3, 32, 32)
    path = write_sample_grid(images, make_anomaly_source("procedural"), tmp_path / "g.png", n=3,
                             generator=torch.Generator().manual_seed(0))
    with Image.open(path) as grid:
        assert grid.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)
        assert grid.mode == "RGB"
        array = np.asarray(grid)
    mask_column = array[2:34, 2 + 2 * 34:2 + 2 * 34 + 32]
    assert set(np.unique(mask_column).tolist()) <= {0, 255}
    assert math.isclose(float(np.asarray(array[0]).mean()), 255.0)  # white gap on top
