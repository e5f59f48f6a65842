"""Whether a network other than the run's own keeps the run's decisions.

An export (fp32 or int8, ONNX Runtime or OpenVINO) is only as good as the
verdicts and heat maps it gives where it runs. int8 above all: on a CPU
without VNNI, int8 convolutions multiply-add through 16-bit intermediates that
can saturate, and an export that was fine where it was built can fail every
good part elsewhere. So agreement is measured on what the run may use, never a
test image: held-out normal images and synthetic anomalies pasted into them.

- At export, every image of that check set goes through the run (fp32) and
  the export; the export is refused unless :func:`compare` finds the verdicts
  and the localisation (pixel AUROC on the synthetic anomalies) within a
  :class:`Tolerance` of the run's.
- A few of those images, with the run's readings of them, ship inside the
  export as a probe (``probe.npz``); loading the export replays them on the
  machine it runs on (:func:`replay`), so a runtime that disagrees there is
  refused before it judges a single part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomap.data import Box, LoadedSet
from anomap.metrics import image_auroc, pixel_auroc

PROBE_FILE = "probe.npz"
NORMAL = "normal"
#: what Detector.load does when a runtime fails its probe: refuse to load, load the
#: export's fp32 graph instead (with a warning), or skip the probe
PROBE_ACTIONS = ("refuse", "fallback", "off")


class DisagreementError(RuntimeError):
    """A network that does not keep the run's decisions (at export, or at load)."""


@dataclass(frozen=True)
class Tolerance:
    """How far a network may stray from the run's own readings.

    ``verdict_share``: the share of images whose pass/fail may differ (at least
    one image is always allowed, for a score that sits on the threshold);
    None: verdicts are not compared. AUROC drops are of the synthetic
    anomalies against the clean normals; None: not compared.
    ``relative_map_difference``: the largest map difference, relative to the
    run's largest map value; None: not compared (int8 maps differ by design)."""

    verdict_share: float | None = None
    image_auroc_drop: float | None = None
    pixel_auroc_drop: float | None = None
    relative_map_difference: float | None = None

    def allowed_verdict_changes(self, n: int) -> int:
        return 0 if self.verdict_share is None else max(1, math.floor(self.verdict_share * n))


#: an fp32 export against the run it came from, on the machine that built it: only
#: float rounding may differ
FP32_EXPORT = Tolerance(relative_map_difference=1e-4)
#: an fp32 graph on another machine: other kernels, other rounding, nothing more
FP32_PROBE = Tolerance(relative_map_difference=1e-3)
#: an int8 export against the run, on the whole check set (docs/deployment.md)
INT8_EXPORT = Tolerance(verdict_share=0.05, image_auroc_drop=0.02, pixel_auroc_drop=0.02)
#: an int8 graph replaying the probe against its own readings where it was checked: the
#: same graph read by other kernels (a saturating CPU moved maps by 3.5x their range and
#: failed every good part); int8 maps of one graph differ between runtimes by design
INT8_PROBE = Tolerance(verdict_share=0.05, pixel_auroc_drop=0.02)


@dataclass(frozen=True)
class CheckSet:
    """Network inputs, what maps their maps back to the evaluation frame, and which
    hold a (synthetic) anomaly where."""

    inputs: np.ndarray  # (N, S, S, 3) uint8, the network's input
    boxes: list[Box]
    kinds: np.ndarray  # (N,) str: "normal", or the kind of anomaly pasted in
    masks: np.ndarray  # (N, S, S) bool, evaluation frame

    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def labels(self) -> np.ndarray:
        return (self.kinds != NORMAL).astype(np.int8)

    @classmethod
    def from_sets(cls, normals: LoadedSet, **anomalies: LoadedSet) -> CheckSet:
        """Clean held-out normals followed by the same images with anomalies of each kind."""
        size = normals.images.shape[-1]
        parts = [normals, *anomalies.values()]
        images = torch.cat([part.images for part in parts]).permute(0, 2, 3, 1)
        masks = torch.cat([torch.zeros(len(normals), size, size, dtype=torch.bool)]
                          + [part.masks for part in anomalies.values()
                             if part.masks is not None])
        kinds = np.array([NORMAL] * len(normals)
                         + [kind for kind, part in anomalies.items() for _ in range(len(part))])
        return cls(np.ascontiguousarray(images.numpy()),
                   [box for part in parts for box in part.boxes], kinds, masks.numpy())

    def subset(self, indices: list[int]) -> CheckSet:
        return CheckSet(self.inputs[indices], [self.boxes[i] for i in indices],
                        self.kinds[indices], self.masks[indices])

    def probe_indices(self, per_kind: int) -> list[int]:
        """The first ``per_kind`` images of each kind, normals first: the probe's."""
        order = [NORMAL, *sorted(set(self.kinds.tolist()) - {NORMAL})]
        return [int(i) for kind in order for i in np.flatnonzero(self.kinds == kind)[:per_kind]]


@dataclass(frozen=True)
class Readings:
    """What one network (through the one read path, ``Detector.read``) made of a check set."""

    maps: np.ndarray  # (N, S, S) float32, evaluation frame, as the verdict reads them
    scores: np.ndarray  # (N,)
    failed: np.ndarray  # (N,) bool verdicts
    threshold: float

    def subset(self, indices: list[int]) -> Readings:
        return Readings(self.maps[indices], self.scores[indices], self.failed[indices],
                        self.threshold)


def compare(reference: Readings, candidate: Readings, check: CheckSet,
            tolerance: Tolerance) -> dict[str, Any]:
    """How far ``candidate`` is from ``reference`` on ``check``: a JSON-ready record
    whose ``problems`` list says, in words, each tolerance broken (empty: it passed)."""
    normal = check.kinds == NORMAL
    span = max(float(np.abs(reference.maps).max()), 1e-12)
    changed = reference.failed != candidate.failed
    record: dict[str, Any] = {
        "n_normal": int(normal.sum()), "n_anomalous": int((~normal).sum()),
        "reference_threshold": reference.threshold, "threshold": candidate.threshold,
        "verdicts_differ": int(changed.sum()),
        "verdicts_differ_on_normals": int(changed[normal].sum()),
        "normals_failed": [int(reference.failed[normal].sum()),
                           int(candidate.failed[normal].sum())],
        "max_relative_map_difference": float(np.abs(reference.maps - candidate.maps).max()) / span,
    }
    by_kind: dict[str, dict[str, list[float]]] = {}
    for kind in sorted(set(check.kinds.tolist()) - {NORMAL}):
        chosen = normal | (check.kinds == kind)
        labels, masks = check.labels[chosen], check.masks[chosen]
        by_kind[kind] = {
            "image_auroc": [image_auroc(labels, reference.scores[chosen]),
                            image_auroc(labels, candidate.scores[chosen])],
            "pixel_auroc": [pixel_auroc(masks, reference.maps[chosen]),
                            pixel_auroc(masks, candidate.maps[chosen])]}
    if by_kind and normal.any():
        record["synthetic_by_kind"] = by_kind
        record["synthetic_image_auroc"] = [image_auroc(check.labels, reference.scores),
                                           image_auroc(check.labels, candidate.scores)]
        record["synthetic_pixel_auroc"] = [pixel_auroc(check.masks, reference.maps),
                                           pixel_auroc(check.masks, candidate.maps)]
    problems = []
    allowed = tolerance.allowed_verdict_changes(len(check))
    if tolerance.verdict_share is not None and record["verdicts_differ"] > allowed:
        problems.append(f"verdicts differ on {record['verdicts_differ']} of {len(check)} images "
                        f"(normals failed: {record['normals_failed'][1]} of "
                        f"{record['n_normal']} against the run's {record['normals_failed'][0]}; "
                        f"tolerance {allowed})")
    for kind, aurocs in by_kind.items():
        for key, limit in (("image_auroc", tolerance.image_auroc_drop),
                           ("pixel_auroc", tolerance.pixel_auroc_drop)):
            ours, theirs = aurocs[key]
            if limit is not None and not theirs >= ours - limit:  # NaN fails too
                problems.append(f"{key.split('_')[0]} AUROC on the synthetic {kind} anomalies "
                                f"{theirs:.3f} against the run's {ours:.3f} (tolerance {limit})")
    if (tolerance.relative_map_difference is not None
            and not record["max_relative_map_difference"] <= tolerance.relative_map_difference):
        problems.append(f"maps differ by up to {record['max_relative_map_difference']:.2e} of "
                        f"their range (tolerance {tolerance.relative_map_difference:g})")
    record["problems"] = problems
    record["passed"] = not problems
    return record


@dataclass(frozen=True)
class Probe:
    """A few check images, the run's readings of them, and for an int8 export the
    readings its int8 graph gave where it was built and passed the check: what that
    graph must reproduce wherever it runs (on 18 images, int8 against fp32 is too
    noisy to judge again; a CPU whose kernels read the graph differently is not)."""

    check: CheckSet
    run: Readings
    int8: Readings | None = None


def _arrays(prefix: str, readings: Readings) -> dict[str, np.ndarray]:
    return {f"{prefix}maps": readings.maps.astype(np.float16),
            f"{prefix}scores": readings.scores, f"{prefix}failed": readings.failed,
            f"{prefix}threshold": np.float64(readings.threshold)}


def _readings(data: Any, prefix: str) -> Readings:
    return Readings(data[f"{prefix}maps"].astype(np.float32), data[f"{prefix}scores"],
                    data[f"{prefix}failed"], float(data[f"{prefix}threshold"]))


def save_probe(probe: Probe, path: Path) -> Path:
    """probe.npz (maps in float16: their rounding is far below any tolerance)."""
    check = probe.check
    boxes = np.array([[b.top, b.left, b.height, b.width] for b in check.boxes], dtype=np.int32)
    extra = {} if probe.int8 is None else _arrays("int8_", probe.int8)
    with path.open("wb") as handle:
        np.savez_compressed(handle, inputs=check.inputs, boxes=boxes, kinds=check.kinds,
                            masks=np.packbits(check.masks, axis=-1), **_arrays("", probe.run),
                            **extra)
    return path


def load_probe(folder: Path) -> Probe | None:
    """An export's probe; None for exports made before probes."""
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        size = data["inputs"].shape[2]
        check = CheckSet(data["inputs"], [Box(*map(int, row)) for row in data["boxes"]],
                         data["kinds"], np.unpackbits(data["masks"], axis=-1,
                                                       count=size).astype(bool))
        return Probe(check, _readings(data, ""),
                     _readings(data, "int8_") if "int8_maps" in data else None)


def replay(read: Callable[[CheckSet], Readings], probe: Probe, int8_graph: bool
           ) -> dict[str, Any]:
    """Run the probe through ``read`` (a Detector's) here, timed after one warm-up image,
    and compare with what that graph must give: an int8 graph what it gave where it was
    checked, an fp32 graph the run's own readings."""
    check = probe.check
    if int8_graph and probe.int8 is not None:
        reference, tolerance = probe.int8, INT8_PROBE
    else:
        reference, tolerance = probe.run, FP32_PROBE
    read(check.subset([0]))
    started = time.perf_counter()
    readings = read(check)
    seconds = time.perf_counter() - started
    record = compare(reference, readings, check, tolerance)
    record.update(seconds=round(seconds, 4), images_per_second=round(len(check) / seconds, 2))
    return record
