"""Two int8 quantisers for OpenVINO side by side: ONNX Runtime's static QDQ
quantiser (what ``anomap export --int8`` uses) and NNCF's post-training
quantisation of the OpenVINO fp32 export, both calibrated on the run's held-out
normals. Model-only images/s at batch 8 in one process, one after the other,
and the largest map difference from fp32 relative to the map's range.

Needs the exports that ``benchmarks/runtimes.py`` makes and ``pip install nncf``.

    python benchmarks/int8_quantisers.py --runs /tmp/anomap_runs/stpm_lite0_e10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent


def images_per_second(core: Any, model: Any, batch: np.ndarray, seconds: float = 10.0
                      ) -> tuple[float, np.ndarray]:
    """Sustained rate of one compiled model on one batch, and its output."""
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    for _ in range(3):
        request.infer({0: batch})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        outputs = request.infer({0: batch})
        done += len(batch)
    return done / (time.perf_counter() - started), np.array(next(iter(outputs.values())))


def measure(run: Path, exports: Path) -> dict[str, Any]:
    import nncf
    import openvino as ov

    from anomap.data import load_set, to_float
    from anomap.runfolder import load_model, normal_split

    _, config = load_model(run, "cpu")
    train, val = normal_split(config)
    held_out = load_set(val or train, config.geometry, progress=False)
    images = to_float(held_out.images).numpy()
    core = ov.Core()
    fp32 = core.read_model(exports / f"{run.name}_openvino" / "model.xml")
    started = time.perf_counter()
    nncf_int8 = nncf.quantize(fp32, nncf.Dataset([images[i:i + 1] for i in range(len(images))]),
                              subset_size=len(images),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    quantise_seconds = time.perf_counter() - started
    batch = np.ascontiguousarray(images[:8])
    entry: dict[str, Any] = {"nncf_quantize_seconds": round(quantise_seconds, 1)}
    reference = None
    for name, model in (("fp32", fp32),
                        ("onnxruntime_qdq_int8",
                         core.read_model(exports / f"{run.name}_openvino_int8" / "model.xml")),
                        ("nncf_int8", nncf_int8)):
        rate, maps = images_per_second(core, model, batch)
        reference = maps if reference is None else reference
        spread = float(reference.max() - reference.min())
        entry[name] = {"model_images_per_second_b8": round(rate, 1),
                       "max_map_difference_relative": round(
                           float(np.abs(maps - reference).max()) / spread, 4)}
        print(run.name, name, entry[name], flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--exports", type=Path, default=Path("/tmp/anomap_runs/exports"))
    parser.add_argument("--name", default="speed/int8_quantisers")
    args = parser.parse_args()
    out = ROOT / "results" / f"{args.name}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    record["command"] = " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name,
                                  *sys.argv[1:]])
    for run in args.runs:
        record[run.name] = measure(run, args.exports)
        record["machine"] = describe_machine()
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
