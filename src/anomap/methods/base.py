"""What every method is to the rest of anomap: a network with a training loss,
an anomaly map, an image score, and a recipe that says how to train it.

The training loop, evaluation, reports and export only ever talk to this
contract, so a new method is one new file in this folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from anomap.orientation import check_orientation

SELECTION_RULES = ("val_score", "last", "synthetic")
#: how a map becomes the image score: its hottest KxK window, or its mean
IMAGE_SCORES = ("max", "mean")


def score_maps(maps: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """(B, H, W) maps in the photo's frame -> (B,) image scores, by a method's config.

    ``image_score="max"``: the max of the map after a ``score_window`` x
    ``score_window`` mean filter (1 = the plain max); a window makes one hot
    pixel count less than a hot region. ``"mean"``: the mean of the whole
    map, which adds up weak evidence spread over a large area; it suits maps
    read in units of normal variation (``--map-normalization position``),
    where a normal position averages zero wherever it is. A function of the
    config alone, so an exported network is scored exactly as its run."""
    if config.get("image_score", "max") == "mean":
        return maps.flatten(1).mean(dim=1)
    window = config.get("score_window", 1)
    if window > 1:
        maps = F.avg_pool2d(maps[:, None], window, stride=1, padding=window // 2)
    return maps.flatten(1).amax(dim=1)


@dataclass
class Recipe:
    """How a method is trained by default; every field can be overridden."""

    epochs: int = 100
    batch_size: int = 32
    image_size: int = 256
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[float, ...] = ()  # fractions of the epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1
    # Which epoch's weights become model.pt, judged on held-out normals only:
    # "val_score" lowest mean score (STPM), "last" the final epoch (DRAEM's
    # code), "synthetic" best AUROC on synthetic anomalies pasted into them.
    selection: str = "val_score"
    # Random flips / right-angle turns of the training images (anomap.orientation).
    augment: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"unknown selection {self.selection!r}: "
                             f"{', '.join(SELECTION_RULES)}")
        check_orientation(self.augment)

    def updated(self, **overrides: Any) -> Recipe:
        """A copy with the non-None overrides applied (unknown names are an error)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["lr_milestones"] = tuple(values["lr_milestones"])
        return Recipe(**values)


@dataclass(frozen=True)
class Preset:
    """A named starting point: a recipe, the constructor options and the way of
    reading maps that were measured together, and when to use it."""

    recipe: Recipe
    config: dict[str, Any] = field(default_factory=dict)
    map_normalization: str = "none"
    use: str = ""


class AnomalyModel(nn.Module):
    """Base class of the methods.

    Inputs are always float images in [0, 1], shape (B, 3, S, S); a method
    applies whatever normalisation its networks expect.
    """

    name: ClassVar[str] = ""
    #: config keys that change how a map is read, not what is learnt: ``anomap retune``
    #: may change them on a trained run
    inference_options: ClassVar[tuple[str, ...]] = ("score_window", "image_score")
    #: config keys naming pretrained weights to load; a saved run's checkpoint holds them,
    #: so they are set to None when it is loaded
    pretrained_options: ClassVar[tuple[str, ...]] = ("weights",)

    def __init__(self, **config: Any) -> None:
        super().__init__()
        window = config.get("score_window", 1)
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"score_window must be a positive odd number of pixels, "
                             f"got {window!r}")
        config.setdefault("image_score", "max")
        if config["image_score"] not in IMAGE_SCORES:
            raise ValueError(f"unknown image_score {config['image_score']!r}: one of "
                             f"{', '.join(IMAGE_SCORES)}")
        self.config: dict[str, Any] = dict(config)

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe()

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """Constructor arguments the method uses when the user gives none."""
        return {}

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """Named starting points. ``paper`` is the faithful setting; a method too
        heavy for a CPU adds a measured ``cpu`` one, and a method may add
        others measured for a kind of data."""
        return {"paper": Preset(cls.default_recipe(), use="the paper's recipe")}

    @classmethod
    def resolve_preset(cls, name: str, device_type: str) -> str:
        """``auto``: the faithful setting on a GPU, the CPU setting (if the
        method has one) on a CPU."""
        available = cls.presets()
        if name == "auto":
            return "cpu" if device_type != "cuda" and "cpu" in available else "paper"
        if name not in available:
            choices = "; ".join(f"{key} ({preset.use})" for key, preset in available.items())
            raise ValueError(f"{cls.name} has no preset {name!r}; available: auto (paper on a "
                             f"GPU, cpu where there is one on a CPU); {choices}")
        return name

    @classmethod
    def describe_options(cls, config: dict[str, Any]) -> list[str]:
        """Short phrases for reports and tables about options of this method alone
        (the shared ones, backbone, levels, score, are described by the caller)."""
        return []

    def write_training_samples(self, images: torch.Tensor, path: Any, n: int = 8) -> Any:
        """A picture of what the method trains on (methods with synthetic anomalies)."""
        raise ValueError(f"{self.name} trains on the normal images as they are: "
                         "there are no synthetic samples to show")

    def decide_from_data(self, images: torch.Tensor) -> dict[str, tuple[Any, str]]:
        """Settle ``auto`` options from a sample of the normal training images, once,
        before training: ``{option: (value, why)}``, which the caller records in the
        run's config and tells the user. Most methods have none."""
        return {}

    def frozen_targets(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """What the method's frozen networks make of training images as loaded,
        or None. A method whose loss compares against a frozen network on
        unaltered images returns them: they are the same every epoch, so the
        loop computes them once per run and passes them back to
        ``training_loss`` (STPM's teacher pass is 15-25% of a training step)."""
        return None

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """Losses for one batch of normal images; key ``loss`` is minimised.
        ``targets``: this batch's ``frozen_targets``, when the loop has them."""
        raise NotImplementedError

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, S, S) map, higher = more anomalous."""
        raise NotImplementedError

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, H, W) maps in the photo's frame -> (B,) image scores (:func:`score_maps`)."""
        return score_maps(maps, self.config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.anomaly_map(images)
        return maps, self.image_score(maps)
