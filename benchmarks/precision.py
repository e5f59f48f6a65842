"""float32 against bfloat16 inference on trained runs: what ``--precision bf16``
does to the metrics, to each image's score and to the pass/fail verdicts.

Each run is evaluated twice with ``anomap test`` (no panels) on its own test
split; the verdicts use the run's float32-calibrated threshold in both.

    python benchmarks/precision.py --runs RUN_DIR... --name diagnostics/precision_mtd

Runs already in the results file are kept, so a new run adds a row.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from mtd_accuracy import analyse_runs

from anomap.evaluate import evaluate_run
from anomap.run import LoadSettings

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "model_images_per_second")


def compare(run_dir: Path) -> dict[str, object]:
    """Metrics in both precisions, and how far the bfloat16 scores and verdicts moved."""
    entry: dict[str, object] = {}
    scores, verdicts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            out = Path(tmp) / precision
            result = evaluate_run(
                run_dir,
                settings=LoadSettings(device="cpu", precision=precision),
                out_dir=out,
                panels=False,
            )
            entry[precision] = {key: round(result[key], 4) for key in METRICS}
            with (out / "predictions.csv").open() as handle:
                rows = list(csv.DictReader(handle))
            scores[precision] = np.array([float(r["score"]) for r in rows])
            verdicts[precision] = np.array([r["verdict"] for r in rows])
    relative = np.abs(scores["bf16"] - scores["fp32"]) / np.abs(scores["fp32"])
    entry["score_relative_change"] = {"median": round(float(np.median(relative)), 4),
                                      "p95": round(float(np.quantile(relative, 0.95)), 4),
                                      "max": round(float(relative.max()), 4)}
    entry["verdicts_changed"] = int((verdicts["bf16"] != verdicts["fp32"]).sum())
    entry["n_images"] = len(rows)
    print(run_dir.name, json.dumps(entry))
    return entry


def main() -> None:
    analyse_runs(__doc__.splitlines()[0], "diagnostics/precision",
                 lambda run, _args: compare(run))


if __name__ == "__main__":
    main()
