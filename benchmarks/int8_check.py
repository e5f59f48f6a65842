"""int8 against fp32 for every method, on this machine, with its CPU named.

For each method: a short run on the data (trained here when missing, on a GPU
when there is one), exported as fp32 ONNX and as int8 (ONNX, read by ONNX
Runtime and OpenVINO). The int8 export goes through anomap's check; when the
check refuses it, the same int8 graph is exported again with the check turned
off so that the table still shows what it would have done. Each variant then
scores the test split (the test split only reports) and replays the export's
probe here. Rows: image AUROC, pixel AUROC, AUPRO, held-out normals failed,
verdicts changed against the run on the check set, model-only and end-to-end
images/s, the probe's verdict and time.

    python benchmarks/int8_check.py --data mtd --name speed/int8_check_mtd
    python benchmarks/int8_check.py --data demo --name speed/int8_check_demo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
MTD = ROOT.parents[1] / "shared" / "data" / "mtd"
#: short runs: int8 against fp32 of the same weights is the question, not accuracy
EPOCHS = {"stpm": 8, "rstpm": 3, "fractalad": 3, "draem": 3}
#: name -> (export kind, runtime): None = the run itself through torch
VARIANTS = {"torch-fp32": (None, "torch"), "onnxruntime-fp32": ("fp32", "onnxruntime"),
            "openvino-fp32": ("fp32", "openvino"), "onnxruntime-int8": ("int8", "onnxruntime"),
            "openvino-int8": ("int8", "openvino")}


def data_folder(name: str, work: Path) -> Path:
    if name == "mtd":
        return MTD
    if name == "demo":
        from anomap.demo import make_demo_dataset

        folder = work / "demo_data" / "brick"
        return folder if folder.is_dir() else make_demo_dataset(work / "demo_data", "brick")
    return Path(name)


def train_run(method: str, data: Path, run: Path, epochs: int, image_size: int | None) -> float:
    from anomap.train import TrainingPlan, fit

    if (run / "model.pt").is_file() and (run / "calibration.json").is_file():
        return 0.0
    started = time.perf_counter()
    overrides: dict[str, Any] = {"epochs": epochs}
    if image_size:
        overrides["image_size"] = image_size
    fit(
        method,
        data,
        run,
        TrainingPlan(recipe=overrides),
        device="auto",
        resume=(run / "last.pt").is_file(),
        progress=False,
    )
    return round(time.perf_counter() - started, 1)


def make_exports(run: Path, folder: Path) -> dict[str, Any]:
    """fp32 and int8 exports of ``run``; an int8 export the check refuses is made again
    unchecked (``int8-unchecked``) so that its numbers can be shown."""
    from anomap import export, trust

    record: dict[str, Any] = {}
    for kind, int8 in (("fp32", False), ("int8", True)):
        target = folder / kind
        if not target.exists():
            started = time.perf_counter()
            try:
                export.export_run(run, target, "onnx", int8=int8, progress=False)
            except trust.DisagreementError as error:
                record[f"{kind}_refused"] = str(error)
                saved = export.INT8_EXPORT
                export.INT8_EXPORT = trust.Tolerance()  # measure what was refused
                try:
                    export.export_run(run, target, "onnx", int8=int8, progress=False)
                finally:
                    export.INT8_EXPORT = saved
            record[f"{kind}_export_seconds"] = round(time.perf_counter() - started, 1)
        exported = json.loads((target / "export.json").read_text())
        record[f"{kind}_agreement"] = exported["agreement_by_runtime"]
        record.setdefault("recalibrated", exported.get("recalibrated"))
    return record


def probe_here(path: Path, runtime: str) -> dict[str, Any]:
    """The export's probe replayed on this machine by ``runtime``, and the load's time."""
    from anomap.run import Detector

    entry: dict[str, Any] = {"probe": None, "probe_refused": None}
    started = time.perf_counter()
    try:
        entry["probe"] = Detector.load(path, runtime=runtime).load_report["tried"][0]
    except RuntimeError as error:
        entry["probe_refused"] = str(error)
    entry["load_seconds"] = round(time.perf_counter() - started, 2)
    return entry


def measure(path: Path, runtime: str) -> dict[str, Any]:
    """Test-split metrics and speed of one variant, and its probe replayed here."""
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings

    entry: dict[str, Any] = {} if runtime == "torch" else probe_here(path, runtime)
    with tempfile.TemporaryDirectory() as out:
        result = evaluate_run(
            path,
            settings=LoadSettings(runtime=runtime, probe="off"),
            out_dir=out,
            panels=False,
            progress=False,
        )
    entry.update({key: result[key] for key in (
        "image_auroc", "pixel_auroc", "aupro", "threshold", "images_per_second",
        "model_images_per_second", "precision", "runtime")})
    entry["good_test_images_failed"] = result.get("fp")
    entry["n_good_test_images"] = result.get("n_images", 0) - result.get("n_defective", 0)
    return entry


def main() -> None:
    from anomap.machine import describe_machine, machine_line
    from anomap.runfolder import RunConfig
    from anomap.runtimes import readable_runtimes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mtd", help="mtd, demo, or an MVTec-layout folder")
    parser.add_argument("--methods", nargs="+", default=list(EPOCHS), choices=list(EPOCHS))
    parser.add_argument("--epochs", type=int, help="every method's epochs (default: short runs)")
    parser.add_argument("--image-size", type=int, help="network input side (default: recipe)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomap_int8"))
    parser.add_argument("--name", default="speed/int8_check")
    parser.add_argument("--out", type=Path, help="JSON to write (default: results/NAME.json)")
    parser.add_argument("--reprobe", action="store_true",
                        help="make the int8 exports again and replay their probes only, "
                             "keeping the test metrics (quantisation is deterministic)")
    args = parser.parse_args()
    out = args.out or ROOT / "results" / f"{args.name}.json"
    data = data_folder(args.data, args.work)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.update(machine=describe_machine(), data=str(args.data),
                   command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(machine_line(results["machine"]), flush=True)
    for method in args.methods:
        run = args.work / f"{Path(str(args.data)).name}_{method}"
        entry = results.setdefault("methods", {}).setdefault(method, {})
        entry["train_seconds"] = train_run(method, data, run, args.epochs or EPOCHS[method],
                                           args.image_size) or entry.get("train_seconds", 0.0)
        entry["epochs"] = RunConfig.load(run).recipe["epochs"]
        if args.reprobe:
            shutil.rmtree(args.work / "exports" / run.name / "int8", ignore_errors=True)
            entry.pop("int8_refused", None)
        entry.update(make_exports(run, args.work / "exports" / run.name))
        for name, (kind, runtime) in VARIANTS.items():
            if args.reprobe and kind != "int8":
                continue
            path = run if kind is None else args.work / "exports" / run.name / kind
            if kind is not None and runtime not in readable_runtimes(path):
                entry[name] = {"skipped": f"{runtime} is not installed here"}
                continue
            entry[name] = ({**entry[name], **probe_here(path, runtime)} if args.reprobe
                           else measure(path, runtime))
            print(method, name, json.dumps({k: v for k, v in entry[name].items()
                                            if k != "probe"}), flush=True)
        results["machine_at_end"] = describe_machine()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(partial, out)
    torch.set_num_threads(torch.get_num_threads())


if __name__ == "__main__":
    main()
