"""The one way from a network's raw map to what a user acts on.

raw map (network frame) -> crop back to the photo (the evaluation frame) ->
per-position standardisation (runs read that way) -> image score -> verdict,
and the mask where the map reaches the pixel threshold. :class:`MapReader`
does it for every caller: the Detector, training's validation, calibration,
``test``, ``retune``, ``export``'s checks, the service and Ray, whichever
runtime made the map. A checkpoint and its export go through the same lines,
so they cannot read a map differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomap.data import Box, Geometry, LoadedSet, to_float
from anomap.standardize import PositionStats

#: how a map becomes the image score: its hottest KxK window, or its mean
IMAGE_SCORES = ("max", "mean")
PASS, FAIL = "pass", "fail"


def check_score_options(options: dict[str, Any]) -> None:
    """A clear error for a score window or image score anomap cannot read."""
    window = options.get("score_window", 1)
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"score_window must be a positive odd number of pixels, got {window!r}")
    if options.get("image_score", "max") not in IMAGE_SCORES:
        raise ValueError(f"unknown image_score {options['image_score']!r}: one of "
                         f"{', '.join(IMAGE_SCORES)}")


def image_score(maps: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """(B, H, W) maps in the evaluation frame -> (B,) image scores, by a method's options.

    ``image_score="max"``: the max of the map after a ``score_window`` x
    ``score_window`` mean filter (1 = the plain max); a window makes one hot
    pixel count less than a hot region. ``"mean"``: the mean of the whole
    map, which adds up weak evidence spread over a large area; it suits maps
    read in units of normal variation (``--map-normalization position``),
    where a normal position averages zero wherever it is."""
    if options.get("image_score", "max") == "mean":
        return maps.flatten(1).mean(dim=1)
    window = options.get("score_window", 1)
    if window > 1:
        maps = F.avg_pool2d(maps[:, None], window, stride=1, padding=window // 2)
    return maps.flatten(1).amax(dim=1)


def is_anomalous(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    """The verdict rule: a score at or above the threshold fails; NaN (no score) passes."""
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, dtype=np.float64) >= float(threshold)


def verdict(score: float, threshold: float) -> str:
    return FAIL if bool(is_anomalous(score, threshold)) else PASS


@dataclass(frozen=True)
class Thresholds:
    """Where a score fails, where a pixel is marked, and the heat map's colours."""

    image: float
    pixel: float
    display_range: tuple[float, float]

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any]) -> Thresholds:
        """calibration.json (runs calibrated before the pixel threshold: the image one)."""
        image = float(calibration["threshold"])
        pixel = calibration.get("pixel_threshold")
        low, high = calibration["display_range"]
        return cls(image, image if pixel is None else float(pixel), (float(low), float(high)))


@dataclass
class Reading:
    """A batch read: maps in the evaluation frame (on the CPU), scores, verdicts
    (None where no threshold was given, as in training's validation)."""

    maps: torch.Tensor  # (B, S, S) float32
    scores: np.ndarray  # (B,) float64
    anomalous: np.ndarray | None  # (B,) bool


class MapNetwork(Protocol):
    """What a reader needs of a network (a method, its folded copy, an exported graph):
    a float batch (B, 3, S, S) in [0, 1] -> raw (B, S, S) maps in the network's frame."""

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class MapReader:
    """How one run reads a map: its geometry, score options, position statistics
    and thresholds."""

    geometry: Geometry
    options: dict[str, Any]
    standardize: PositionStats | None = None
    thresholds: Thresholds | None = None

    def __post_init__(self) -> None:
        check_score_options(self.options)

    def before_statistics(self) -> MapReader:
        """This reader without position statistics or thresholds: what calibration
        fits them on."""
        return MapReader(self.geometry, self.options)

    def frame(self, raw: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
        """Raw maps -> the evaluation frame, standardised where the run says so."""
        maps = self.geometry.restore(raw.float(), boxes)
        return maps if self.standardize is None else self.standardize(maps)

    def score(self, frame_maps: torch.Tensor) -> torch.Tensor:
        return image_score(frame_maps, self.options)

    def read(self, raw: torch.Tensor, boxes: Sequence[Box]) -> Reading:
        frame_maps = self.frame(raw, boxes)
        scores = self.score(frame_maps).cpu().double().numpy()
        anomalous = (None if self.thresholds is None
                     else is_anomalous(scores, self.thresholds.image))
        return Reading(frame_maps.cpu(), scores, anomalous)

    @torch.no_grad()
    def read_set(self, network: MapNetwork, loaded: LoadedSet, *, batch_size: int = 32,
                 device: torch.device | str = "cpu", progress: bool = True,
                 desc: str = "scoring") -> Reading:
        """Every image of a loaded set through ``network`` (put in eval mode) and
        :meth:`read`."""
        if isinstance(network, torch.nn.Module):
            network.eval()
        n, size = len(loaded), self.geometry.size
        maps = torch.empty(n, size, size, dtype=torch.float32)
        scores = np.empty(n, dtype=np.float64)
        with tqdm(total=n, desc=desc, disable=not progress, leave=False, unit="img") as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                raw = network.anomaly_map(to_float(loaded.images[start:stop]).to(device))
                reading = self.read(raw, loaded.boxes[start:stop])
                maps[start:stop], scores[start:stop] = reading.maps, reading.scores
                bar.update(stop - start)
        anomalous = (None if self.thresholds is None
                     else is_anomalous(scores, self.thresholds.image))
        return Reading(maps, scores, anomalous)

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Where a map (any frame) reaches the pixel threshold."""
        if self.thresholds is None:
            raise ValueError("this reader has no thresholds: the run is not calibrated yet")
        return pixel_mask(anomaly_map, self.thresholds.pixel)


def pixel_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    return np.asarray(anomaly_map) >= pixel_threshold


def resize_map(amap: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """One (S, S) map in the evaluation frame -> (H, W) float32 array at the photo's size."""
    resized = F.interpolate(amap[None, None].float(), size=size, mode="bilinear",
                            align_corners=False)
    return resized[0, 0].cpu().numpy()
