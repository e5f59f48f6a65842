"""Thresholds from held-out normal images, and retuning a trained run.

The threshold is a quantile of the scores of normal images the model never
trained on (the held-out 20%), so that a pass/fail verdict never sees test data.
Options that change how a map is read but not the weights (STPM's map levels,
the score window, the map normalisation, the quantile) can be changed on a
trained run with
``anomap retune``: it writes a new run folder with the same weights and a
threshold recalibrated on the same held-out images.
"""

from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomap.data import LoadedSet, load_set
from anomap.files import save_json
from anomap.methods import get_method
from anomap.metrics import calibrate_threshold
from anomap.runfolder import (
    CALIBRATION_FILE,
    HISTORY_FILE,
    POSITION_STATS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    RunConfig,
    RunExistsError,
    load_calibration,
    load_model,
    normal_split,
    resolve_device,
)
from anomap.scoring import MapReader, image_score
from anomap.standardize import PositionStats, check_normalization, require_enough_images

log = logging.getLogger(__name__)

#: calibration "source" when a run holds no images out (--val-fraction 0)
NO_SPLIT_SOURCE = "training images (no validation split)"


def display_range(maps: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Heat-map colour range: normal texture sits at the low end, the pixel
    threshold at the middle, so a defect above it glows and normal images stay cool."""
    sample = maps.flatten()[:: max(1, maps.numel() // 2_000_000)]
    low = float(sample.median())
    return low, low + 2.0 * max(threshold - low, 1e-12)


@dataclass
class Calibration:
    """Writes calibration.json whenever a new best checkpoint is kept, from the
    held-out maps and scores the loop has just computed: a run can be tested or
    used at any moment of its training, and after an interruption.

    With ``normalization="position"`` it first fits the per-position normal
    statistics on those maps (position_stats.pt) and calibrates on the maps
    standardised leave-one-out, rescored by the model's score ``options``."""

    run_dir: Path
    quantile: float
    skipped: list[str]
    normalization: str = "none"
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_normalization(self.normalization)
        if self.normalization != "none" and self.options is None:
            raise ValueError("map normalization needs the model's score options to rescore")

    def write(self, maps: torch.Tensor, scores: np.ndarray, epoch: int,
              source: str = "validation") -> None:
        if self.normalization == "position":
            assert self.options is not None
            stats, maps = PositionStats.fit_leave_one_out(maps)
            with torch.no_grad():
                scores = torch.cat([image_score(part, self.options) for part in maps.split(64)]
                                   ).double().numpy()
            stats.save(self.run_dir / POSITION_STATS_FILE)  # before the threshold that uses it
        threshold = calibrate_threshold(scores, quantile=self.quantile)
        # Masks and colours are per pixel: a pixel is marked where the map is hotter than
        # anywhere on the same share of normal images. With the plain max as the image
        # score this equals the image threshold; with a window or the mean it does not.
        peaks = maps.flatten(1).amax(dim=1).double().numpy()
        pixel_threshold = calibrate_threshold(peaks, quantile=self.quantile)
        save_json({
            "threshold": threshold, "pixel_threshold": pixel_threshold,
            "quantile": self.quantile, "source": source,
            "map_normalization": self.normalization,
            "n_images": len(scores), "score_mean": float(scores.mean()),
            "score_max": float(scores.max()),
            # the held-out normals' scores: what a station's recent scores are compared
            # with to notice drift (anomap watch)
            "normal_scores": [float(f"{s:.6g}") for s in np.sort(scores)],
            "display_range": display_range(maps, pixel_threshold), "best_epoch": epoch,
            "n_skipped": len(self.skipped), "skipped": self.skipped,
        }, self.run_dir / CALIBRATION_FILE)


def retune(run_dir: str | Path, out_dir: str | Path, options: dict[str, Any], *,
           threshold_quantile: float | None = None, map_normalization: str | None = None,
           device: str = "auto", batch_size: int = 8, progress: bool = True
           ) -> dict[str, Any]:
    """Copy a trained run to ``out_dir`` with new inference ``options`` and a
    threshold recalibrated on its held-out normals; returns the new calibration.
    No retraining: only options the method lists as ``inference_options`` may
    change. All or nothing: ``out_dir`` appears only once everything is written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = RunConfig.load(run_dir)
    method = get_method(config.method)
    given = {k: v for k, v in options.items() if v is not None}
    changeable = ", ".join(method.inference_options())
    unknown = sorted(set(given) - set(method.options()))
    if unknown:
        raise ValueError(f"{method.name} has no option {', '.join(unknown)}; retune changes "
                         f"only {changeable}")
    learnt = sorted(set(given) - set(method.inference_options()))
    if learnt:
        raise ValueError(f"{', '.join(learnt)}: changes what {method.name} learns, so it "
                         f"needs retraining; retune changes only {changeable}")
    if out_dir.exists():
        raise RunExistsError(f"{out_dir} already exists; choose another --out folder")
    quantile = config.threshold_quantile if threshold_quantile is None else threshold_quantile
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"--threshold-quantile must be in [0, 1], got {quantile}")
    config = config.updated(
        model={**config.model, **given}, retuned_from=str(run_dir.resolve()),
        command=" ".join(sys.argv), threshold_quantile=quantile,
        map_normalization=check_normalization(map_normalization or config.map_normalization))
    normalization = config.map_normalization
    torch_device = resolve_device(device)
    model, _ = load_model(run_dir, torch_device, config=config)  # validates the options
    epoch = int(torch.load(run_dir / WEIGHTS_FILE, map_location="cpu",
                           weights_only=True).get("epoch", 0))

    train_samples, val_samples = normal_split(config)
    loaded: LoadedSet = load_set(val_samples or train_samples, config.geometry,
                                 desc="reading held-out images", progress=progress)
    require_enough_images(normalization, len(loaded), config.data.root)
    reading = MapReader(config.geometry, config.model).read_set(
        model, loaded, batch_size=batch_size, device=torch_device, progress=progress,
        desc="calibrating")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in (WEIGHTS_FILE, STATE_FILE, HISTORY_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, partial / name)
        config.save(partial)
        source = "validation" if val_samples else NO_SPLIT_SOURCE
        Calibration(partial, quantile, loaded.skipped, normalization, config.model).write(
            reading.maps, reading.scores, epoch, source=f"{source}, retuned")
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return load_calibration(out_dir)
