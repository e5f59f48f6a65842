"""A throwaway method in one small file: what adding a method to anomap takes
(docs/architecture.md). A one-layer autoencoder; its map is where it fails to
rebuild the photo."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn

from anomap.methods.base import AnomalyModel, Opt, Recipe, ScoreWindow


class Tiny(AnomalyModel):
    """Rebuild the photo through a narrow convolution; the map is the error."""

    name = "tiny"

    def __init__(self, width: Annotated[int, Opt("hidden channels", metavar="C")] = 4,
                 score_window: ScoreWindow = 3, **config: Any) -> None:
        super().__init__(width=int(width), score_window=score_window, **config)
        self.encode = nn.Conv2d(3, int(width), 3, padding=1)
        self.decode = nn.Conv2d(int(width), 3, 3, padding=1)

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe(epochs=2, batch_size=8, image_size=64, optimizer="adam", lr=1e-2)

    def _error(self, images: torch.Tensor) -> torch.Tensor:
        rebuilt = self.decode(torch.relu(self.encode(images)))
        return ((rebuilt - images) ** 2).mean(dim=1)

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        return {"loss": self._error(images).mean()}

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        return self._error(images)
