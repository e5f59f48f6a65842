"""float32 against bfloat16 inference on trained runs: what ``--precision bf16``
does to the metrics, to each image's score and to the pass/fail verdicts.

Each run is evaluated twice with ``anomap test`` (no panels) on its own test
split; the verdicts use the run's float32-calibrated threshold in both.

    python benchmarks/precision.py --runs RUN_DIR... --name diagnostics/precision_mtd

Runs already in the results file are kept, so a new run adds a row.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
from mtd_accuracy import result_path, save_result

from anomap.evaluate import evaluate_run

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "model_images_per_second")


def compare(run_dir: Path) -> dict[str, object]:
    """Metrics in both precisions, and how far the bfloat16 scores and verdicts moved."""
    entry: dict[str, object] = {}
    scores, verdicts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            out = Path(tmp) / precision
            result = evaluate_run(run_dir, out_dir=out, device="cpu", precision=precision,
                                  panels=False)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument("--name", default="diagnostics/precision", help="results/<name>.json")
    args = parser.parse_args()
    command = ("python benchmarks/precision.py --name " + args.name + " --runs "
               + " ".join(str(run) for run in args.runs))
    out = result_path(args.name)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for run in args.runs:
        runs[run.name] = {**compare(run), "command": command}
    save_result({"name": args.name, "metrics": {}, "runs": runs})


if __name__ == "__main__":
    main()
