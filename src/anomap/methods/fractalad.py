"""FractalAD: fractal anomalies, backbone distillation and a segmentation head
(Xia et al., 2023; the authors' official code, Apache-2.0, is the reference).

Training pastes a fractal-shaped patch of each normal image into itself
(:mod:`anomap.synth.fractal`; every sample gets one) and learns to segment it.
A frozen pretrained teacher and a randomly initialised student of the same
architecture see the image at four stages (strides 4, 8, 16, 32); the student
learns to copy the teacher on the clean image (loss: sum over stages of the
mean of 1 - cos(t, s)). On the augmented image, where the two disagree is a
cue: each stage's student features are weighted by (1 - cos(t, s)) / 2 per
position and detached, so the segmentation loss never reaches the student and
no trainable parameter is added to the backbones. A flow-aligned feature
pyramid (SFNet's) turns the four weighted stages into one logit map at 1/4 of
the input, upsampled to it; loss: BCE-with-logits + soft Dice against the
anomaly's (dilated) mask, added 1:1 to the distillation loss.

``distillation off`` (the official code's setting for textures) drops the
student: the head reads the teacher's features of the augmented image, and
only the head trains (``head_weight_decay``: the code's AdamW default 0.01
there). ``auto`` decides from the normal images, as ``foreground`` does: off
for a texture, on for an object on a plain backdrop. ``anomalies``:
``fractal`` (the paper's) or ``perlin`` (DRAEM's, from :mod:`anomap.synth`),
for the ablation. Map: sigmoid of the logit at input size; image score: the
mean of the map (official code); the max is available as for every method.
Preset ``paper`` is the official code's (AIRS-CSR/FractalAD, run.py and
mvtec.py): ResNet-18, AdamW lr 1e-3, weight decay 1e-3 (0.01 for the head alone
on textures), batch 32, 100 epochs of 391 samples (the normal images repeated,
the last short batch dropped: 12 steps), no schedule, 256 px, every normal
image trained on, the last epoch kept, one colour jitter of 0.05 shared by the
clean image and its anomalous copy; distillation and foreground decided from
the data; anomalies pasted at twice the input size and averaged down
(``synthesis_scale``; the code pastes on the full photo, then resizes).
Differences that remain are listed in docs/fractalad.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from anomap.backbones import create_backbone
from anomap.methods.base import (
    AnomalyModel,
    AnomalySourceName,
    BackboneName,
    ImageScoreRule,
    Opt,
    Preset,
    Recipe,
    ScoreWindow,
    TeacherWeights,
)
from anomap.synth import LazyAnomalySource, save_sample_grid, synthesize, write_sample_grid
from anomap.synth.foreground import FOREGROUND_MODES, decide_foreground
from anomap.synth.fractal import fractal_anomalies

ANOMALIES = ("fractal", "perlin")
SWITCHES = ("on", "off", "auto")
#: the paper preset pastes at twice the input size: MVTec AD's photos are 700-1024 px
#: against 256, so the code's anomalies are soft-edged after its resize; 2x gives
#: that softness at a quarter of 4x's cost (docs/fractalad.md)
PAPER_SYNTHESIS_SCALE = 2
STAGES = (4, 8, 16, 32)


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-position 1 - cos(t, s) over the channels -> (B, h, w), in [0, 2]; float32."""
    return 1.0 - F.cosine_similarity(teacher.float(), student.float(), dim=1)


def distillation_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]
                      ) -> torch.Tensor:
    """Sum over stages of the mean of 1 - cos(t, s): zero when the student copies."""
    return torch.stack([cosine_distance(t, s).mean()
                        for t, s in zip(teacher, student, strict=True)]).sum()


def similarity_attention(teacher: list[torch.Tensor], student: list[torch.Tensor]
                         ) -> list[torch.Tensor]:
    """(1 - cos(t, s)) / 2 * s per stage, detached: the head's inputs."""
    return [((cosine_distance(t, s) / 2)[:, None] * s.float()).detach()
            for t, s in zip(teacher, student, strict=True)]


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0
                  ) -> torch.Tensor:
    """BCE-with-logits + soft Dice (over the whole batch, as the official code)."""
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    probs = torch.sigmoid(logits).flatten()
    targets = masks.flatten()
    dice = 1 - (2 * (probs * targets).sum() + smooth) / (probs.sum() + targets.sum() + smooth)
    return bce + dice


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """conv -> BN -> ReLU, the order :func:`anomap.inference.fuse_conv_bn` folds."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def flow_warp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``features`` (B, C, H, W) at each position moved by ``flow`` (B, 2, H, W)
    pixels (x, y): SFNet's alignment of a coarse map to a finer one's layout. Corners
    aligned, so a zero flow is the identity (the official code's normalisation with
    grid_sample's default would shrink the map by a pixel)."""
    _, _, height, width = features.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=features.device, dtype=flow.dtype),
                            torch.arange(width, device=features.device, dtype=flow.dtype),
                            indexing="ij")
    x = xs + flow[:, 0]
    y = ys + flow[:, 1]
    grid = torch.stack((2 * x / max(width - 1, 1) - 1, 2 * y / max(height - 1, 1) - 1), dim=-1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True)


class FlowAlignedPyramid(nn.Module):
    """SFNet-style segmentation head: four stages (finest first) -> logits at the finest.

    1x1 conv + BN + ReLU laterals to ``width`` channels; each top-down step
    predicts a 2-channel flow (3x3 conv) from the finer lateral and the
    upsampled coarser map, warps the coarser map with it, adds, and smooths
    (3x3 conv + BN + ReLU); the four levels upsampled to the finest and
    concatenated -> 3x3 conv + BN + ReLU -> 3x3 conv to one logit.
    """

    def __init__(self, in_channels: list[int], width: int = 64) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(_conv_bn_relu(c, width, 1) for c in in_channels)
        steps = len(in_channels) - 1
        self.flows = nn.ModuleList(nn.Conv2d(2 * width, 2, 3, padding=1) for _ in range(steps))
        self.smooths = nn.ModuleList(_conv_bn_relu(width, width, 3) for _ in range(steps))
        self.fuse = _conv_bn_relu(len(in_channels) * width, width, 3)
        self.logit = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(f) for lateral, f in zip(self.laterals, features, strict=True)]
        levels = [laterals[-1]]  # coarsest first while going down
        for i in range(len(laterals) - 2, -1, -1):
            finer, coarser = laterals[i], levels[-1]
            up = F.interpolate(coarser, size=finer.shape[-2:], mode="bilinear",
                               align_corners=False)
            flow = self.flows[i](torch.cat((finer, up), dim=1))
            flow = F.interpolate(flow, size=coarser.shape[-2:], mode="bilinear",
                                 align_corners=False)
            aligned = F.interpolate(flow_warp(coarser, flow), size=finer.shape[-2:],
                                    mode="bilinear", align_corners=False)
            levels.append(self.smooths[i](aligned + finer))
        finest = levels[-1]
        size = finest.shape[-2:]
        stacked = [finest] + [F.interpolate(level, size=size, mode="bilinear",
                                            align_corners=False)
                              for level in reversed(levels[:-1])]
        return self.logit(self.fuse(torch.cat(stacked, dim=1)))


class FractalAD(AnomalyModel):
    """Segment pasted fractal anomalies from teacher-student disagreement."""

    name = "fractalad"
    relative_cost = 1.5  # STPM's pair plus a segmentation head, on pasted anomalies

    def __init__(self, backbone: BackboneName = "efficientnet_lite0",
                 weights: TeacherWeights = "imagenet",
                 distillation: Annotated[str | bool, Opt(
                     "a student next to the teacher (auto: on for objects, off for textures)",
                     choices=SWITCHES)] = "on",
                 anomalies: Annotated[str, Opt(
                     "synthetic anomalies it trains on", choices=ANOMALIES,
                     metavar="KIND")] = "fractal",
                 anomaly_source: AnomalySourceName = None,
                 head_width: Annotated[int, Opt("segmentation head's width",
                                                metavar="C")] = 64,
                 score_window: ScoreWindow = 1, image_score: ImageScoreRule = "mean",
                 foreground: Annotated[str, Opt(
                     "anomalies on the object only (auto: decided from the images, and said)",
                     choices=FOREGROUND_MODES)] = "auto",
                 synthesis_scale: Annotated[int, Opt(
                     "paste anomalies at this multiple of the input size, then average "
                     "down (the official code pastes on the full photo)", metavar="K")] = 1,
                 head_weight_decay: Annotated[float | None, Opt(
                     "weight decay of the head when it trains alone (no student); default "
                     "the recipe's", metavar="WD")] = None,
                 **config: Any) -> None:
        if isinstance(distillation, bool):  # runs saved before it could be auto
            distillation = "on" if distillation else "off"
        if anomalies not in ANOMALIES:
            raise ValueError(f"unknown anomalies {anomalies!r}: one of {', '.join(ANOMALIES)}")
        if distillation not in SWITCHES:
            raise ValueError(f"unknown distillation {distillation!r}: one of "
                             f"{', '.join(SWITCHES)}")
        if foreground not in FOREGROUND_MODES:
            raise ValueError(f"unknown foreground {foreground!r}: one of "
                             f"{', '.join(FOREGROUND_MODES)}")
        super().__init__(backbone=backbone, weights=weights, distillation=distillation,
                         anomalies=anomalies, foreground=foreground,
                         anomaly_source=None if anomaly_source is None else str(anomaly_source),
                         head_width=int(head_width), score_window=int(score_window),
                         image_score=image_score, synthesis_scale=int(synthesis_scale),
                         head_weight_decay=(None if head_weight_decay is None
                                            else float(head_weight_decay)), **config)
        self.teacher = create_backbone(backbone, out_strides=STAGES, weights=weights)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student = (create_backbone(backbone, out_strides=STAGES, weights=None)
                        if distillation != "off" else None)
        self.head = FlowAlignedPyramid(self.teacher.out_channels, int(head_width))
        self.textures = LazyAnomalySource(self.config["anomaly_source"])

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe(epochs=100, batch_size=32, image_size=256, optimizer="adamw", lr=1e-3,
                      weight_decay=1e-3, selection="last")

    @classmethod
    def paper_recipe(cls) -> Recipe:
        """The official code's: 391 samples an epoch, the last short batch dropped,
        a shared 0.05 colour jitter (mvtec.py, fag.py, run.py)."""
        return cls.default_recipe().updated(epoch_samples=391, drop_last=True,
                                            color_jitter=0.05)

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """``paper`` trains on every normal image, as the official code does. ``cpu``
        is the recipe as first built, measured on MTD and kept as it was: 30 passes
        over the images, the student on, anomalies at the input size, 20% held out,
        so that a 2-core CPU trains 600 images in under an hour (docs/fractalad.md)."""
        official = {"distillation": "auto", "foreground": "auto", "head_weight_decay": 0.01,
                    "synthesis_scale": PAPER_SYNTHESIS_SCALE}
        presets = cls.teacher_presets(cls.paper_recipe(), {"backbone": "resnet18"}, official,
                                      holdout=0.0)
        return {**presets,
                "cpu": Preset(cls.default_recipe().updated(epochs=30),
                              use="30 passes over the images, 20% held out: under an hour "
                                  "on 2 cores for 600 images")}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The head alone takes ``head_weight_decay`` when there is no student."""
        decay = self.config.get("head_weight_decay")
        if self.student is None and decay is not None:
            return [{"params": self.trainable_parameters(), "weight_decay": decay}]
        return super().parameter_groups()

    @classmethod
    def synthetic_kinds(cls, config: dict[str, Any]) -> set[str]:
        """Fractal masks over the image's own patches (or DRAEM's Perlin textures)."""
        return {"fractal", "cutpaste"} if config.get("anomalies", "fractal") == "fractal" \
            else {"texture"}

    def decide_from_data(self, images: torch.Tensor) -> dict[str, tuple[Any, str]]:
        """``auto`` foreground and distillation: on for objects on a plain backdrop,
        off for textures (the official code's per-category switches, from the data)."""
        wanted = [o for o in ("foreground", "distillation") if self.config[o] == "auto"]
        if not wanted:
            return {}
        is_object, why = decide_foreground(images)
        decided = {}
        for option in wanted:
            self.config[option] = "on" if is_object else "off"
            decided[option] = (self.config[option], why)
        if self.config["distillation"] == "off":
            self.student = None  # a texture: the head reads the teacher alone
        return decided

    def _on_foreground(self, images: torch.Tensor) -> bool:
        if self.config["foreground"] == "auto":  # not settled by training: this batch decides
            self.decide_from_data(images)
        return self.config["foreground"] == "on"

    def train(self, mode: bool = True) -> FractalAD:
        """The teacher stays in eval mode: its BatchNorm statistics are ImageNet's."""
        super().train(mode)
        self.teacher.eval()
        return self

    def frozen_targets(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """The teacher's stages of the clean images, the distillation targets."""
        if self.student is None:
            return None
        with torch.no_grad():
            return self.teacher(self.teacher.normalize(images))

    def synthetic_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images with an anomaly each, their masks (B, 1, H, W)) from the global RNG."""
        with torch.no_grad():
            if self.config["anomalies"] == "fractal":
                return fractal_anomalies(images, foreground=self._on_foreground(images),
                                         scale=self.config["synthesis_scale"])
            return synthesize(images, self.textures.get(images.shape[-1]), p_anomaly=1.0)

    def _head_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            teacher = self.teacher(self.teacher.normalize(images))
            if self.student is None:
                return [t.float() for t in teacher]
            return similarity_attention(teacher, self.student(self.teacher.normalize(images)))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self._head_inputs(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        augmented, masks = self.synthetic_batch(images)
        segmentation = dice_bce_loss(self._logits(augmented), masks)
        losses = {"segmentation": segmentation.detach()}
        loss = segmentation
        if self.student is not None:
            teacher = targets if targets is not None else self.frozen_targets(images)
            distill = distillation_loss(teacher, self.student(self.teacher.normalize(images)))
            losses["distillation"] = distill.detach()
            loss = loss + distill
        losses["loss"] = loss
        return losses

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(self._logits(images))[:, 0]

    def write_training_samples(self, images: torch.Tensor, path: Any, n: int = 8) -> Path:
        """normal | with a pasted anomaly | mask rows, as training sees them."""
        images = images[:n]
        if self.config["anomalies"] == "perlin":
            return write_sample_grid(images, self.textures.get(images.shape[-1]), path, n=n)
        with torch.no_grad():
            return save_sample_grid(images, *fractal_anomalies(
                images, foreground=self._on_foreground(images),
                scale=self.config["synthesis_scale"]), path)
