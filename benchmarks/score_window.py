"""Image-score windows on trained runs: how the image AUROC moves when the score
is the max of the anomaly map after a KxK mean filter instead of the plain max.

The maps are computed once per run; only the score changes, so pixel AUROC and
AUPRO are unaffected and no training is needed. This reads the *test* split:
it is an analysis of a choice (``--score-window``), reported next to the
recipe's default, not a way to pick a default for one dataset.

    python benchmarks/score_window.py --runs RUN_DIR... --windows 1 5 11 21 41

Runs already in the results file are kept, so a new run adds a row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from mtd_accuracy import analyse_runs

from anomap import metrics
from anomap.data import LoadedSet, Sample, discover, load_set
from anomap.evaluate import per_defect_type_auroc
from anomap.run import Detector
from anomap.runfolder import RunConfig
from anomap.scoring import image_score


def test_samples(config: RunConfig) -> list[Sample]:
    """The test images of the data a run (its config.json) was trained on."""
    data = config.data
    return discover(data.root, defect_dir=data.defect_dir, mask_dir=data.mask_dir,
                    test_normal_dir=data.test_normal_dir).test


def load_test_split(config: RunConfig, with_masks: bool = False) -> LoadedSet:
    """The test split of the data a run was trained on, in its geometry."""
    return load_set(test_samples(config), config.geometry, with_masks=with_masks)


def window_aurocs(run_dir: Path, windows: list[int]) -> dict[str, object]:
    """Image AUROC overall and per defect type for each window, on one run's test split."""
    detector = Detector.load(run_dir, "cpu")
    config = detector.config
    assert config is not None
    test = load_test_split(config)
    maps = detector.reader.read_set(detector.model, test).maps
    labels = np.asarray(test.labels)
    result: dict[str, object] = {"command": config.command, "windows": {}}
    options = {**detector.reader.options, "image_score": "max"}  # windows apply to the max only
    for window in windows:  # only the score changes: rescore the same maps
        with torch.no_grad():
            scores = image_score(maps, {**options, "score_window": window}).double().numpy()
        per_type = {kind: round(value, 4)
                    for kind, value in per_defect_type_auroc(test.samples, scores).items()}
        result["windows"][str(window)] = {"image_auroc": round(metrics.image_auroc(labels, scores),
                                                               4),
                                          "per_defect_type_image_auroc": per_type}
        print(f"{run_dir.name}  window {window:3d}  image AUROC "
              f"{result['windows'][str(window)]['image_auroc']:.4f}  {per_type}")
    return result


def main() -> None:
    def windows_argument(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--windows", type=int, nargs="+", default=[1, 5, 11, 21, 41])

    analyse_runs(__doc__.splitlines()[0], "diagnostics/score_window",
                 lambda run, args: window_aurocs(run, args.windows), windows_argument,
                 command_key="score_command")


if __name__ == "__main__":
    main()
