"""`anomap predict` on a large folder: images/s, peak memory, and how close the
streaming loop comes to the model's own speed.

Makes a folder of N generated JPEG photos (varied content, WIDTHxHEIGHT), a
small STPM run on the built-in demo data (or uses --run), then runs
``anomap predict --output rows.jsonl`` in a child process per decode-worker
count and reads its peak RSS (ru_maxrss). The model-only rate is the same run's
Detector on images already decoded and resized.

    python benchmarks/predict_folder.py --name speed/predict_folder
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomap import Detector
from anomap.machine import describe_machine

RESULTS = Path(__file__).parent / "results"


def make_folder(folder: Path, n: int, width: int, height: int, seed: int = 0) -> Path:
    """N distinct photos in subfolders of 1,000 (smooth noise, so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    texture = Image.fromarray(base).resize((width, height), Image.BICUBIC)
    done = sum(1 for _ in folder.rglob("*.jpg")) if folder.exists() else 0
    for index in range(done, n):
        shifted = np.roll(np.asarray(texture), (index * 7) % height, axis=0)
        shifted[: 4 + index % 50, : 4 + index % 70] = index % 256
        path = folder / f"part{index // 1000:02d}" / f"{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shifted).save(path, quality=90)
    return folder


def demo_run(work: Path, image_size: int) -> Path:
    run = work / f"run_{image_size}"
    if not (run / "calibration.json").exists():
        from anomap.demo import make_demo_dataset
        from anomap.train import TrainingPlan, fit

        data = make_demo_dataset(work / "demo_data", "brick")
        fit(
            "stpm",
            data,
            run,
            TrainingPlan(recipe={"epochs": 2, "image_size": image_size}),
            device="cpu",
            progress=False,
        )
    return run


def timed_predict(run: Path, folder: Path, output: Path, workers: int, batch_size: int
                  ) -> dict[str, float]:
    output.unlink(missing_ok=True)
    argv = ["predict", "--run", str(run), str(folder), "--output", str(output), "--quiet",
            "--device", "cpu", "--workers", str(workers), "--batch-size", str(batch_size),
            "--overwrite"]
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark into a forked child
    child = ("import sys\nfrom anomap.cli import main\ncode = main(sys.argv[1:])\n"
             "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
             "print('peak_kib', hwm.split()[1], file=sys.stderr)\nsys.exit(code)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", child, *argv], check=True, text=True,
                          stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    peak_kib = int(done.stderr.rsplit("peak_kib", 1)[1].split()[0])
    rows = output.read_text().count("\n")
    loop = json.loads(output.with_name(output.name + ".summary.json").read_text())
    return {"workers": workers, "rows": rows, "seconds": round(seconds, 2),
            "images_per_second": round(rows / seconds, 2),
            "loop_images_per_second": loop["images_per_second"],
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "summary": done.stderr.strip().splitlines()[-2]}


def model_only(run: Path, folder: Path, batch_size: int, n: int = 256) -> float:
    detector = Detector.load(run, "cpu")
    paths = sorted(folder.rglob("*.jpg"))[:n]
    prepared = [detector.prepare(Image.open(p).convert("RGB")) for p in paths]
    detector.predict_prepared(prepared[:batch_size])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(prepared), batch_size):
        detector.predict_prepared(prepared[start:start + batch_size])
    return len(prepared) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="speed/predict_folder")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--run", type=Path, help="a trained run (default: a small demo STPM)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomap_predict_folder"))
    args = parser.parse_args()

    folder = make_folder(args.work / f"photos_{args.width}x{args.height}", args.n, args.width,
                         args.height)
    run = args.run or demo_run(args.work, args.image_size)
    result = {"n_images": args.n, "photo": f"{args.width}x{args.height} JPEG",
              "run": str(run), "batch_size": args.batch_size,
              "model_only_images_per_second": round(model_only(run, folder, args.batch_size), 2),
              "predict": [], "cpu_threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "command": " ".join(sys.argv)}
    for workers in args.workers:
        result["predict"].append(timed_predict(run, folder, args.work / "rows.jsonl", workers,
                                               args.batch_size))
        print(json.dumps(result["predict"][-1]), flush=True)
    path = RESULTS / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = describe_machine()
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
