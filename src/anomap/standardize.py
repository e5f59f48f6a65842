"""Anomaly maps in units of normal variation, position by position.

Some places of a photo run hot on every normal image: on MTD the tiles' edges,
where the networks' receptive fields reach past the photo. Those places set
the tail of the normal scores, and so the threshold, while a defect in the
middle of a quiet tile must outshine them. With ``--map-normalization
position`` each position of the map (in the evaluation frame: the photo
stretched to S x S) is read as (map - mean) / std, the mean and standard
deviation of the held-out normal images' maps at that position; the score and
threshold are then in standard deviations of what is normal *there*.

Measured on MTD (docs/results/mtd.md): 0.01-0.06 more image AUROC on every model tried,
about 0.02 less pixel AUROC and 0.05 less AUPRO. It suits data whose photos share a frame (tiles,
aligned parts); it needs enough held-out images to estimate a spread at each
position (at least ``MIN_IMAGES``; a hundred or more is better).

The statistics are fitted with the threshold, on the same held-out images. Each
of those is scored against the statistics of the *others* (leave one out):
scored against statistics it helped to make, an unusual normal image looks
less unusual, and the threshold comes out too low (on MTD, 4% of the test
normals failed at the 0.99 quantile, against 0.5% with leave-one-out).
"""

from __future__ import annotations

from pathlib import Path

import torch

from anomap.files import save_torch

NORMALIZATIONS = ("none", "position")
MIN_IMAGES = 3
#: a position where normal maps hardly vary (a constant padding region) would
#: otherwise turn rounding noise into huge scores
STD_FLOOR = 0.01


def check_normalization(name: str) -> str:
    """``name`` if anomap knows it, else a clear error."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown --map-normalization {name!r}: one of "
                         f"{', '.join(NORMALIZATIONS)}")
    return name


def require_enough_images(normalization: str, count: int, source: str) -> None:
    """Fail before any work when the held-out set is too small to fit statistics on."""
    if normalization == "position" and count < MIN_IMAGES:
        raise ValueError(f"--map-normalization position needs at least {MIN_IMAGES} held-out "
                         f"normal images; {source} gives {count}. Hold out more "
                         f"(--val-fraction) or use --map-normalization none")


class PositionStats:
    """Per-position mean and standard deviation of normal anomaly maps."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != std.shape or mean.dim() != 2:
            raise ValueError(f"mean and std must be two (S, S) maps, got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        self.mean, self.std = mean.float(), std.float()
        self.floor = STD_FLOOR * float(self.std.mean()) + 1e-12
        self._divisor = self.std.clamp_min(self.floor)

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, S, S) maps in the evaluation frame -> standardised maps."""
        if maps.shape[-2:] != self.mean.shape:
            raise ValueError(f"maps of size {tuple(maps.shape[-2:])}, but the normal statistics "
                             f"were fitted at {tuple(self.mean.shape)}")
        mean, divisor = self.mean.to(maps.device), self._divisor.to(maps.device)
        return (maps.float() - mean) / divisor

    @classmethod
    def fit_leave_one_out(cls, maps: torch.Tensor, chunk: int = 64
                          ) -> tuple[PositionStats, torch.Tensor]:
        """Statistics of all ``maps`` (N, S, S), and each map standardised by the
        statistics of the other N - 1 (what the threshold is calibrated on)."""
        count = maps.shape[0]
        if count < MIN_IMAGES:
            raise ValueError(f"--map-normalization position needs at least {MIN_IMAGES} "
                             f"held-out normal images, got {count}")
        total = torch.zeros(maps.shape[1:], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, count, chunk):
            part = maps[start:start + chunk].double()
            total += part.sum(0)
            squares += (part * part).sum(0)
        mean = total / count
        variance = ((squares - count * mean * mean) / (count - 1)).clamp_min(0.0)
        stats = cls(mean, variance.sqrt())
        standardized = torch.empty(maps.shape, dtype=torch.float32)
        for start in range(0, count, chunk):
            part = maps[start:start + chunk].double()
            others_mean = (total - part) / (count - 1)
            others_var = ((squares - part * part - (count - 1) * others_mean * others_mean)
                          / (count - 2)).clamp_min(0.0)
            std = others_var.sqrt().float().clamp_min(stats.floor)
            standardized[start:start + chunk] = (part - others_mean).float() / std
        return stats, standardized

    def save(self, path: str | Path) -> Path:
        return save_torch({"mean": self.mean, "std": self.std}, path)

    @classmethod
    def load(cls, path: str | Path) -> PositionStats:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(state["mean"], state["std"])
        except (OSError, RuntimeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not normal map statistics written by anomap "
                             f"({error!r}); recalibrate with 'anomap retune'") from None
