"""Data-layer experiment: STPM on fixed-scale square windows instead of one square per photo.

MTD's photos range from 103 to 632 px a side, so the letterbox (anomap's
default) shows each tile at its own scale. Here every photo is instead scaled
by one factor (``--scale``; 1.0 = native pixels), edge-padded up to the window
where it is smaller, and covered by ``--window`` px squares overlapping by at
least a quarter. The student trains on the windows of the normal training
photos; at test time the window maps are averaged where they overlap, the
padding is cut off, the image score is the method's score of that map, and the
map is resized to the same evaluation frame as ``mtd_accuracy.py`` uses, so
the numbers compare one to one with its results.

    python benchmarks/mtd_tiling.py --name stpm_lite0_windows_s1.0_e5 --scale 1.0 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mtd_accuracy import DEFAULT_DATA, save_result, training_time
from PIL import Image
from tqdm.auto import tqdm

from anomap import metrics
from anomap.data import Geometry, Sample, discover, load_image, load_mask, to_float
from anomap.evaluate import per_defect_type_auroc
from anomap.run import Detector
from anomap.runfolder import load_history
from anomap.scoring import image_score
from anomap.train import TrainingPlan, fit


@dataclass(frozen=True)
class Windows:
    """Scale a photo by one factor and cover it with overlapping squares."""

    scale: float
    size: int = 256

    def starts(self, length: int) -> list[int]:
        """Window offsets along one side, evenly spread, overlap >= size / 4."""
        if length <= self.size:
            return [0]
        n = math.ceil((length - self.size) / (0.75 * self.size)) + 1
        return [round(i * (length - self.size) / (n - 1)) for i in range(n)]

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Scaled, edge-padded (H, W, 3) array and the photo's (top, left, h, w) in it."""
        width, height = max(1, round(image.width * self.scale)), max(1, round(image.height
                                                                              * self.scale))
        array = np.asarray(image.resize((width, height), Image.BILINEAR))
        pad_h, pad_w = max(0, self.size - height), max(0, self.size - width)
        top, left = pad_h // 2, pad_w // 2
        array = np.pad(array, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode="edge")
        return array, (top, left, height, width)

    def corners(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        return [(y, x) for y in self.starts(shape[0]) for x in self.starts(shape[1])]

    def cut(self, array: np.ndarray) -> list[np.ndarray]:
        return [array[y:y + self.size, x:x + self.size] for y, x in self.corners(array.shape)]


def write_training_windows(samples: list[Sample], windows: Windows, folder: Path) -> int:
    """The normal training photos as window PNGs: a plain folder anomap trains on."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for sample in tqdm(samples, desc="cutting windows", leave=False):
        array, _ = windows.prepare(load_image(sample.path))
        for k, window in enumerate(windows.cut(array)):
            Image.fromarray(window).save(folder / f"{sample.path.stem}_{k}.png")
            count += 1
    return count


@torch.no_grad()
def score_photo(detector: Detector, windows: Windows, image: Image.Image
                ) -> tuple[float, torch.Tensor]:
    """Image score and the stitched map of the photo (its scaled size, no padding)."""
    array, (top, left, height, width) = windows.prepare(image)
    corners = windows.corners(array.shape)
    batch = to_float(torch.from_numpy(np.stack(windows.cut(array))).permute(0, 3, 1, 2))
    maps, _ = detector.network_maps_and_scores(batch)
    total = torch.zeros(array.shape[:2])
    count = torch.zeros(array.shape[:2])
    for (y, x), amap in zip(corners, maps, strict=True):
        total[y:y + windows.size, x:x + windows.size] += amap
        count[y:y + windows.size, x:x + windows.size] += 1
    photo_map = (total / count)[top:top + height, left:left + width]
    return float(image_score(photo_map[None], detector.reader.options)[0]), photo_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/anomap_runs"))
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: MTD data not found (see ../shared/data/README.md)")
    spec = discover(args.data)
    windows = Windows(args.scale, args.window)
    run, folder = args.runs / args.name, args.runs / f"{args.name}_windows"
    if not folder.is_dir():
        print("training windows:", write_training_windows(spec.train, windows, folder))
    if not (run / "calibration.json").is_file():
        fit(
            "stpm",
            folder,
            run,
            TrainingPlan(
                recipe={"epochs": args.epochs, "image_size": args.window},
                resize_mode="stretch",
                seed=args.seed,
            ),
            device="cpu",
            resume=(run / "last.pt").exists(),
            progress=False,
        )
    history = load_history(run)

    detector = Detector.load(run, "cpu")
    frame = Geometry(args.window, "stretch")  # mtd_accuracy's evaluation frame
    scores, maps, masks = [], [], []
    started = time.perf_counter()
    for sample in tqdm(spec.test, desc="scoring", leave=False):
        score, photo_map = score_photo(detector, windows, load_image(sample.path))
        scores.append(score)
        maps.append(F.interpolate(photo_map[None, None], size=(args.window, args.window),
                                  mode="bilinear", align_corners=False)[0, 0].numpy())
        masks.append(frame.apply_mask(load_mask(sample.mask_path)) if sample.mask_path
                     else np.zeros((args.window, args.window), dtype=bool))
    seconds = time.perf_counter() - started
    labels = np.array([s.label for s in spec.test])
    result = metrics.evaluate_all(labels, np.array(scores), np.stack(masks), np.stack(maps))
    config = json.loads((run / "config.json").read_text())
    config["geometry"] = {"size": args.window, "mode": f"windows at scale {args.scale}"}
    record = {
        "name": args.name,
        "command": "python " + " ".join(sys.argv),
        "metrics": {**{k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro",
                                              "image_f1_max")},
                    "n_images": len(spec.test), "images_per_second":
                    round(len(spec.test) / seconds, 3)},
        "per_defect_type_image_auroc": per_defect_type_auroc(spec.test, np.array(scores)),
        "best_epoch": int(next(h["epoch"] for h in reversed(history) if h["best"])),
        "epochs": len(history),
        "train_windows": len(list(folder.iterdir())),
        **training_time(history),
        "config": config,
    }
    save_result(record)


if __name__ == "__main__":
    main()
