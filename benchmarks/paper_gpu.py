"""The paper presets at full length on MTD, through ``anomap benchmark``: the one
prepared script for a lent GPU (at most 8 minutes of it), resumable.

Methods run in the order given, each a benchmark of MTD as one category, until
the time budget would be passed; a method not started is listed as skipped.
``--preset auto`` is ``paper`` where the ResNet files are in ANOMAP_WEIGHTS_DIR
and ``paper-lite`` where they are not; the JSON says which ran. On the device:

    python benchmarks/paper_gpu.py --data mtd_copy --out $OUT/paper_gpu --budget 420

On a CPU, to test the path (tiny settings, a few seconds per method):

    python benchmarks/paper_gpu.py --data DIR --out /tmp/paper_gpu --device cpu \
        --epochs 1 --image-size 64 --methods stpm,fractalad
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from anomap.benchmark import Benchmark, run_benchmark
from anomap.machine import describe_machine
from anomap.train import TrainingPlan

ROOT = Path(__file__).resolve().parent
#: cheapest at full length first: STPM's 100 epochs and FractalAD's 1,200 steps take
#: minutes on one GPU, RSTPM about twice STPM; DRAEM's 700 epochs do not fit 8 minutes
ORDER = ("stpm", "fractalad", "rstpm", "draem")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an MTD (MVTec layout) folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(ORDER[:3]))
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all methods")
    parser.add_argument("--epochs", type=int, help="override (CPU test only)")
    parser.add_argument("--image-size", type=int, help="override (CPU test only)")
    args = parser.parse_args()
    started = time.monotonic()
    recipe = {"epochs": args.epochs, "image_size": args.image_size}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "mtd_root"
        root.mkdir()
        (root / "mtd").symlink_to(args.data.resolve())  # MTD as one category
        results: dict[str, object] = {"machine": describe_machine(), "command": "python "
                                      + " ".join(sys.argv), "methods": {}}
        for method in args.methods.split(","):
            spent = time.monotonic() - started
            if spent > args.budget:
                results["methods"][method] = {"skipped": f"budget spent ({spent:.0f} s)"}
                continue
            plan = TrainingPlan(preset=args.preset, recipe=recipe)
            table = run_benchmark(Benchmark(root, method, args.out / method, plan,
                                            device=args.device, progress=False))
            results["methods"][method] = {**table["mean"], "preset": table["rows"][0]["preset"],
                                          "seconds": round(time.monotonic() - started - spent)}
            (args.out / "paper_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["methods"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
