"""Speed benchmark: inference and training of each method on this machine's CPU (or GPU).

Measures, at 256x256, for each model spec (``stpm:<backbone>``, ``draem:<preset>``),
in float32 and in bfloat16 (``--precision bf16``), at batch 1, 8 and the recipe's:
- model-only images/s: anomaly map + score on ready tensors;
- end-to-end images/s: JPEG decode, letterbox resize, model, map back to the
  photo frame, score, via :class:`anomap.Detector`;
- training ms per image and samples/s at the recipe's batch size (forward,
  backward, optimiser step; for DRAEM also the synthetic-anomaly generation);
- for methods trained on synthetic anomalies, the generator alone (samples/s);
- FLOPs per image (torch's FlopCounterMode) and the achieved GFLOP/s.

Random weights are fine for timing (same architecture, same cost). Results are
merged into the JSON file, one entry per spec.

    python benchmarks/speed.py            # stpm:efficientnet_lite0 stpm:resnet18
    python benchmarks/speed.py --models draem:cpu draem:paper
    python benchmarks/speed.py --models rstpm:paper fractalad:paper --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from anomap import Detector
from anomap.allocator import keep_freed_memory
from anomap.data import Geometry, discover
from anomap.machine import describe_machine
from anomap.methods import PAPER, PAPER_LITE, AnomalyModel, Recipe, build_model, get_method
from anomap.scoring import MapReader, Thresholds, image_score
from anomap.synth import make_anomaly_source, synthesize
from anomap.train import build_optimizer

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "speed" / "speed.json"
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"


def best_time(fn: Callable[[], object], repeats: int = 3, slow_seconds: float = 5.0) -> float:
    """Fastest of ``repeats`` timed calls after a warm-up; one call when it is slow."""
    started = time.perf_counter()
    fn()  # warm-up
    if time.perf_counter() - started > slow_seconds:
        repeats = 1
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timing covers it (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model: torch.nn.Module, size: int, device: torch.device) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.anomaly_map(torch.rand(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def build(spec: str) -> tuple[AnomalyModel, Recipe]:
    """``stpm:<backbone>`` (paper recipe) or ``<method>:<preset>``; random weights."""
    method, _, variant = spec.partition(":")
    cls = get_method(method)
    if method == "stpm":
        return build_model("stpm", backbone=variant or None, weights="random"), \
            cls.default_recipe()
    name = variant or PAPER
    if name == PAPER and PAPER_LITE in cls.presets() and not cls.teachers_found(PAPER):
        name = PAPER_LITE  # the same recipe with the offline teachers
    preset = cls.presets()[name]
    return build_model(method, **preset.config), preset.recipe


def measure_inference(detector: Detector, paths: list[Path], batch: int, flops: float
                      ) -> dict[str, float | int | str]:
    """Model-only and end-to-end images/s of one detector at one batch size."""
    fast, device, size = detector.model, detector.device, detector.geometry.size
    images = torch.rand(batch, 3, size, size, device=device)

    def model_only() -> None:
        with torch.inference_mode():
            image_score(fast.anomaly_map(images), fast.config)
        synchronize(device)

    seconds = best_time(model_only, 10 if batch == 1 else 3)
    entry: dict[str, float | int | str] = {
        "precision": detector.precision, "batch": batch,
        "model_images_per_second": round(batch / seconds, 2)}
    # at least 2 batches, and at least 2 s of model work per timed call
    n = min(len(paths), max(2 * batch, int(2.0 / seconds * batch) // batch * batch))
    seconds = best_time(lambda: detector.predict(paths[:n], batch_size=batch), 2)
    entry["end_to_end_images_per_second"] = round(n / seconds, 2)
    for kind in ("model", "end_to_end"):
        entry[f"{kind}_gflop_per_second"] = round(
            float(entry[f"{kind}_images_per_second"]) * flops / 1e9, 2)
    return entry


def measure(spec: str, paths: list[Path], geometry: Geometry, device: torch.device,
            precisions: list[str], batches: list[int]) -> dict[str, Any]:
    """All figures for one model spec: inference at every precision and batch
    size (plus the recipe's), then training."""
    size = geometry.size
    model, recipe = build(spec)
    model = model.to(device)
    batch = recipe.batch_size
    flops = flops_per_image(model.eval(), size, device)
    entry: dict[str, Any] = {"gflops_per_image": round(flops / 1e9, 3), "inference": []}
    for precision in precisions if batches else []:
        reader = MapReader(geometry, model.config, thresholds=Thresholds(1.0, 1.0, (0.0, 1.0)))
        detector = Detector(model, reader, precision=precision)
        for b in sorted({*batches, batch}):
            entry["inference"].append(measure_inference(detector, paths, b, flops))
            print(spec, json.dumps(entry["inference"][-1]), flush=True)
    model.train()
    optimizer, _ = build_optimizer(recipe, model.trainable_parameters())
    images = torch.rand(batch, 3, size, size, device=device)

    targets = model.frozen_targets(images)  # what the loop caches once per run

    def train_step(cached: bool = True) -> None:
        loss = model.training_loss(images, targets if cached else None)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)

    if targets is None:
        seconds = best_time(train_step, 3)
    else:  # against the step that recomputes the targets, interleaved: this CPU's speed drifts
        uncached = float("inf")
        seconds = best_time(train_step, 1)
        for _ in range(3):
            uncached = min(uncached, best_time(lambda: train_step(cached=False), 1))
            seconds = min(seconds, best_time(train_step, 1))
        entry["train_ms_per_image_uncached"] = round(uncached / batch * 1000, 1)
    entry.update(train_batch=batch, train_ms_per_image=round(seconds / batch * 1000, 1),
                 train_samples_per_second=round(batch / seconds, 3))
    if hasattr(model, "synthetic_batch"):  # what one step spends making its anomalies
        model.synthetic_batch(images)  # warm-up
        calls, started = 10, time.perf_counter()
        for _ in range(calls):
            model.synthetic_batch(images)
        entry["synthetic_batch_samples_per_second"] = round(
            batch * calls / (time.perf_counter() - started), 1)
    if model.name == "draem":  # its texture source alone, as docs/speed.md quotes
        source = make_anomaly_source(model.config["anomaly_source"], size)
        synthesize(images, source)  # warm-up (the source decodes its photos once)
        for p in (0.5, 1.0):  # the work is random: average many batches, not the fastest
            calls, started = 20, time.perf_counter()
            for _ in range(calls):
                synthesize(images, source, p_anomaly=p)
            seconds = (time.perf_counter() - started) / calls
            entry[f"synthesis_samples_per_second_p{p}"] = round(batch / seconds, 1)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--models", nargs="+",
                        default=["stpm:efficientnet_lite0", "stpm:resnet18"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8],
                        help="inference batch sizes (the recipe's is always added); "
                             "none given: training only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    # Random weights can produce denormal floats, which a trained model does not:
    # flush them so the timing reflects the architecture, not the random draw.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    # as anomap training and inference do (ANOMAP_SYSTEM_MALLOC=1 in the environment: off)
    kept = keep_freed_memory()
    paths = [s.path for s in discover(args.data).test][: args.n_images]
    geometry = Geometry(args.size, "letterbox")
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"results": {}}
    if record.get("size") not in (None, args.size):
        record["results"] = {}  # never mix sizes in one file
    for spec in args.models:
        entry = measure(spec, paths, geometry, device, args.precisions, args.batches)
        entry["command"] = " ".join(
            ["python benchmarks/speed.py --models", spec]
            + ([f"--size {args.size}"] if args.size != 256 else [])
            + ([] if args.batches else ["--batches"])
            + ([f"--out {args.out}"] if args.out != DEFAULT_OUT else []))
        record["results"][spec] = entry
    record.update({
        "size": args.size,
        "device": (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"),
        "torch": torch.__version__,
        "keep_freed_memory": kept,
    })
    record.pop("command", None)
    record["machine"] = describe_machine()
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
