"""Reading images of any kind, dataset layouts, splits and the letterbox geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_claiming
from PIL import Image

from anomap.data import (
    DataError,
    Geometry,
    ImageReadError,
    Sample,
    discover,
    load_image,
    load_mask,
    load_set,
    split_holdout,
    to_pil,
)

MTD = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtd"


def _write(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture()
def mixed_images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (30, 50), dtype=np.uint8)
    indexed = Image.frombytes("P", (50, 30), gray.tobytes())
    indexed.putpalette([v for i in range(256) for v in (i, i, i)])
    return {
        "gray_png": _write(tmp_path / "g.png", Image.fromarray(gray)),
        "rgb_jpg": _write(tmp_path / "c.jpg", Image.fromarray(np.dstack([gray] * 3))),
        "rgba_png": _write(tmp_path / "a.png", Image.fromarray(
            np.dstack([gray] * 3 + [np.full_like(gray, 255)]))),
        "gray16_png": _write(tmp_path / "w.png",
                             Image.fromarray(gray.astype(np.uint16) * 257)),
        "palette_png": _write(tmp_path / "p.png", indexed),
    }


def test_every_mode_loads_as_8bit_rgb(mixed_images: dict[str, Path]) -> None:
    reference = np.asarray(load_image(mixed_images["gray_png"]))
    for name, path in mixed_images.items():
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (50, 30), name
        if name in ("gray16_png", "rgba_png", "palette_png"):
            # 16-bit is scaled 65535 -> 255, so it matches the 8-bit original
            np.testing.assert_allclose(np.asarray(image), reference, atol=1, err_msg=name)


def test_corrupt_file_is_named_and_skipped(tmp_path: Path) -> None:
    good = _write(tmp_path / "ok.png", Image.new("L", (40, 40), 128))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(bad)
    loaded = load_set([Sample(good), Sample(bad)], Geometry(64, "stretch"), progress=False)
    assert len(loaded) == 1 and len(loaded.skipped) == 1 and "broken.png" in loaded.skipped[0]
    with pytest.raises(DataError, match="none of the 1 images"):
        load_set([Sample(bad)], Geometry(64), progress=False)


def test_letterbox_keeps_aspect_and_restore_undoes_it() -> None:
    geometry = Geometry(64, "letterbox")
    photo = Image.fromarray(np.full((200, 100, 3), 200, np.uint8))  # tall: 100 wide, 200 high
    array, box = geometry.apply(photo)
    assert array.shape == (64, 64, 3)
    assert (box.height, box.width, box.top, box.left) == (64, 32, 0, 16)
    amap = torch.zeros(1, 64, 64)
    amap[0, :, 16:48] = 1.0  # only the content region is hot
    restored = geometry.restore(amap, [box])
    assert restored.shape == (1, 64, 64)
    assert torch.allclose(restored, torch.ones_like(restored))  # padding cropped away
    big = geometry.restore(amap, [box], out_size=(200, 100))
    assert big.shape == (1, 200, 100)


def test_mirror_mode_pads_with_the_mirrored_photo_inside_a_margin() -> None:
    geometry = Geometry(64, "mirror", margin=8)
    # a wide photo (96 x 48) whose columns count up: mirroring must show the same ramp reversed
    ramp = np.tile(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (48, 1, 3))
    array, box = geometry.apply(Image.fromarray(ramp))
    assert (box.top, box.left, box.height, box.width) == (20, 8, 24, 48)  # centred in 48 x 48
    photo = array[box.top:box.top + box.height, box.left:box.left + box.width, 0].astype(int)
    assert np.all(np.diff(photo, axis=1) >= 0)  # resized ramp, left to right
    left_pad = array[box.top, :box.left, 0].astype(int)
    assert np.array_equal(left_pad, photo[0, :box.left][::-1])  # the photo's left strip, mirrored
    top_pad = array[:box.top, box.left:box.left + box.width, 0]
    assert np.array_equal(top_pad, np.repeat(photo[:1], box.top, axis=0))  # rows are constant
    amap = torch.zeros(1, 64, 64)
    amap[0, 20:44, 8:56] = 1.0
    assert torch.allclose(geometry.restore(amap, [box]), torch.ones(1, 64, 64))  # margin cropped
    with pytest.raises(ValueError, match="margin 20"):
        Geometry(64, "mirror", margin=20)
    stretched = Geometry(64, "stretch", margin=8)  # squashed into the 48 x 48 inside the margin
    array, box = stretched.apply(Image.fromarray(ramp))
    assert (box.top, box.left, box.height, box.width) == (8, 8, 48, 48)
    assert array.shape == (64, 64, 3)
    inside = torch.zeros(1, 64, 64)
    inside[0, 8:56, 8:56] = 1.0
    assert torch.allclose(stretched.restore(inside, [box]), torch.ones(1, 64, 64))


def test_masks_are_resized_nearest(tmp_path: Path) -> None:
    # one-pixel lines at column 7 and row 21 of a 64x64 mask: nearest-neighbour to 32x32
    # samples source pixel 2k+1 of each axis and keeps both lines whole, at column 3 and
    # row 10; any averaging filter (bilinear, box) with a cut-off thins or drops them
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 7] = 255
    mask[21, :] = 255
    path = _write(tmp_path / "m.png", Image.fromarray(mask))
    resized = Geometry(32, "letterbox").apply_mask(load_mask(path))
    expected = np.zeros((32, 32), dtype=bool)
    expected[:, 3] = expected[10, :] = True
    assert resized.dtype == bool
    np.testing.assert_array_equal(resized, expected)
    tall = np.zeros((90, 30), np.uint8)
    tall[10:40, 5:20] = 255
    stretched = Geometry(64, "letterbox").apply_mask(
        load_mask(_write(tmp_path / "t.png", Image.fromarray(tall))))
    assert stretched.shape == (64, 64) and set(np.unique(stretched)) == {False, True}


def test_mvtec_layout_is_discovered(toy_data: Path) -> None:
    spec = discover(toy_data)
    assert spec.layout == "mvtec" and len(spec.train) == 40
    defective = [s for s in spec.test if s.label == 1]
    assert len(defective) == 15 and all(s.mask_path is not None for s in defective)
    assert {s.defect_type for s in spec.test} == {"good", "hole", "scratch", "stain"}


def test_plain_folder_layout(toy_data: Path) -> None:
    spec = discover(toy_data / "train" / "good", defect_dir=toy_data / "test" / "hole",
                    mask_dir=toy_data / "ground_truth" / "hole")
    assert spec.layout == "folder" and len(spec.train) == 40
    assert len(spec.test) == 5 and all(s.mask_path for s in spec.test)


def test_empty_folder_shows_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/good"):
        discover(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "missing")


def test_holdout_split_is_seeded_and_disjoint() -> None:
    samples = [Sample(Path(f"{i}.png")) for i in range(50)]
    train, val = split_holdout(samples, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert not {s.path for s in train} & {s.path for s in val}
    assert split_holdout(samples, 0.2, seed=7) == (train, val)
    assert split_holdout(samples, 0.2, seed=8) != (train, val)


def test_to_pil_accepts_float_and_chw_arrays() -> None:
    chw = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    image = to_pil(chw)
    assert image.size == (30, 20) and image.mode == "RGB"


@pytest.mark.skipif(not MTD.is_dir(), reason="shared MTD data not present")
def test_reads_real_mtd_images() -> None:
    spec = discover(MTD)
    assert len(spec.train) == 762 and sum(s.label for s in spec.test) == 392
    loaded = load_set(spec.test[:4] + spec.test[-4:], Geometry(256), with_masks=True,
                      progress=False)
    assert loaded.images.shape == (8, 3, 256, 256) and loaded.masks is not None
    assert loaded.masks[-4:].any()


def _png_claiming(path: Path, width: int, height: int) -> Path:
    path.write_bytes(png_claiming(width, height))
    return path


def test_an_oversized_image_is_refused_before_decoding_with_its_size(tmp_path: Path) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", 40000, 40000)
    with pytest.raises(ImageReadError, match=r"bomb.png: refused.*1600000000 pixels"):
        load_image(bomb)
    medium = _png_claiming(tmp_path / "medium.png", 10000, 10000)  # under Pillow's refusal
    with pytest.raises(ImageReadError, match=r"medium.png: 10000x10000 is 100,000,000 pixels"):
        load_image(medium)
    small = _write(tmp_path / "small.png", Image.new("RGB", (40, 30)))
    with pytest.raises(ImageReadError, match="over the limit of 1,000"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=1200).size == (40, 30)


def test_the_demo_can_hold_large_faint_defects_instead(tmp_path: Path) -> None:
    """``defects=LARGE_DEFECT_TYPES``: soft tone changes a fifth to a third of the tile
    across, with their masks."""
    from anomap.demo import LARGE_DEFECT_TYPES, make_demo_dataset

    folder = make_demo_dataset(tmp_path, "brick", n_train=2, n_test_good=1,
                               n_test_per_defect=3, tile_size=96, defects=LARGE_DEFECT_TYPES,
                               name="brick_faint")
    assert folder.name == "brick_faint"
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["faint", "good"]
    for mask_path in sorted((folder / "ground_truth" / "faint").iterdir()):
        mask = np.asarray(Image.open(mask_path)) > 127
        across = mask.any(axis=0).sum()
        assert 96 // 6 <= across <= 96 // 3 + 2  # large: not a speck, not the whole tile


def test_the_demo_can_hold_hairline_cracks_instead(tmp_path: Path) -> None:
    """``defects=FINE_DEFECT_TYPES``: cracks one pixel wide (nothing of them survives an
    erosion by a 3x3 square, beyond where segments cross)."""
    from scipy import ndimage

    from anomap.demo import FINE_DEFECT_TYPES, make_demo_dataset

    folder = make_demo_dataset(tmp_path, "gravel", n_train=2, n_test_good=1,
                               n_test_per_defect=3, tile_size=96, defects=FINE_DEFECT_TYPES,
                               name="gravel_fine")
    assert sorted(p.name for p in (folder / "test").iterdir()) == ["fine", "good"]
    for mask_path in sorted((folder / "ground_truth" / "fine").iterdir()):
        mask = np.asarray(Image.open(mask_path)) > 127
        assert mask.sum() > 20  # a crack, not a speck
        assert ndimage.binary_erosion(mask, np.ones((3, 3), bool)).sum() <= 4
