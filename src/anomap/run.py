"""The library API: a trained run (or its export) that reads photos.

    >>> from anomap import Detector
    >>> detector = Detector.load("runs/tiles")
    >>> result = detector.predict("photo.png")[0]
    >>> result.score, result.verdict, result.anomaly_map.shape

What a run folder holds is :mod:`anomap.runfolder`'s; how a map becomes a
score and a verdict is :mod:`anomap.scoring`'s, for every runtime.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomap.data import Box, load_image, to_pil
from anomap.inference import InferenceModel, resolve_precision
from anomap.methods import AnomalyModel
from anomap.runfolder import (
    EXPORT_FILE,
    FP32_POSITION_STATS_FILE,
    POSITION_STATS_FILE,
    RunConfig,
    RunError,
    is_export,
    load_calibration,
    load_json,
    load_model,
    load_position_stats,
)
from anomap.runtimes import RUNTIMES, default_runtime, load_network, readable_runtimes
from anomap.scoring import FAIL, PASS, MapReader, Thresholds, pixel_mask, resize_map
from anomap.trust import (
    PROBE_ACTIONS,
    CheckSet,
    DisagreementError,
    Readings,
    load_probe,
    replay,
)

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | str | Path


@dataclass(frozen=True)
class LoadSettings:
    """Where and how a run (or its export) runs here, shared by ``test``, ``predict``,
    the service and Ray: the torch ``device`` and ``precision`` of a run, the
    ``runtime`` of an export and what its ``probe`` does (see :meth:`Detector.load`)."""

    device: str = "auto"
    precision: str = "fp32"
    runtime: str = "auto"
    probe: str = "refuse"


@dataclass(frozen=True)
class PreparedImage:
    """A photo made into the network's input, with what maps its map back."""

    array: np.ndarray  # (S, S, 3) uint8
    box: Box
    size: tuple[int, int]  # the photo's (height, width)


@dataclass
class Prediction:
    """What anomap says about one image.

    The map at the photo's own size is made when first asked for: resizing it
    costs as much as a sixth of a CPU prediction, and a table of verdicts never
    needs it (only pictures and masks do)."""

    score: float
    verdict: str  # "pass" or "fail"
    frame_map: torch.Tensor  # (S, S) float32, the evaluation frame the score was read in
    size: tuple[int, int]  # the photo's (height, width)
    threshold: float
    path: str | None = None
    pixel_threshold: float | None = None

    @functools.cached_property
    def anomaly_map(self) -> np.ndarray:
        """(H, W) float32, in the photo's own size."""
        return resize_map(self.frame_map, self.size)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(H, W) bool: where the map reaches the pixel threshold."""
        return pixel_mask(self.anomaly_map, self.threshold if self.pixel_threshold is None
                          else self.pixel_threshold)

    @property
    def is_anomalous(self) -> bool:
        return self.verdict == FAIL


class Detector:
    """A trained network with the way its run reads maps: call it on images.

    The model is copied with BatchNorm folded into the convolutions (see
    :mod:`anomap.inference`), which makes CPU inference about 1.3-1.8x faster.
    ``precision="bf16"`` computes in bfloat16, about 2x faster again on a CPU
    that does so natively, at the cost of noisier maps (docs/speed.md);
    ``auto`` picks it where native. Verdicts use the float32-calibrated threshold.
    ``reader`` (:class:`anomap.scoring.MapReader`) holds the geometry, the score
    options, the position statistics and the thresholds.
    """

    def __init__(self, model: AnomalyModel | Any, reader: MapReader,
                 config: RunConfig | None = None, precision: str = "fp32") -> None:
        if isinstance(model, torch.nn.Module):
            device = next(model.parameters()).device
            self.model = InferenceModel(model, resolve_precision(precision, device))
        else:  # an exported network (anomap.runtimes): raw maps, nothing else
            self.model = model
        if reader.thresholds is None:
            raise ValueError("a Detector needs a calibrated reader (thresholds)")
        self.reader = reader
        self.config = config
        #: for an export: which runtime was loaded and why (the probe's records)
        self.load_report: dict[str, Any] | None = None

    @property
    def geometry(self) -> Any:
        return self.reader.geometry

    @property
    def thresholds(self) -> Thresholds:
        assert self.reader.thresholds is not None
        return self.reader.thresholds

    @property
    def threshold(self) -> float:
        return self.thresholds.image

    @property
    def pixel_threshold(self) -> float:
        """Where the defect mask starts (runs calibrated before it existed: the threshold)."""
        return self.thresholds.pixel

    @property
    def display_range(self) -> tuple[float, float]:
        return self.thresholds.display_range

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", None) or next(self.model.parameters()).device

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` (what ``auto`` resolved to) or ``int8`` (an int8 export)."""
        return self.model.precision

    @property
    def runtime(self) -> str:
        return getattr(self.model, "runtime", "torch")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto",
             precision: str = "fp32", runtime: str = "auto", probe: str = "refuse"
             ) -> Detector:
        """A run folder (runtime ``torch``) or an export folder from ``anomap export``.

        An export replays its probe (:mod:`anomap.trust`) on this machine first:
        ``runtime="auto"`` takes the fastest runtime that passes it; a named runtime
        that fails it is refused (``probe="refuse"``), or the export's fp32 graph is
        loaded in its place with a warning (``"fallback"``); ``"off"`` skips it.
        What was tried and why is in :attr:`load_report`."""
        path = Path(path)
        if runtime not in ("auto", *RUNTIMES):
            raise ValueError(f"runtime {runtime!r}: choose auto or one of {', '.join(RUNTIMES)}")
        if probe not in PROBE_ACTIONS:
            raise ValueError(f"probe {probe!r}: choose one of {', '.join(PROBE_ACTIONS)}")
        config = RunConfig.load(path)
        if is_export(path):
            return cls._load_export(path, config, runtime, probe)
        if runtime not in ("auto", "torch"):
            raise RunError(f"{path} is a run: runtime {runtime} reads an export of it; make "
                           f"one with 'anomap export --run {path} --out DIR'")
        network, config = load_model(path, device, config=config)
        return cls(network, cls._reader(path, config), config, precision)

    @staticmethod
    def _reader(path: Path, config: RunConfig, fp32_graph: bool = False) -> MapReader:
        """How the run (or one graph of its export) reads maps, from its folder."""
        stats = load_position_stats(path, config, FP32_POSITION_STATS_FILE if fp32_graph
                                    else POSITION_STATS_FILE)
        return MapReader(config.geometry, config.model, stats,
                         Thresholds.from_calibration(load_calibration(path, fp32_graph)))

    @classmethod
    def _from_export(cls, path: Path, config: RunConfig, runtime: str,
                     fp32_graph: bool = False) -> Detector:
        """One runtime on one of the export's graphs, with that graph's thresholds."""
        network = load_network(path, runtime, config.model, fp32_graph=fp32_graph)
        return cls(network, cls._reader(path, config, fp32_graph), config, "fp32")

    @classmethod
    def _load_export(cls, path: Path, config: RunConfig, runtime: str,
                     probe: str) -> Detector:
        export = load_json(path / EXPORT_FILE)
        candidates = readable_runtimes(path) if runtime == "auto" else [runtime]
        stored = None if probe == "off" else load_probe(path)
        if stored is None:
            chosen = default_runtime(path) if runtime == "auto" else runtime
            detector = cls._from_export(path, config, chosen)
            why = ("the probe was turned off" if probe == "off" else
                   "this export holds no probe (made before anomap checked exports where "
                   "they run): re-export it to have it checked on this machine")
            detector.load_report = {"runtime": chosen, "why": why, "tried": []}
            if probe != "off":
                log.warning("%s: %s", path, why)
            return detector
        int8 = bool(export.get("int8"))
        checked = export.get("agreement_by_runtime", {})  # of the export's own graph
        tried: list[tuple[Detector | None, dict[str, Any]]] = []
        for graph_is_fp32 in ((False, True) if int8 and probe == "fallback" else (False,)):
            for name in candidates:
                failed_check = not graph_is_fp32 and checked.get(name, {}).get("passed") is False
                if failed_check:  # the whole check outweighs the probe's 18 images
                    tried.append((None, {
                        "runtime": name, "graph": "int8" if int8 else "fp32",
                        "passed": False, "seconds": 0.0,
                        "images_per_second": 0.0,
                        "problems": ["it failed the export's check where the export was "
                                     "built (" + "; ".join(checked[name]["problems"])
                                     + "); export again on this machine to check it here"]}))
                    continue
                detector = cls._from_export(path, config, name, graph_is_fp32)
                report = replay(detector.read, stored, int8 and not graph_is_fp32)
                report.update(runtime=name, graph="fp32" if graph_is_fp32 or not int8
                              else "int8")
                tried.append((detector, report))
            passing = [pair for pair in tried if pair[1]["passed"]]
            if passing:
                break
            if int8 and probe == "fallback":
                log.warning("%s: the int8 graph fails its probe on this machine (%s); "
                            "falling back to the export's fp32 graph", path,
                            "; ".join(f"{r['runtime']}: {', '.join(r['problems'])}"
                                      for _, r in tried))
        if not passing:
            failures = "; ".join(f"{r['runtime']} {r['graph']}: {', '.join(r['problems'])}"
                                 for _, r in tried)
            advice = ("load it with --probe fallback to use its fp32 graph, or export the run "
                      "without --int8" if int8 else "report this with the export's export.json")
            raise DisagreementError(
                f"{path}: the export does not keep the run's decisions on this machine "
                f"({len(stored.check)} probe images: {failures}); {advice}")
        found, best = max(passing, key=lambda pair: pair[1]["images_per_second"])
        assert found is not None
        detector = found
        others = [f"{r['runtime']} {r['graph']} {r['images_per_second']:g} img/s"
                  + ("" if r["passed"] else " (failed the probe)")
                  for d, r in tried if d is not detector]
        why = (f"passed the probe on this machine ({best['seconds']:.2f} s for "
               f"{len(stored.check)} images, {best['images_per_second']:g} img/s)")
        if others:
            why += f"; the fastest that passed, against {', '.join(others)}"
        detector.load_report = {"runtime": best["runtime"], "graph": best["graph"], "why": why,
                                "tried": [r for _, r in tried]}
        log.info("%s: runtime %s (%s graph): %s", path, best["runtime"], best["graph"], why)
        return detector

    def read(self, check: CheckSet, batch_size: int = 8) -> Readings:
        """Maps (evaluation frame), scores and verdicts of network inputs, through
        :meth:`predict_prepared`: what :mod:`anomap.trust` compares."""
        size = check.inputs.shape[1]
        prepared = [PreparedImage(array, box, (size, size))
                    for array, box in zip(check.inputs, check.boxes, strict=True)]
        results = [result for start in range(0, len(prepared), batch_size)
                   for result in self.predict_prepared(prepared[start:start + batch_size])]
        return Readings(torch.stack([r.frame_map for r in results]).float().numpy(),
                        np.array([r.score for r in results], dtype=np.float64),
                        np.array([r.is_anomalous for r in results]), self.threshold)

    @torch.no_grad()
    def network_maps_and_scores(self, images: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A float batch (B, 3, S, S) in [0, 1] that is already the network's input
        -> (maps (B, S, S) in the network's frame, scores (B,)) on the CPU.

        No letterbox, margin or crop back: for inputs made some other way (tiles
        cut at the network size, say). On a run trained with ``--resize-mode
        stretch`` and no margin these are :meth:`predict`'s scores; on others, the
        padding a photo would have had is missing, so score photos with
        :meth:`predict`, which applies the run's geometry."""
        raw = self.model.anomaly_map(images.to(self.device))
        maps = raw if self.reader.standardize is None else self.reader.standardize(raw)
        return maps.cpu(), self.reader.score(maps).cpu()

    def prepare(self, photo: Image.Image) -> PreparedImage:
        """A decoded RGB photo -> the network's input and what maps it back.

        Cheap and thread-safe, so a pool of decode workers can run it beside the
        network (:mod:`anomap.inspection`)."""
        array, box = self.geometry.apply(photo)
        return PreparedImage(array, box, (photo.height, photo.width))

    @torch.no_grad()
    def predict_prepared(self, prepared: Sequence[PreparedImage],
                         paths: Sequence[str | None] | None = None) -> list[Prediction]:
        """One forward pass over already prepared images (one batch)."""
        if not prepared:
            return []
        tensor = torch.from_numpy(np.stack([p.array for p in prepared])).permute(0, 3, 1, 2)
        raw = self.model.anomaly_map(tensor.float().div(255.0).to(self.device))
        reading = self.reader.read(raw, [p.box for p in prepared])
        paths = list(paths) if paths is not None else [None] * len(prepared)
        assert reading.anomalous is not None
        return [Prediction(score=float(score), verdict=FAIL if anomalous else PASS,
                           frame_map=amap, size=item.size, threshold=self.threshold,
                           pixel_threshold=self.pixel_threshold, path=path)
                for item, amap, score, anomalous, path in zip(
                    prepared, reading.maps, reading.scores, reading.anomalous, paths,
                    strict=True)]

    def predict(self, images: ImageLike | Sequence[ImageLike] | torch.Tensor,
                batch_size: int = 8) -> list[Prediction]:
        """Score images of any size and mode; maps come back at each photo's size.

        For a folder of files, :func:`anomap.inspection.inspect` streams results,
        decodes in parallel and survives bad files."""
        if isinstance(images, torch.Tensor):
            batch = images if images.dim() == 4 else images[None]
            items: list[ImageLike] = [img.permute(1, 2, 0).cpu().numpy() for img in batch]
        elif isinstance(images, str | Path | Image.Image | np.ndarray):
            items = [images]
        else:
            items = list(images)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prepared = [self.prepare(load_image(x, draft=self.geometry.decode_floor)
                                     if isinstance(x, str | Path) else to_pil(x))
                        for x in chunk]
            results += self.predict_prepared(
                prepared, [str(x) if isinstance(x, str | Path) else None for x in chunk])
        return results

    __call__ = predict
