"""Images in, tensors out: reading any image file, finding datasets on disk, and
the geometry that maps between a photo and the square the network sees.

Two layouts are understood:

* MVTec AD: ``ROOT/train/good``, ``ROOT/test/<type>`` (``good`` = normal) and
  ``ROOT/ground_truth/<type>/<stem>_mask.png``.
* Plain folders: a folder of normal images, optionally a folder of defective
  images and a folder of their masks (``<stem>.png`` or ``<stem>_mask.png``).

A file that cannot be read never stops the work: it is reported by path and
skipped, and the count of skipped files travels with the loaded set.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import random
import re
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: the file formats anomap reads, at every entry point (training, predict, the
#: service): Pillow never tries another (its EPS reader, for one, runs Ghostscript)
#: (a camera's multi-picture JPEG opens through JPEG, as Pillow's MPO)
READABLE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
#: the names of those formats' files: what a folder is searched for
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in (*READABLE_FORMATS, "MPO"))
RESIZE_MODES = ("letterbox", "mirror", "stretch")
_FILL = {"letterbox": "edge", "mirror": "symmetric", "stretch": "edge"}  # np.pad modes

MVTEC_LAYOUT_HELP = """\
Expected one category of a known layout. MVTec AD (and MVTec LOCO AD):
    DIR/train/good/*.png|jpg            defect-free training images
    DIR/test/good/*                     defect-free test images
    DIR/test/<defect_type>/*            defective test images
    DIR/ground_truth/<defect_type>/<stem>_mask.png   masks (optional; LOCO: a
                                        folder <stem>/ of masks, united)
MVTec 3D-AD (its RGB images): DIR/train/good/rgb/*, DIR/test/<type>/rgb/*,
masks DIR/test/<type>/gt/*. VisA: DIR/Data/Images/{Normal,Anomaly}/* with the
split DIR/../split_csv/1cls.csv. Or a plain folder of defect-free images
(DIR/*.png|jpg), with defective images in DIR/defect/ (or --defect-dir), masks
in DIR/mask/ (or --mask-dir) and defect-free test images in DIR/test_good/."""
#: VisA's split file, beside the category folders
VISA_SPLIT = Path("split_csv") / "1cls.csv"
#: a plain folder's conventional subfolders: defective images, masks, normal test images
PLAIN_DEFECTS, PLAIN_MASKS, PLAIN_TEST_NORMALS = "defect", "mask", "test_good"


class DataError(ValueError):
    """A dataset that cannot be used as given; the message says what to change."""


class ImageReadError(DataError):
    """One image file that cannot be decoded; ``reason`` is a short category
    (``not found``, ``over pixel limit``, ``cannot decode``) for summaries."""

    def __init__(self, message: str, reason: str = "cannot decode") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One image on disk and what we know about it."""

    path: Path
    label: int = 0  # 0 = normal, 1 = defective
    defect_type: str = "good"
    mask_path: Path | None = None


# --------------------------------------------------------------------------- reading


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, 16-bit I;16/I, float F) -> 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


#: the most pixels an image may have before anomap refuses to decode it (Pillow's own
#: warning limit): a few kilobytes of PNG can claim 40000 x 40000 pixels
DEFAULT_MAX_PIXELS = 89_478_485
_max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(limit: int) -> None:
    """Change the pixel limit of every reader in this process (train, test, predict,
    the service), as ``--max-pixels`` does; Pillow's own bomb check follows it."""
    global _max_pixels
    if limit < 1:
        raise ValueError(f"--max-pixels must be positive, got {limit}")
    _max_pixels = int(limit)
    Image.MAX_IMAGE_PIXELS = max(int(limit), DEFAULT_MAX_PIXELS)


def max_pixels() -> int:
    return _max_pixels


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _said(error: BaseException, label: str) -> str:
    """Pillow's message with the repr of an in-memory file (and its address) replaced
    by the file's name."""
    return _OBJECT_REPR.sub(label, str(error))


@contextlib.contextmanager
def _opened(path: str | Path | BinaryIO, max_pixels: int | None, name: str | None
            ) -> Iterator[Image.Image]:
    """An image opened (header read, pixels not decoded) and checked: a regular
    file, a readable format, within the pixel limit. Every failure is an
    :class:`ImageReadError` naming the file."""
    is_file = isinstance(path, str | Path)
    if is_file:
        path = Path(path)
    label = name or (str(path) if is_file else "upload")
    limit = _max_pixels if max_pixels is None else max_pixels
    try:
        if is_file:
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise ImageReadError(f"{label}: a folder, not an image file", "not a file")
            if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
                raise ImageReadError(f"{label}: not a regular file (a pipe, socket or "
                                     "device)", "not a file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            handle = Image.open(path, formats=READABLE_FORMATS)
        with handle:
            width, height = handle.size
            if width * height > limit:
                raise ImageReadError(
                    f"{label}: {width}x{height} is {width * height:,} pixels, over the limit "
                    f"of {limit:,}; raise it (max_pixels, --max-pixels) if the file "
                    "is trusted", "over pixel limit")
            yield handle
    except FileNotFoundError as error:
        reason = "dangling link" if is_file and path.is_symlink() else "not found"
        raise ImageReadError(f"{label}: {reason}", reason) from error
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:  # Pillow refuses it even to open
        raise ImageReadError(f"{label}: refused, too many pixels to decode safely "
                             f"({_said(error, label)}); raise --max-pixels if the file is "
                             "trusted", "over pixel limit") from error
    except UnidentifiedImageError as error:
        raise ImageReadError(f"{label}: not an image anomap can read (formats: "
                             f"{', '.join(READABLE_FORMATS)})", "not an image") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageReadError(f"{label}: cannot decode image ({_said(error, label)})") from error


def read_header(path: str | Path | BinaryIO, max_pixels: int | None = None,
                name: str | None = None) -> tuple[int, int]:
    """An image's (width, height) from its header, checked as :func:`load_image`
    checks it, without decoding a pixel: what a budget reckons with first."""
    with _opened(path, max_pixels, name) as handle:
        return handle.size


def load_image(path: str | Path | BinaryIO, max_pixels: int | None = None,
               name: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode an image file fully into 8-bit RGB, or raise ImageReadError naming it.

    ``path`` may be an open binary file (an upload) named by ``name``; its content
    decides the format, never its name, and only :data:`READABLE_FORMATS` are read.
    The size in the header is checked before decoding: an image over
    ``max_pixels`` (default: the process's limit, :func:`set_max_pixels`) is
    refused with its size and the limit, so one oversized file never stops a run.
    ``draft``: a JPEG is decoded at the smallest power-of-two reduction that keeps
    both sides at least ``draft`` pixels (libjpeg scales while decoding), for a
    network smaller than the photo. An animated image gives its first frame."""
    label = name or (str(path) if isinstance(path, str | Path) else "upload")
    with _opened(path, max_pixels, name) as handle:
        try:
            if draft is not None and handle.format == "JPEG":
                handle.draft("RGB", (draft, draft))
            handle.load()
            ImageOps.exif_transpose(handle, in_place=True)  # a copy of a large photo otherwise
            return _to_rgb(handle)  # the one copy: the handle's pixels go when it closes
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise ImageReadError(f"{label}: cannot decode image ({_said(error, label)})"
                                 ) from error


def load_mask(path: str | Path) -> np.ndarray:
    """A ground-truth mask as a bool array (any non-zero pixel is defective); a
    folder of masks (MVTec LOCO: one per defect of the image) is their union."""
    path = Path(path)
    if path.is_dir():
        parts = [load_mask(part) for part in list_images(path)]
        if not parts:
            raise ImageReadError(f"{path}: mask folder holds no masks")
        return np.logical_or.reduce(parts)
    try:
        with Image.open(path) as handle:
            handle.load()
            array = np.asarray(handle)
    except FileNotFoundError as error:
        raise ImageReadError(f"{path}: mask file not found") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"{path}: cannot decode mask ({error})") from error
    if array.ndim == 3:
        array = array[..., :3].max(axis=2)
    return array > 0


def to_pil(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    """Accept what a library user has at hand: a path, a PIL image or an array."""
    if isinstance(image, str | Path):
        return load_image(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return _to_rgb(Image.fromarray(array))


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """Where the photo's content lies inside the network's square input."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class Geometry:
    """How a photo of any size becomes a ``size`` x ``size`` network input.

    ``stretch`` squashes the photo to the square (the papers' choice);
    ``letterbox`` keeps the aspect ratio and pads the rest with the edge pixels,
    so elongated parts (MTD tiles go from 1:2.8 to 2.7:1) keep their shape;
    ``mirror`` keeps the aspect ratio too but fills the rest with the photo
    mirrored at its sides, so the networks see texture, not streaks, beyond
    every edge. ``margin`` pixels on each side are kept free of the photo (and
    filled the same way), so its edges lie away from the networks' zero padding.
    Maps come back through :meth:`restore`, so metrics, scores and overlays
    always refer to the photo itself, never to the padding.
    """

    size: int = 256
    mode: str = "letterbox"
    margin: int = 0

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r}: choose one of {RESIZE_MODES}")
        if self.size < 32:
            raise ValueError(f"image size {self.size} is too small (minimum 32)")
        if not 0 <= self.margin <= self.size // 4:
            raise ValueError(f"margin {self.margin}: choose 0 to {self.size // 4} pixels "
                             f"(a quarter of the image size {self.size})")

    @property
    def decode_floor(self) -> int:
        """The fewest pixels a side of a JPEG is decoded at: eight times the network's
        input, so that libjpeg's reduced decoding (:func:`load_image`'s ``draft``)
        spares a 6000 px photo most of its memory while the network, which sees
        ``size`` pixels, sees the same photo. Every reader of a run uses it."""
        return 8 * self.size

    def box_for(self, width: int, height: int) -> Box:
        inner = self.size - 2 * self.margin
        if self.mode == "stretch":
            return Box(self.margin, self.margin, inner, inner)
        scale = inner / max(width, height)
        new_w = max(1, min(inner, round(width * scale)))
        new_h = max(1, min(inner, round(height * scale)))
        return Box((self.size - new_h) // 2, (self.size - new_w) // 2, new_h, new_w)

    def apply(self, image: Image.Image) -> tuple[np.ndarray, Box]:
        """PIL RGB -> (size, size, 3) uint8 array and its content box."""
        box = self.box_for(*image.size)
        resized = np.asarray(image.resize((box.width, box.height), Image.BILINEAR))
        if (box.height, box.width) == (self.size, self.size):
            return resized, box
        pad = (
            (box.top, self.size - box.top - box.height),
            (box.left, self.size - box.left - box.width),
            (0, 0),
        )
        return np.pad(resized, pad, mode=_FILL[self.mode]), box

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """Ground truth in the evaluation frame: the photo stretched to size x size."""
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        return np.asarray(image.resize((self.size, self.size), Image.NEAREST)) > 127

    def restore(self, maps: torch.Tensor, boxes: Sequence[Box], out_size: tuple[int, int] | None
                = None) -> torch.Tensor:
        """Network-frame maps (B, S, S) -> the photo's frame.

        Crops each map to its content box and resizes it to ``out_size``
        (default: S x S, the evaluation frame the ground truth is resized to).
        """
        height, width = out_size or (self.size, self.size)
        if self.mode == "stretch" and not self.margin and (height, width) == tuple(maps.shape[-2:]):
            return maps
        restored = [
            F.interpolate(
                amap[None, None, b.top:b.top + b.height, b.left:b.left + b.width],
                size=(height, width), mode="bilinear", align_corners=False,
            )[0, 0]
            for amap, b in zip(maps, boxes, strict=True)
        ]
        return torch.stack(restored)


def describe_geometry(geometry: dict[str, Any]) -> str:
    """A run's ``config["geometry"]`` in words, e.g. ``288 px mirror, margin 16``."""
    text = f"{geometry.get('size')} px {geometry.get('mode')}"
    return text + (f", margin {geometry['margin']}" if geometry.get("margin") else "")


# --------------------------------------------------------------------------- discovery


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted, hidden files ignored."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def is_mvtec_layout(root: Path) -> bool:
    return (root / "train" / "good").is_dir()


def layout_of(root: Path) -> str | None:
    """Which layout a category folder is in: mvtec3d, visa, mvtec or folder (images
    directly in it); None: none of them."""
    if (root / "train" / "good" / "rgb").is_dir():
        return "mvtec3d"
    if (root / "Data" / "Images").is_dir():
        return "visa"
    if is_mvtec_layout(root):
        return "mvtec"
    if root.is_dir() and list_images(root):
        return "folder"
    return None


def _find_mask(mask_dir: Path | None, stem: str) -> Path | None:
    if mask_dir is None:
        return None
    if (mask_dir / stem).is_dir():  # MVTec LOCO: a folder of masks per image
        return mask_dir / stem
    for name in (f"{stem}_mask", stem):
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            candidate = mask_dir / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


@dataclass
class DatasetSpec:
    """Where the training and test images of one product are."""

    root: Path
    train: list[Sample]
    test: list[Sample]
    layout: str  # "mvtec", "mvtec3d", "visa" or "folder"
    warnings: list[str] = field(default_factory=list)


def discover(data: str | Path, defect_dir: str | Path | None = None,
             mask_dir: str | Path | None = None, test_normal_dir: str | Path | None = None
             ) -> DatasetSpec:
    """Find the images of one category, whichever layout it uses (MVTEC_LAYOUT_HELP)."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder.\n{MVTEC_LAYOUT_HELP}")
    layout = None if defect_dir is not None else layout_of(root)
    if layout == "mvtec3d":
        return _discover_mvtec3d(root)
    if layout == "visa":
        return _discover_visa(root)
    if layout == "mvtec":
        return _discover_mvtec(root)
    if defect_dir is None and (root / PLAIN_DEFECTS).is_dir():
        defect_dir = root / PLAIN_DEFECTS
        mask_dir = mask_dir or ((root / PLAIN_MASKS) if (root / PLAIN_MASKS).is_dir() else None)
        test_normal_dir = test_normal_dir or (
            (root / PLAIN_TEST_NORMALS) if (root / PLAIN_TEST_NORMALS).is_dir() else None)
    return _discover_folder(root, defect_dir, mask_dir, test_normal_dir)


def _discover_mvtec3d(root: Path) -> DatasetSpec:
    """MVTec 3D-AD's RGB images: <split>/<type>/rgb/, masks in <split>/<type>/gt/."""
    train = [Sample(p) for p in list_images(root / "train" / "good" / "rgb")]
    if not train:
        raise DataError(f"{root / 'train' / 'good' / 'rgb'}: no images found")
    test, warnings = [], []
    types = sorted(p for p in (root / "test").glob("*") if (p / "rgb").is_dir())
    for type_dir in types:
        label = 0 if type_dir.name == "good" else 1
        gt_dir = type_dir / "gt"
        for path in list_images(type_dir / "rgb"):
            mask = _find_mask(gt_dir if gt_dir.is_dir() else None, path.stem)
            if label and mask is None:
                warnings.append(f"{path}: no mask in {gt_dir}")
            test.append(Sample(path, label, type_dir.name, mask))
    return DatasetSpec(root, train, test, "mvtec3d", warnings)


def _discover_visa(root: Path) -> DatasetSpec:
    """A VisA category: its rows of the split CSV (object, split, label, image, mask;
    paths relative to the CSV's parent's parent), found beside the category."""
    split = next((c for c in (root.parent / VISA_SPLIT, root / VISA_SPLIT) if c.is_file()),
                 None)
    if split is None:
        raise DataError(f"{root}: a VisA category needs its split file at "
                         f"{root.parent / VISA_SPLIT} (VisA's split_csv/1cls.csv)")
    base = split.parent.parent
    train, test, warnings = [], [], []
    with split.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("object") != root.name:
                continue
            path = base / row["image"]
            if row["split"] == "train":
                train.append(Sample(path))
                continue
            label = int(row["label"] != "normal")
            mask = base / row["mask"] if label and row.get("mask") else None
            if label and (mask is None or not mask.is_file()):
                warnings.append(f"{path}: no mask ({row.get('mask') or 'none listed'})")
                mask = None
            test.append(Sample(path, label, "anomaly" if label else "good", mask))
    if not train:
        raise DataError(f"{split}: no training rows for object {root.name!r}")
    return DatasetSpec(root, train, test, "visa", warnings)


def _discover_mvtec(root: Path) -> DatasetSpec:
    train = [Sample(p) for p in list_images(root / "train" / "good")]
    if not train:
        raise DataError(f"{root / 'train' / 'good'}: no images found.\n{MVTEC_LAYOUT_HELP}")
    test: list[Sample] = []
    warnings: list[str] = []
    test_root = root / "test"
    if test_root.is_dir():
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect_type = type_dir.name
            label = 0 if defect_type == "good" else 1
            gt_dir = root / "ground_truth" / defect_type
            for path in list_images(type_dir):
                mask = _find_mask(gt_dir if gt_dir.is_dir() else None, path.stem)
                if label and mask is None and gt_dir.is_dir():
                    warnings.append(f"{path}: no mask in {gt_dir}")
                test.append(Sample(path, label, defect_type, mask))
    return DatasetSpec(root, train, test, "mvtec", warnings)


def _discover_folder(root: Path, defect_dir: str | Path | None, mask_dir: str | Path | None,
                     test_normal_dir: str | Path | None) -> DatasetSpec:
    train = [Sample(p) for p in list_images(root)]
    if not train:
        raise DataError(f"{root}: no images found directly in this folder.\n{MVTEC_LAYOUT_HELP}")
    test: list[Sample] = []
    warnings: list[str] = []
    if test_normal_dir is not None:
        test += [Sample(p) for p in list_images(Path(test_normal_dir))]
    if defect_dir is not None:
        defect_root = Path(defect_dir)
        if not defect_root.is_dir():
            raise DataError(f"{defect_root}: defect folder does not exist")
        masks = Path(mask_dir) if mask_dir is not None else None
        if masks is not None and not masks.is_dir():
            raise DataError(f"{masks}: mask folder does not exist")
        for path in list_images(defect_root):
            mask = _find_mask(masks, path.stem)
            if masks is not None and mask is None:
                warnings.append(f"{path}: no mask named {path.stem}.png or {path.stem}_mask.png")
            test.append(Sample(path, 1, "defect", mask))
    return DatasetSpec(root, train, test, "folder", warnings)


def split_holdout(samples: Sequence[Sample], fraction: float = 0.2, seed: int = 0
                  ) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of the normal training images into (train, validation).

    Validation images select the checkpoint and calibrate the threshold, so no
    decision ever looks at test data.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    order = list(samples)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * fraction))
    if fraction > 0 and len(order) >= 2:
        n_val = max(1, min(n_val, len(order) - 1))
    return order[n_val:], order[:n_val]


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedSet:
    """A set of samples decoded once into memory, in the network frame.

    Holding uint8 tensors (196 KB per 256x256 image) lets every epoch skip
    decoding, which on a 2-core machine would otherwise compete with training.
    """

    samples: list[Sample]
    images: torch.Tensor  # (N, 3, S, S) uint8, network frame
    boxes: list[Box]
    masks: torch.Tensor | None  # (N, S, S) bool, evaluation frame
    skipped: list[str]  # "path: reason" for files that could not be read

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def load_set(samples: Iterable[Sample], geometry: Geometry, *, with_masks: bool = False,
             desc: str = "loading", progress: bool = True) -> LoadedSet:
    """Decode and resize ``samples``; unreadable files are skipped and reported."""
    samples = list(samples)
    kept: list[Sample] = []
    arrays: list[np.ndarray] = []
    boxes: list[Box] = []
    masks: list[np.ndarray] = []
    skipped: list[str] = []
    blank = np.zeros((geometry.size, geometry.size), dtype=bool)
    for sample in tqdm(samples, desc=desc, disable=not progress, leave=False, unit="img"):
        try:
            array, box = geometry.apply(load_image(sample.path, draft=geometry.decode_floor))
            mask = blank
            if with_masks and sample.mask_path is not None:
                mask = geometry.apply_mask(load_mask(sample.mask_path))
        except ImageReadError as error:
            log.warning("skipping %s", error)
            skipped.append(str(error))
            continue
        kept.append(sample)
        arrays.append(array)
        boxes.append(box)
        masks.append(mask)
    if not kept:
        shown = "\n  ".join(skipped[:5])
        raise DataError(f"none of the {len(samples)} images could be read:\n  {shown}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    mask_tensor = torch.from_numpy(np.stack(masks)) if with_masks else None
    return LoadedSet(kept, images, boxes, mask_tensor, skipped)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,S,S) -> float in [0, 1], the input every method receives."""
    return images.float().div_(255.0)
