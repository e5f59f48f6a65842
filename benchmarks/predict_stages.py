"""Where end-to-end prediction time goes: decode, letterbox, network, map back.

One thread, batch 8, real photos: model-only (ready tensors through the network
and scoring), then ``Detector.predict`` end to end twice, once as a table of
verdicts needs it (the photo-size map never made) and once as pictures need it
(every prediction's ``anomaly_map`` made), each under cProfile, with the
functions that took the most time.

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
def top_functions(profile: cProfile.Profile, n: int = 12) -> list[list[Any]]:
    """The functions that took the most time themselves: [where, seconds, calls]."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:n]
    return [[f"{Path(filename).name}:{line}({function})" if filename != "~" else function,
             round(tottime, 3), calls] for (filename, line, function), (calls, _, tottime, _, _)
            in rows]


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
            "profiled_seconds": round(seconds, 2), "top_functions": top_functions(profile)}


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
