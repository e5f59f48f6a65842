"""Built-in demo data: real texture photos shipped by scikit-image (brick,
grass, gravel), cut into tiles, with scratches, holes and stains drawn into
some of them and exact masks saved beside, in the MVTec AD layout.

It lets anomap be tried, and tested, on a fresh offline machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "hole", "stain")
#: not in the default set: a large, faint change of tone (a fifth to a third of the tile
#: across, 20-30 grey levels), the kind of defect MTD has and local features see little of
LARGE_DEFECT_TYPES = ("faint",)
#: not in the default set: hairline cracks (one pixel wide, 40-60 grey levels), finer than
#: the stride of the middle levels PatchCore reads
FINE_DEFECT_TYPES = ("fine",)


def texture_photo(name: str) -> np.ndarray:
    """A 512x512 grayscale photo from scikit-image's bundled data (no download)."""
    import skimage.data

    if name not in TEXTURES:
        raise ValueError(f"unknown demo texture {name!r}; choose one of {TEXTURES}")
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _tile(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(0, photo.shape[0] - size + 1))
    left = int(rng.integers(0, photo.shape[1] - size + 1))
    tile = photo[top:top + size, left:left + size].astype(np.float32)
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    tile = tile * rng.uniform(0.95, 1.05) + rng.uniform(-6, 6)  # lighting varies a little
    return np.clip(tile, 0, 255)


def _defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    margin = size // 6
    if kind == "scratch":
        points = [tuple(rng.integers(margin, size - margin, 2).tolist()) for _ in range(3)]
        draw.line(points, fill=255, width=int(rng.integers(2, 4)), joint="curve")
    elif kind == "hole":
        cx, cy = rng.integers(margin, size - margin, 2)
        rx, ry = rng.integers(size // 28, size // 14, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif kind == "stain":
        cx, cy = rng.integers(margin, size - margin, 2)
        for _ in range(4):  # a few overlapping ellipses make an irregular blob
            ox, oy = rng.integers(-size // 16, size // 16, 2)
            rx, ry = rng.integers(size // 20, size // 10, 2)
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    elif kind == "fine":  # a hairline crack: one pixel wide, a few segments
        points = [tuple(rng.integers(margin, size - margin, 2).tolist()) for _ in range(4)]
        draw.line(points, fill=255, width=1)
    elif kind == "faint":
        cx, cy = rng.integers(size // 3, size - size // 3, 2)
        rx, ry = rng.integers(size // 10, size // 6, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    return np.asarray(canvas) > 127


def _apply_defect(tile: np.ndarray, mask: np.ndarray, kind: str,
                  rng: np.random.Generator) -> np.ndarray:
    soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
        ImageFilter.GaussianBlur(1.0)), dtype=np.float32) / 255.0
    if kind == "scratch":
        target = np.full_like(tile, 235.0 if rng.random() < 0.5 else 20.0)
    elif kind == "hole":
        target = np.full_like(tile, rng.uniform(0, 25))
    elif kind == "fine":  # a hairline: hard-edged, darker or lighter than around it
        soft = mask.astype(np.float32) * 0.8
        target = tile + rng.choice([-1.0, 1.0]) * rng.uniform(40.0, 60.0)
    elif kind == "faint":  # the texture kept, its tone shifted a little, soft edges
        soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(
            ImageFilter.GaussianBlur(6.0)), dtype=np.float32) / 255.0
        target = tile + rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 30.0)
    else:  # a stain changes the tone but keeps some texture
        target = tile * 0.45 + rng.choice([-1.0, 1.0]) * 70.0 + 40.0
    return np.clip(tile * (1 - soft) + target * soft, 0, 255)


def make_demo_dataset(root: str | Path, texture: str = "brick", *, n_train: int = 60,
                      n_test_good: int = 16, n_test_per_defect: int = 8, tile_size: int = 160,
                      seed: int = 0, defects: tuple[str, ...] = DEFECT_TYPES,
                      name: str | None = None) -> Path:
    """Write an MVTec-layout dataset under ``root/<name or texture>`` and return that
    folder (``defects``: which kinds, e.g. :data:`LARGE_DEFECT_TYPES` or
    :data:`FINE_DEFECT_TYPES`)."""
    rng = np.random.default_rng(seed)
    photo = texture_photo(texture)
    out = Path(root) / (name or texture)

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(path)

    for i in range(n_train):
        save(_tile(photo, tile_size, rng), out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(_tile(photo, tile_size, rng), out / "test" / "good" / f"{i:03d}.png")
    for kind in defects:
        for i in range(n_test_per_defect):
            mask = _defect_mask(kind, tile_size, rng)
            tile = _apply_defect(_tile(photo, tile_size, rng), mask, kind, rng)
            save(tile, out / "test" / kind / f"{i:03d}.png")
            save(mask.astype(np.uint8) * 255, out / "ground_truth" / kind / f"{i:03d}_mask.png")
    return out
