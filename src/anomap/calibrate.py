"""Thresholds from held-out normal images, and retuning a trained run.

The threshold is a quantile of the scores of normal images the model never
trained on (the held-out 20%), so that a pass/fail verdict never sees test data.
Options that change how a map is read but not the weights (STPM's map levels,
the score window, the quantile) can be changed on a trained run with
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

from anomap.data import LoadedSet, Sample, discover, load_set, split_holdout
from anomap.evaluate import infer
from anomap.files import save_json
from anomap.methods import build_model, get_method
from anomap.metrics import calibrate_threshold
from anomap.run import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    RunError,
    RunExistsError,
    geometry_from_config,
    load_json,
    load_model,
    resolve_device,
)

log = logging.getLogger(__name__)


def display_range(maps: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Heat-map colour range: normal texture sits at the low end, the threshold
    at the middle, so a defect above it glows and normal images stay cool."""
    sample = maps.flatten()[:: max(1, maps.numel() // 2_000_000)]
    low = float(sample.median())
    return low, low + 2.0 * max(threshold - low, 1e-12)


@dataclass
class Calibration:
    """Writes calibration.json whenever a new best checkpoint is kept, from the
    held-out scores the loop has just computed: a run can be tested or used at
    any moment of its training, and after an interruption."""

    run_dir: Path
    quantile: float
    skipped: list[str]

    def write(self, maps: torch.Tensor, scores: np.ndarray, epoch: int,
              source: str = "validation") -> None:
        threshold = calibrate_threshold(scores, quantile=self.quantile)
        save_json({
            "threshold": threshold, "quantile": self.quantile, "source": source,
            "n_images": len(scores), "score_mean": float(scores.mean()),
            "score_max": float(scores.max()),
            "display_range": display_range(maps, threshold), "best_epoch": epoch,
            "n_skipped": len(self.skipped), "skipped": self.skipped,
        }, self.run_dir / CALIBRATION_FILE)


def normal_split(config: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """A run's (training, held-out) normal images, as its config and seed define them."""
    spec = discover(config["data"]["root"])
    for warning in spec.warnings:
        log.warning(warning)
    return split_holdout(spec.train, config["data"]["val_fraction"], int(config["seed"]))


def retune(run_dir: str | Path, out_dir: str | Path, options: dict[str, Any], *,
           threshold_quantile: float | None = None, device: str = "auto",
           batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Copy a trained run to ``out_dir`` with new inference ``options`` and a
    threshold recalibrated on its held-out normals; returns the new calibration.
    No retraining: only options the method lists as ``inference_options`` may change."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = load_json(run_dir / CONFIG_FILE)
    method = get_method(config["method"])
    given = {k: v for k, v in options.items() if v is not None}
    fixed = sorted(set(given) - set(method.inference_options))
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: changes what {method.name} learns, so it needs "
                         f"retraining; retune changes only "
                         f"{', '.join(method.inference_options)}")
    if (out_dir / CONFIG_FILE).exists():
        raise RunExistsError(f"{out_dir} already holds a run; choose another --out folder")
    config = {**config, "model": {**config["model"], **given},
              "retuned_from": str(run_dir.resolve()), "command": " ".join(sys.argv)}
    if threshold_quantile is not None:
        config["threshold_quantile"] = threshold_quantile
    build_model(config["method"], **{**config["model"], "weights": None})  # options valid?
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise RunError(f"{run_dir / WEIGHTS_FILE}: no weights yet; nothing to retune")

    geometry = geometry_from_config(config)
    train_samples, val_samples = normal_split(config)
    loaded: LoadedSet = load_set(val_samples or train_samples, geometry,
                                 desc="reading held-out images", progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, STATE_FILE, HISTORY_FILE):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    save_json(config, out_dir / CONFIG_FILE)
    model, _ = load_model(out_dir, device=resolve_device(device))
    maps, scores = infer(model, geometry, loaded, batch_size=batch_size, progress=progress,
                         desc="calibrating")
    epoch = int(load_json(run_dir / CALIBRATION_FILE).get("best_epoch", 0))
    source = "validation" if val_samples else "training images (no validation split)"
    Calibration(out_dir, config["threshold_quantile"], loaded.skipped).write(
        maps, scores, epoch, source=f"{source}, retuned")
    return load_json(out_dir / CALIBRATION_FILE)
