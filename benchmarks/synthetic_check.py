"""How trained runs do on synthetic anomalies pasted into their own held-out
normal images: a way to compare settings without looking at the test split.

Each run's held-out normals (its config's seed and split) are scored clean and
with one anomaly from ``anomap.synth`` pasted into each (a fixed seed: every
run is judged on the same fakes), as ``--selection synthetic`` judges epochs.
A setting trained on the same kind of fakes (RSTPM's ``--pair2-training
synthetic``, DRAEM) is favoured by this check; compare those on other grounds.

    python benchmarks/synthetic_check.py --name diagnostics/synthetic_check_mtd \
        --runs /tmp/anomap_runs/stpm_lite0_e10 /tmp/anomap_runs/rstpm_lite0-lite1_e10
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from anomap.data import load_set
from anomap.inference import InferenceModel
from anomap.runfolder import load_model, load_position_stats, normal_split
from anomap.scoring import MapReader
from anomap.synth.check import synthetic_check_set
from anomap.train import synthetic_aurocs

#: the check set's seed, the same for every run
CHECK_SEED = 0


def measure(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    model, config = load_model(run, args.device)
    geometry = config.geometry
    _, held_out = normal_split(config)
    normals = load_set(held_out, geometry, progress=False)
    fast = InferenceModel(model)
    stats = load_position_stats(run, config)
    reading = MapReader(geometry, fast.config, stats).read_set(fast, normals, device=args.device,
                                                               progress=False)
    maps, scores = reading.maps, reading.scores
    check = synthetic_check_set(normals, geometry, CHECK_SEED, args.anomaly_source)
    image, pixel = synthetic_aurocs(fast, geometry, check, maps, scores, batch_size=32,
                                    device=torch.device(args.device), standardize=stats)
    return {"synthetic_image_auroc": round(image, 4), "synthetic_pixel_auroc": round(pixel, 4),
            "n_held_out": len(normals), "n_fakes": len(check),
            "model": config.model, "epochs": config.recipe["epochs"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--anomaly-source", default="builtin",
                        help="where the pasted textures come from (anomap.synth)")


if __name__ == "__main__":
    from mtd_accuracy import analyse_runs

    analyse_runs(__doc__.splitlines()[0], "diagnostics/synthetic_check", measure, add_arguments)
