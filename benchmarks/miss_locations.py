"""Where on the photo are the defects a tested run misses?

Reads a tested run's ``predictions.csv`` (``anomap test``) and the ground-truth
masks, and counts the defective images whose mask reaches into the outer band
of the photo (``--band``, a fraction of its height / width). Compared for the
missed images (verdict pass at the calibrated threshold), the caught ones and
the lowest-scored ones, it shows whether the photo's edges are where a model
is blind.

    python benchmarks/miss_locations.py --name diagnostics/miss_locations_mtd --runs RUN_DIR...

Runs already in the results file are kept, so a new run adds rows.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
from mtd_accuracy import analyse_runs
from score_window import test_samples

from anomap.data import load_mask
from anomap.runfolder import RunConfig


def touches_band(mask: np.ndarray, band: float) -> bool:
    """Whether any defective pixel lies within ``band`` x side of an edge."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return False
    height, width = mask.shape
    return bool(rows.min() < band * height or cols.min() < band * width
                or rows.max() >= (1 - band) * height or cols.max() >= (1 - band) * width)


def share(flags: np.ndarray) -> float | None:
    return round(float(flags.mean()), 3) if flags.size else None


def miss_locations(run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    samples = test_samples(RunConfig.load(run_dir))
    mask_of = {str(s.path): s.mask_path for s in samples if s.label == 1}
    with open(run_dir / "predictions.csv", newline="") as handle:
        defective = [row for row in csv.DictReader(handle) if row["label"] == "1"]
    if not defective:
        raise SystemExit(f"{run_dir}/predictions.csv: no defective images (run anomap test)")
    unmatched = [row["path"] for row in defective if mask_of.get(row["path"]) is None]
    if unmatched:
        raise SystemExit(f"{run_dir}: no ground-truth mask for {len(unmatched)} defective "
                         f"images of predictions.csv, e.g. {unmatched[0]} (tested on other data?)")
    edge = np.array([touches_band(load_mask(mask_of[row["path"]]), args.band)
                     for row in defective])
    missed = np.array([row["verdict"] == "pass" for row in defective])
    lowest = np.argsort([float(row["score"]) for row in defective])[:args.lowest]
    return {"band": args.band, "n_defective": len(defective), "n_missed": int(missed.sum()),
            "share_at_edge_all": share(edge), "share_at_edge_missed": share(edge[missed]),
            "share_at_edge_caught": share(edge[~missed]),
            f"share_at_edge_lowest_{args.lowest}": share(edge[lowest])}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--band", type=float, default=0.08,
                        help="edge band as a fraction of the photo's side (default 0.08)")
    parser.add_argument("--lowest", type=int, default=40,
                        help="also count the N lowest-scored defective images (default 40)")


if __name__ == "__main__":
    analyse_runs(__doc__.splitlines()[0], "diagnostics/miss_locations", miss_locations,
                 add_arguments)
