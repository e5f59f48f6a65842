"""Where end-to-end prediction time goes: decode, letterbox, network, map back.

One thread, batch 8, real photos: model-only (ready tensors through the network
and scoring), then ``Detector.predict`` end to end twice, once as a table of
verdicts needs it (the photo-size map never made) and once as pictures need it
(every prediction's ``anomaly_map`` made), each under cProfile, with the time of
each stage summed from the functions that do it.

    python benchmarks/predict_stages.py --run /tmp/anomap_runs/stpm_mtd_e8 \\
        --name speed/predict_stages_mtd
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent
MTD_TEST = ROOT.parents[1] / "shared" / "data" / "mtd" / "test"
#: stage -> substrings of the profiled functions that do its work (tottime summed)
STAGES = {
    "read and decode": ("ImagingDecoder", "BufferedReader", "ImageFile.py", "Image.py(open)",
                        "JpegImagePlugin", "PngImagePlugin", "convert"),
    "letterbox": ("ImagingCore' objects}", "_arraypad", "pad", "data.py"),
    "network": ("onnxruntime", "openvino", "conv", "_C._nn", "linear", "batch_norm",
                "relu", "hardtanh", "pool", "methods/", "backbones/"),
    "map back and score": ("upsample", "interpolate", "stack", "amax", "run.py",
                           "standardize"),
}


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    totals = dict.fromkeys([*STAGES, "other"], 0.0)
    for (filename, _, function), (_, _, tottime, _, _) in stats.items():
        where = f"{filename}({function})" if filename != "~" else function
        if where.startswith("<built-in method torch._C._nn.upsample") or "upsample" in where:
            totals["map back and score"] += tottime
            continue
        stage = next((name for name, marks in STAGES.items()
                      if any(mark in where for mark in marks)), "other")
        totals[stage] += tottime
    return {key: round(value, 3) for key, value in totals.items()}


def timed_predict(detector: Any, files: list[Path], maps: bool) -> dict[str, Any]:
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for start in range(0, len(files), 8):
        for prediction in detector.predict(files[start:start + 8], batch_size=8):
            if maps:
                prediction.mask  # noqa: B018 - what a picture needs: the map at photo size
    profile.disable()
    seconds = time.perf_counter() - started
    return {"images_per_second": round(len(files) / seconds, 2),
            "profiled_seconds": round(seconds, 2), "stages": stage_seconds(profile)}


def main() -> None:
    from anomap.data import load_image
    from anomap.run import Detector

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run or export folder")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--images", type=Path, default=MTD_TEST)
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--name", default="speed/predict_stages")
    args = parser.parse_args()
    files = sorted(p for p in args.images.rglob("*")
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
    detector = Detector.load(args.run, "cpu", runtime=args.runtime)
    detector.predict(files[:8])  # warm-up
    prepared = torch.stack([torch.from_numpy(detector.prepare(load_image(f)).array)
                            for f in files[:64]]).permute(0, 3, 1, 2).float().div(255)
    started = time.perf_counter()
    for start in range(0, len(prepared), 8):
        detector.network_maps_and_scores(prepared[start:start + 8])
    model = len(prepared) / (time.perf_counter() - started)
    record: dict[str, Any] = {
        "run": str(args.run), "runtime": detector.runtime, "precision": detector.precision,
        "n_images": len(files), "images": str(args.images),
        "model_images_per_second": round(model, 2),
        "end_to_end_verdicts": timed_predict(detector, files, maps=False),
        "end_to_end_with_maps": timed_predict(detector, files, maps=True),
        "command": " ".join(["python", "benchmarks/predict_stages.py", *sys.argv[1:]]),
        "machine": describe_machine()}
    for key in ("end_to_end_verdicts", "end_to_end_with_maps"):
        record[key]["share_of_model_only"] = round(
            record[key]["images_per_second"] / model, 3)
    print(json.dumps(record, indent=2))
    out = ROOT / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, out)


if __name__ == "__main__":
    main()
