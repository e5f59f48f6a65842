"""Speed benchmark: STPM inference and training on this machine's CPU (or GPU).

Measures, at 256x256, for each backbone:
- model-only images/s (batch 1 and 32): anomaly map + score on ready tensors;
- end-to-end images/s (batch 1 and 32): JPEG decode, letterbox resize, model,
  map back to the photo frame, score, via :class:`anomap.Detector`;
- training ms per image (batch 32, forward + backward + SGD step);
- FLOPs per image (torch's FlopCounterMode) and the achieved GFLOP/s.

Random weights are fine for timing (same architecture, same cost).

    python benchmarks/speed.py            # writes benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from anomap import Detector
from anomap.data import Geometry, discover
from anomap.methods import build_model

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def flops_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.rand(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def measure(name: str, paths: list[Path], geometry: Geometry, device: torch.device
            ) -> dict[str, float]:
    """All figures for one backbone."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    size = geometry.size
    model = build_model("stpm", backbone=name, weights="random").to(device)
    detector = Detector(model, geometry, threshold=1.0, display_range=(0.0, 1.0))
    fast = detector.model
    flops = flops_per_image(fast, size, device)
    entry: dict[str, float] = {"gflops_per_image": round(flops / 1e9, 3)}
    for batch in (1, 32):
        images = torch.rand(batch, 3, size, size, device=device)

        def model_only(images: torch.Tensor = images) -> None:
            with torch.inference_mode():
                fast.image_score(fast.anomaly_map(images))
            sync()

        seconds = best_time(model_only, 10 if batch == 1 else 3)
        entry[f"model_images_per_second_b{batch}"] = round(batch / seconds, 2)
        n = min(len(paths), 32 if batch == 1 else len(paths))
        seconds = best_time(lambda n=n, b=batch: detector.predict(paths[:n], batch_size=b), 2)
        entry[f"end_to_end_images_per_second_b{batch}"] = round(n / seconds, 2)
        for kind in ("model", "end_to_end"):
            ips = entry[f"{kind}_images_per_second_b{batch}"]
            entry[f"{kind}_gflop_per_second_b{batch}"] = round(ips * flops / 1e9, 2)
    model.train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(32, 3, size, size, device=device)

    def train_step() -> None:
        loss = model.training_loss(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync()

    entry["train_ms_per_image_b32"] = round(best_time(train_step, 3) / 32 * 1000, 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    # Random weights can produce denormal floats, which a trained model does not:
    # flush them so the timing reflects the architecture, not the random draw.
    torch.set_flush_denormal(True)
    paths = [s.path for s in discover(args.data).test][: args.n_images]
    geometry = Geometry(args.size, "letterbox")
    results = {}
    for name in args.backbones:
        results[name] = measure(name, paths, geometry, device)
        print(name, json.dumps(results[name]))
    record = {
        "command": "python benchmarks/speed.py",
        "size": args.size,
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"),
        "torch": torch.__version__,
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
