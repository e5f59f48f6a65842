"""Which pyramid levels carry STPM's detections: every subset of a trained run's
levels scored on its test split, without retraining.

STPM's map is the product of its per-level maps. Here each non-empty subset of
the levels makes its own product map, scored like the recipe (plain max) and
with a 21x21 window; pixel AUROC and AUPRO come from the same maps. Like
``score_window.py`` this reads the *test* split: an analysis of what the
levels contribute, not a way to tune one dataset's setting.

    python benchmarks/stpm_levels.py --name diagnostics/stpm_levels_mtd --runs RUN_DIR...

Runs already in the results file are kept, so a new run adds rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from mtd_accuracy import analyse_runs
from score_window import load_test_split

from anomap import metrics
from anomap.data import LoadedSet, to_float
from anomap.methods.stpm import STPM
from anomap.runfolder import RunConfig, load_model
from anomap.scoring import image_score


@torch.no_grad()
def level_maps(model: STPM, config: RunConfig, batch_size: int = 32
               ) -> tuple[list[torch.Tensor], LoadedSet]:
    """Per-level maps of the test split in the evaluation frame, and the split."""
    geometry = config.geometry
    test = load_test_split(config, with_masks=True)
    levels: list[list[torch.Tensor]] = [[] for _ in config.model["strides"]]
    for start in range(0, len(test), batch_size):
        images = to_float(test.images[start:start + batch_size])
        boxes = test.boxes[start:start + batch_size]
        for stored, level in zip(levels, model.level_maps(images), strict=True):
            stored.append(geometry.restore(level, boxes))
    return [torch.cat(level) for level in levels], test


def subset_metrics(run_dir: Path) -> dict[str, object]:
    model, config = load_model(run_dir)
    if not isinstance(model, STPM):
        raise SystemExit(f"{run_dir}: a {config.method} run; only STPM has pyramid levels")
    strides = config.model["strides"]
    levels, test = level_maps(model, config)
    assert test.masks is not None
    labels, masks = np.asarray(test.labels), test.masks.numpy()
    subsets: dict[str, dict[str, float]] = {}
    for size in range(1, len(levels) + 1):
        for chosen in itertools.combinations(range(len(levels)), size):
            product = levels[chosen[0]].clone()
            for index in chosen[1:]:
                product *= levels[index]
            entry = {}
            for window in (1, 21):
                options = {**model.config, "score_window": window}
                scores = image_score(product, options).double().numpy()
                entry[f"image_auroc_window{window}"] = round(metrics.image_auroc(labels, scores),
                                                             4)
            entry["pixel_auroc"] = round(metrics.pixel_auroc(masks, product.numpy()), 4)
            entry["aupro"] = round(metrics.aupro(masks, product.numpy()), 4)
            name = "/".join(str(strides[i]) for i in chosen)
            subsets[name] = entry
            print(f"{run_dir.name}  strides {name:8s}  {entry}", flush=True)
    return {"command": config.command, "subsets": subsets}


def main() -> None:
    analyse_runs(__doc__.splitlines()[0], "diagnostics/stpm_levels",
                 lambda run, _args: subset_metrics(run), command_key="levels_command")


if __name__ == "__main__":
    main()
