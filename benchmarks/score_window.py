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
import json
from pathlib import Path

import numpy as np
import torch
from mtd_accuracy import result_path, save_result

from anomap import metrics
from anomap.data import discover, load_set
from anomap.evaluate import infer, per_defect_type_auroc
from anomap.run import Detector


def window_aurocs(run_dir: Path, windows: list[int]) -> dict[str, object]:
    """Image AUROC overall and per defect type for each window, on one run's test split."""
    detector = Detector.load(run_dir, "cpu")
    data = detector.config["data"]
    spec = discover(data["root"], defect_dir=data.get("defect_dir"),
                    mask_dir=data.get("mask_dir"), test_normal_dir=data.get("test_normal_dir"))
    test = load_set(spec.test, detector.geometry, with_masks=False)
    maps, _ = infer(detector.model, detector.geometry, test)
    labels = np.asarray(test.labels)
    result: dict[str, object] = {"command": detector.config.get("command", ""), "windows": {}}
    for window in windows:  # only the score changes: set it on the loaded model
        detector.model.config["score_window"] = window
        with torch.no_grad():
            scores = detector.model.image_score(maps).double().numpy()
        per_type = {kind: round(value, 4)
                    for kind, value in per_defect_type_auroc(test.samples, scores).items()}
        result["windows"][str(window)] = {"image_auroc": round(metrics.image_auroc(labels, scores),
                                                               4),
                                          "per_defect_type_image_auroc": per_type}
        print(f"{run_dir.name}  window {window:3d}  image AUROC "
              f"{result['windows'][str(window)]['image_auroc']:.4f}  {per_type}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 5, 11, 21, 41])
    parser.add_argument("--name", default="diagnostics/score_window",
                        help="results/<name>.json")
    args = parser.parse_args()
    command = ("python benchmarks/score_window.py --name " + args.name + " --runs "
               + " ".join(str(run) for run in args.runs)
               + " --windows " + " ".join(map(str, args.windows)))
    # runs scored earlier into the same file are kept: a new run adds a row
    out = result_path(args.name)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for run in args.runs:
        runs[run.name] = {**window_aurocs(run, args.windows), "score_command": command}
    save_result({"name": args.name, "metrics": {}, "runs": runs})


if __name__ == "__main__":
    main()
