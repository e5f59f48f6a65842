"""Runtimes side by side on a trained MTD run: torch fp32/bf16, ONNX Runtime and
OpenVINO in fp32 and int8, in one sitting.

For each runtime, in its own process (so its peak memory is its own):
model-only images/s at batch 1 and 8 (ready tensors), end to end at batch 8
two ways (``Detector.predict`` decoding in the same thread, and
``anomap.inspection`` with its decode pool: real MTD JPEGs through verdict),
GFLOP/s, peak RSS, and MTD image/pixel AUROC and AUPRO of ``anomap test``.
Exports are made with ``anomap.export.export_run`` when missing (int8
calibrated on the run's held-out normals).

    python benchmarks/runtimes.py --runs /tmp/anomap_runs/stpm_lite0_e10 --name speed/runtimes
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"
#: name -> (export format or None for the run itself, int8, runtime, precision)
VARIANTS = {
    "torch-fp32": (None, False, "torch", "fp32"),
    "torch-bf16": (None, False, "torch", "bf16"),
    "onnxruntime-fp32": ("onnx", False, "onnxruntime", "fp32"),
    "openvino-fp32": ("openvino", False, "openvino", "fp32"),
    "onnxruntime-int8": ("onnx", True, "onnxruntime", "fp32"),
    "openvino-int8": ("openvino", True, "openvino", "fp32"),
}


def export_folder(run: Path, fmt: str, int8: bool) -> Path:
    from anomap.export import export_run

    folder = run.parent / "exports" / f"{run.name}_{fmt}{'_int8' if int8 else ''}"
    if not folder.exists():
        started = time.perf_counter()
        record = export_run(run, folder, fmt, int8, progress=False)
        print(f"exported {folder} in {time.perf_counter() - started:.0f} s: "
              f"{json.dumps(record['agreement'])}", flush=True)
    return folder


def measure_variant(path: Path, runtime: str, precision: str, data: Path) -> dict[str, Any]:
    """Everything for one runtime, in this process."""
    from speed import flops_per_image, measure_inference

    from anomap import Detector
    from anomap.evaluate import evaluate_run
    from anomap.inspection import InspectionSettings, RowWriter, find_images, inspect
    from anomap.run import LoadSettings
    from anomap.runfolder import load_model

    detector = Detector.load(path, "cpu", precision, runtime)
    export = path / "export.json"
    source = Path(json.loads(export.read_text())["source_run"]) if export.exists() else path
    model, _ = load_model(source, "cpu")  # the same network, to count its FLOPs
    flops = flops_per_image(model.eval(), detector.geometry.size, torch.device("cpu"))
    files = sorted((data / "test").rglob("*.jpg"))
    entry: dict[str, Any] = {"runtime": detector.runtime, "precision": detector.precision,
                             "gflops_per_image": round(flops / 1e9, 3), "batches": []}
    for batch in (1, 8):
        entry["batches"].append(measure_inference(detector, files, batch, flops))
    found = find_images(files[:256])
    summary = inspect(detector, found, RowWriter(io.StringIO()),
                      InspectionSettings(batch_size=8, workers=2, progress=False))
    entry["inspection_batch8_images_per_second"] = round(summary.scored / summary.seconds, 2)
    with tempfile.TemporaryDirectory() as out:
        result = evaluate_run(
            path,
            settings=LoadSettings(runtime=runtime, precision=precision),
            out_dir=out,
            panels=False,
            progress=False,
        )
    entry.update({key: result[key] for key in ("image_auroc", "pixel_auroc", "aupro")})
    status = Path("/proc/self/status").read_text().splitlines()
    entry["peak_rss_mib"] = round(int(next(line for line in status
                                           if line.startswith("VmHWM")).split()[1]) / 1024, 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--name", default="speed/runtimes")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "RUNTIME", "PRECISION"),
                        help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure_variant(Path(args.one[0]), args.one[1],
                                                     args.one[2], args.data)))
        return
    out = ROOT / "results" / f"{args.name}.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.update({"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "command": " ".join(sys.argv)})
    for run in args.runs:
        entry = results.setdefault(run.name, {})
        for name in args.variants:
            fmt, int8, runtime, precision = VARIANTS[name]
            path = run if fmt is None else export_folder(run, fmt, int8)
            child = subprocess.run([sys.executable, __file__, "--runs", str(run), "--data",
                                    str(args.data), "--one", str(path), runtime, precision],
                                   capture_output=True, text=True)
            line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
            if child.returncode or not line:
                raise RuntimeError(f"{name} on {run}: {child.stderr[-2000:]}")
            entry[name] = json.loads(line[-1][len("RESULT "):])
            print(run.name, name, json.dumps(entry[name]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            results["machine"] = describe_machine()
            out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
