"""Accuracy benchmark on the Magnetic Tile Defect data (MVTec layout).

Trains one configuration with the generic loop, evaluates it on the test split
and writes ``benchmarks/results/mtd/<name>.json`` (metrics, training time, the
configuration and the exact command). The README and docs/results/mtd.md quote these files.

    python benchmarks/mtd_accuracy.py --name stpm_lite0_letterbox_e100
    python benchmarks/mtd_accuracy.py --name stpm_lite0_stretch_e20 --resize-mode stretch \
        --epochs 20
    python benchmarks/mtd_accuracy.py --name draem_cpu --model draem --preset cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from anomap.calibrate import retune
from anomap.evaluate import evaluate_run
from anomap.machine import describe_machine
from anomap.methods.rstpm import FUSIONS, PAIR2_TRAINING
from anomap.orientation import ORIENTATIONS
from anomap.run import LoadSettings
from anomap.runfolder import DataSource, load_history
from anomap.scoring import IMAGE_SCORES
from anomap.standardize import NORMALIZATIONS
from anomap.train import TrainingPlan, fit

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"


def machine_info() -> dict[str, object]:
    """Where a number was measured, stored next to it: the CPU, its ISA flags, the
    libraries and the load (anomap.machine), with the keys older results used."""
    return {**describe_machine(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else platform.processor() or "cpu"}


def training_time(history: list[dict[str, Any]]) -> dict[str, float]:
    """Training seconds summed over epochs (a resumed run counts every epoch once)
    and ms per training image at the fastest epoch (the least disturbed one)."""
    return {"train_seconds": round(sum(float(h["seconds"]) for h in history), 1),
            "train_ms_per_image": round(1000 / max(float(h["train_images_per_second"])
                                                   for h in history), 1)}


def training_curve(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Loss and held-out mean score per epoch, to compare runs epoch by epoch."""
    return {key: [float(f"{float(h[key]):.5g}") for h in history]
            for key in ("loss", "val_mean_score")}


def result_path(name: str) -> Path:
    """results/<name>.json; a bare name is an accuracy record on MTD (results/mtd/),
    others name their folder (``diagnostics/...``, ``speed/...``)."""
    folder_and_name = name if "/" in name else f"mtd/{name}"
    return ROOT / "results" / f"{folder_and_name}.json"


def save_result(record: dict[str, Any]) -> Path:
    """results/<name>.json, with the machine it was measured on."""
    out = result_path(record["name"])
    out.write_text(json.dumps({**record, "machine": machine_info()}, indent=2) + "\n")
    print(json.dumps(record["metrics"], indent=2))
    print(f"wrote {out}")
    return out


def analyse_runs(description: str, default_name: str,
                 measure: Callable[[Path, argparse.Namespace], dict[str, Any]],
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 command_key: str = "command") -> None:
    """``main`` of the scripts that analyse trained runs: parse ``--runs`` and
    ``--name``, measure each run and merge it into results/<name>.json (runs
    measured earlier are kept, so a new run adds rows), with the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders")
    parser.add_argument("--name", default=default_name, help="results/<name>.json")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    command = " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    out = result_path(args.name)
    runs = json.loads(out.read_text())["runs"] if out.is_file() else {}
    for run in args.runs:
        runs[run.name] = {**measure(run, args), command_key: command}
    save_result({"name": args.name, "metrics": {}, "runs": runs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="stpm")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--strides", type=int, nargs="+", default=None,
                        help="STPM pyramid levels (default: the method's, 4 8 16)")
    parser.add_argument("--map-strides", type=int, nargs="+", default=None,
                        help="STPM levels whose product is the map (default: all)")
    parser.add_argument("--score-window", type=int, default=None,
                        help="image score window (default: the method's; see docs/results/mtd.md)")
    parser.add_argument("--image-score", default=None, choices=IMAGE_SCORES,
                        help="max of the windowed map (default) or mean of the map")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's")
    parser.add_argument("--lr-milestones", type=float, nargs="+", default=None,
                        help="fractions of the epochs at which lr is multiplied by --lr-gamma")
    parser.add_argument("--lr-gamma", type=float, default=None)
    parser.add_argument("--augment", default=None, choices=ORIENTATIONS,
                        help="random flips / turns of the training images (default none)")
    parser.add_argument("--resize-mode", default=None,
                        help="letterbox (default), mirror or stretch; a resumed run keeps its own")
    parser.add_argument("--margin", type=int, default=None,
                        help="pixels of padding kept around the photo (default 0; "
                             "see docs/results/mtd.md)")
    parser.add_argument("--preset", default="auto",
                        help="the method's preset (anomap train --help lists them) "
                             "or auto (paper or cpu by device)")
    parser.add_argument("--selection", default=None,
                        help="val_score, last or synthetic (default: the method's recipe)")
    parser.add_argument("--anomaly-source", default=None,
                        help="synthetic-anomaly source for methods that use one")
    parser.add_argument("--second-backbone", default=None, help="RSTPM: pair 2's teacher")
    parser.add_argument("--attention", default=None, choices=["on", "off"], help="RSTPM")
    parser.add_argument("--pair2-training", default=None, choices=PAIR2_TRAINING, help="RSTPM")
    parser.add_argument("--fusion", default=None, choices=FUSIONS, help="RSTPM")
    parser.add_argument("--decoder-width", type=int, default=None, help="RSTPM")
    parser.add_argument("--distillation", default=None, choices=["on", "off", "auto"],
                        help="FractalAD")
    parser.add_argument("--loss-factor", type=float, default=None, help="STPM, RSTPM")
    parser.add_argument("--discriminator", default=None, choices=["on", "off"], help="RSTPM")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="normals held out (default: the preset's)")
    parser.add_argument("--anomalies", default=None, choices=["fractal", "perlin"],
                        help="FractalAD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/anomap_runs"))
    parser.add_argument("--panels", action="store_true", help="also write heat-map panels")
    parser.add_argument("--map-normalization", default=None, choices=NORMALIZATIONS,
                        help="default: none (training), the run's (--retune)")
    parser.add_argument("--retune", type=Path, metavar="RUN",
                        help="no training: copy this trained run with --map-strides / "
                             "--score-window / --map-normalization and a recalibrated "
                             "threshold (anomap retune)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"{args.data}: MTD data not found (see ../shared/data/README.md)")

    run = args.runs / args.name
    started = time.perf_counter()
    model_config = {"backbone": args.backbone, "anomaly_source": args.anomaly_source,
                    "strides": args.strides, "map_strides": args.map_strides,
                    "score_window": args.score_window,
                    "image_score": args.image_score, "fusion": args.fusion,
                    "second_backbone": args.second_backbone,
                    "attention": None if args.attention is None else args.attention == "on",
                    "pair2_training": args.pair2_training,
                    "decoder_width": args.decoder_width,
                    "distillation": args.distillation, "loss_factor": args.loss_factor,
                    "discriminator": None if args.discriminator is None
                    else args.discriminator == "on",
                    "anomalies": args.anomalies}  # None: the method's default
    if args.retune:  # no training: the given run's weights, read with the options above
        calibration = retune(args.retune, run, model_config, device=args.device,
                             map_normalization=args.map_normalization, progress=False)
        trained = {"history": load_history(run), **calibration}
    else:
        trained = fit(
            args.model,
            DataSource(str(args.data), val_fraction=args.val_fraction),
            run,
            TrainingPlan(
                model=model_config,
                recipe={
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "image_size": args.image_size,
                    "selection": args.selection,
                    "lr": args.lr,
                    "lr_milestones": args.lr_milestones,
                    "lr_gamma": args.lr_gamma,
                    "augment": args.augment,
                },
                resize_mode=args.resize_mode,
                margin=args.margin,
                seed=args.seed,
                preset=args.preset,
                map_normalization=args.map_normalization,
            ),
            device=args.device,
            resume=(run / "last.pt").exists(),
            progress=False,
        )
    train_seconds = time.perf_counter() - started
    result = evaluate_run(
        run, settings=LoadSettings(device=args.device), panels=args.panels, progress=False
    )
    config = json.loads((run / "config.json").read_text())
    history = trained["history"]
    record = {
        "name": args.name,
        "command": "python " + " ".join(sys.argv),
        "metrics": {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro",
                                           "image_f1_max", "threshold", "n_images",
                                           "n_skipped", "images_per_second",
                                           "model_images_per_second")},
        "at_threshold": {k: result[k] for k in ("tp", "fn", "fp", "tn") if k in result},
        "per_defect_type_image_auroc": result["per_defect_type"],
        "best_epoch": trained["best_epoch"],
        "epochs": config["recipe"]["epochs"],
        "epochs_trained": len(history),  # fewer for a run read before its last epoch
        "wall_seconds_this_call": round(train_seconds, 1),
        **training_time(history),
        "curve": training_curve(history),
        "config": config,
    }
    save_result(record)


if __name__ == "__main__":
    main()
