"""STPM: Student-Teacher Feature Pyramid Matching (Wang et al., BMVC 2021).

A frozen ImageNet teacher and a randomly initialised student of the same
architecture see the same normal images; the student learns to reproduce the
teacher's L2-normalised features at three pyramid levels. On a defect the
student, never having seen one, disagrees with the teacher: the disagreement
is the anomaly map.

Preset ``paper`` is the official code's experiment (gdwang08/STFPM, main.py):
ImageNet ResNet-18 teacher, random student, levels at strides 4, 8, 16
(layer1-3); loss = sum over levels of the mean over positions of
||t/|t| - s/|s|||^2, with no 1/2 (``loss_factor`` 1; the paper's equation
has 1/2, the default ``loss_factor`` here, which halves the step); SGD lr 0.4,
momentum 0.9, weight decay 1e-4, batch 32, 100 epochs, 256 px, no
augmentation; 20% of the normals held out, and the epoch kept is the one with
the lowest mean held-out anomaly map (selection ``val_map_mean``); map =
product over levels of the per-position squared distance, bilinearly
upsampled; image score = max of the map. ``paper-lite`` is the same with the
offline EfficientNet-Lite0 teacher. What still differs: the code multiplies
the levels at 64x64 and then resizes, we upsample each level to the input
first; its hold-out is sklearn's split, ours our seeded shuffle. Option
``score_window`` (default 1, the paper's) takes the max after a KxK mean
filter instead; 21 scored better on every model measured (docs/results/mtd.md).
``image_score="mean"`` takes the mean of the whole map: on MTD, with the map
read per position, it beat the 21x21 window on all six models measured. Option
``map_strides`` builds the map from some of the trained levels only: all
levels are still trained (the finest helps the student learn), but on MTD
the map without the stride-8 level scored better on five of six models and
level on the sixth (docs/results/mtd.md).

Preset ``large-defects`` is the best recipe measured on MTD (large,
low-contrast defects on a brushed texture): levels 8/16/32, batch 8, lr x0.1
at 80% and 90% of 100 epochs; the map from the stride-32 level, read against
the held-out normals position by position, and its mean as the image score;
0.973 and 0.976 image AUROC (two seeds) against 0.696 for the paper's recipe.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from anomap.backbones import create_backbone
from anomap.methods.base import (
    AnomalyModel,
    BackboneName,
    Opt,
    Preset,
    Recipe,
    ScoreWindow,
    Strides,
    TeacherWeights,
)

MapStrides = Annotated[list[int] | None, Opt(
    "trained levels read into the map (default all)", inference=True, metavar="S")]
LossFactor = Annotated[float, Opt(
    "factor on the squared distance in the loss: 0.5 (the paper's equation) or 1 (its "
    "official code, --preset paper)", metavar="F")]


def unit_vectors(features: torch.Tensor) -> torch.Tensor:
    """features / |features| along the channels (F.normalize's eps). Written with a
    sum of squares: torch's vector norm over the channel axis of NCHW is 2-3x slower
    on a CPU, and at the stride-4 level it was the costliest op after the convolutions."""
    return features * torch.rsqrt((features * features).sum(dim=1, keepdim=True)
                                  .clamp_min(1e-24))


def normalized_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-position 1/2 * ||t/|t| - s/|s|||^2 -> (B, h, w), in [0, 2].

    Always float32, also when the features come out of bfloat16 autocast: a
    trained student matches its teacher to a few percent on normal images, so
    the subtraction must not round to bfloat16's 8-bit mantissa again. (The
    bfloat16 score noise measured on MTD comes from the features themselves.)
    """
    diff = unit_vectors(teacher.float()) - unit_vectors(student.float())
    return 0.5 * (diff * diff).sum(dim=1)


class STPM(AnomalyModel):
    """Teacher + student feature pyramids; the map is where they disagree."""

    name = "stpm"

    def __init__(self, backbone: BackboneName = "efficientnet_lite0",
                 weights: TeacherWeights = "imagenet", strides: Strides = (4, 8, 16),
                 score_window: ScoreWindow = 1, map_strides: MapStrides = None,
                 loss_factor: LossFactor = 0.5, **config: Any) -> None:
        strides = tuple(strides)
        if map_strides is not None and (not map_strides or set(map_strides) - set(strides)):
            raise ValueError(f"map_strides {list(map_strides)} must be some of the trained "
                             f"strides {list(strides)}")
        super().__init__(backbone=backbone, weights=weights, strides=list(strides),
                         score_window=int(score_window),
                         map_strides=None if map_strides is None else sorted(map_strides),
                         loss_factor=float(loss_factor), **config)
        self.teacher = create_backbone(backbone, out_strides=self.teacher_strides(strides),
                                       weights=weights)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student = create_backbone(backbone, out_strides=strides, weights=None)

    @classmethod
    def teacher_strides(cls, strides: tuple[int, ...]) -> tuple[int, ...]:
        """The teacher's output levels: the student's (a subclass may want more)."""
        return strides

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe(epochs=100, batch_size=32, image_size=256, optimizer="sgd", lr=0.4,
                      momentum=0.9, weight_decay=1e-4)

    @classmethod
    def option_phrases(cls, config: dict[str, Any]) -> list[str]:
        parts = [f"levels {'/'.join(map(str, config.get('strides') or []))}"]
        if config.get("map_strides"):
            parts.append(f"map {'/'.join(map(str, config['map_strides']))}")
        return parts

    @classmethod
    def paper_recipe(cls) -> Recipe:
        """The official code's (main.py): the default recipe, the epoch kept by the
        lowest mean held-out map."""
        return cls.default_recipe().updated(selection="val_map_mean")

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        large_defects = cls.default_recipe().updated(batch_size=8, lr_milestones=(0.8, 0.9),
                                                      lr_gamma=0.1)
        return {**cls.teacher_presets(cls.paper_recipe(), {"backbone": "resnet18"},
                                      {"loss_factor": 1.0}),
                "large-defects": Preset(
                    large_defects,
                    {"strides": [8, 16, 32], "map_strides": [32], "image_score": "mean"},
                    map_normalization="position",
                    use="large, low-contrast defects on textures, as in MTD: 0.973-0.976 "
                        "image AUROC there against 0.696 for paper")}

    def train(self, mode: bool = True) -> STPM:
        """The teacher stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _features(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) pyramids; ``teacher`` given: the loop's cached ones."""
        if teacher is None:
            teacher = self.frozen_targets(images)
        return teacher, self.student(self.teacher.normalize(images))

    def frozen_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's pyramid: the training images are not augmented."""
        with torch.no_grad():
            return self.teacher(self.teacher.normalize(images))

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        teacher, student = self._features(images, targets)
        factor = 2 * self.config["loss_factor"]  # normalized_distance holds 1/2
        per_level = [factor * normalized_distance(t, s).mean()
                     for t, s in zip(teacher, student, strict=True)]
        losses = {f"level{i}": level.detach() for i, level in enumerate(per_level)}
        losses["loss"] = torch.stack(per_level).sum()
        return losses

    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One (B, S, S) map per pyramid level, finest first, upsampled to the input."""
        teacher, student = self._features(images)
        size = images.shape[-2:]
        return [F.interpolate(normalized_distance(t, s)[:, None], size=size, mode="bilinear",
                              align_corners=False)[:, 0]
                for t, s in zip(teacher, student, strict=True)]

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Product of the ``map_strides`` levels (default: all the trained ones)."""
        used = self.config.get("map_strides") or self.config["strides"]
        amap = torch.ones(images.shape[0], *images.shape[-2:], device=images.device)
        for stride, level in zip(self.config["strides"], self.level_maps(images), strict=True):
            if stride in used:
                amap = amap * level
        return amap
