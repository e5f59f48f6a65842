"""RSTPM: STPM with a second, reconstructing student-teacher pair (Yamada and
Hotta, 2021; follow-up by Yamada, Kamiya and Hotta, IROS 2022).

Pair 1 is STPM exactly (this class is an :class:`~anomap.methods.stpm.STPM`).
Pair 2 has a different pretrained teacher, so the two pairs do not fail on the
same regions, and its student does not copy the teacher's encoder: it is a
decoder that starts from teacher 1's deepest features (stride 32) and rebuilds
teacher 2's pyramid level by level, like reverse distillation. A student that
only ever rebuilt normal features cannot rebuild a defect's, which a copying
student, seeing the defect itself, sometimes can.

Attention: at each level a spatial gate computed from teacher 2's features
(3x3 conv -> BN -> ReLU -> 1x1 conv -> sigmoid, one channel) weights the
decoder's features. The distance is taken between unit vectors, which a
positive factor per position does not change, so the gate acts on what each
stage passes on: the gated features feed both that level's output head and
the next, finer stage.

Pair 2 is trained with the STPM loss against teacher 2, on the normal images
(``pair2_training="normal"``, the paper's) or on images with synthetic
anomalies (``"synthetic"``: the decoder sees teacher 1's features of the
defective image and must output teacher 2's features of the clean one, so it
learns to paint defects away, as in the follow-up and DeSTSeg).

Six maps, three levels x two pairs, each STPM's per-position distance
upsampled to the input; ``fusion``: ``level-sum`` (the follow-up's: the two
maps of a level summed, the sums multiplied), ``product`` (all six
multiplied, as STPM multiplies its levels) or ``pair-sum`` (each pair's
product, then the two added: a defect that one pair misses still scores
through the other); ``pair1`` and ``pair2`` read one pair alone. Pair 1's
student gets its gradients from pair 1's loss only, so ``fusion="pair1"`` is
an STPM trained with the same recipe, in the same run, at the epoch RSTPM
kept: what pair 2 adds, measured on one student. ``map_strides`` picks levels
as in STPM.

``discriminator`` (the IROS 2022 follow-up's): DRAEM's discriminative U-Net
(:mod:`anomap.unet`) reads the level-summed maps (one channel per level) and
segments DRAEM's synthetic anomalies, trained with the focal loss after the
students, from the epoch the recipe kept, with every other network frozen
(Adam lr 1e-4, x0.2 at 80% and 90% of ``discriminator_epochs``). At test time
its anomaly channel multiplies the fused map. The paper's text gives no more
than "a discriminative network trained with pseudo-anomalies from anomaly
maps": the details follow the one public reimplementation
(SZU-AdvTech-2022/272-..., DisTrain.py), docs/rstpm.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from anomap.backbones import create_backbone
from anomap.data import to_float
from anomap.methods.base import (
    AnomalyShare,
    AnomalySourceName,
    BackboneName,
    Opt,
    Preset,
    Strides,
    TeacherWeights,
)
from anomap.methods.stpm import STPM, normalized_distance
from anomap.synth import LazyAnomalySource, synthesize, write_sample_grid
from anomap.unet import DiscriminativeNetwork, focal_loss, init_weights, pad_to_multiple

#: ``pair1`` and ``pair2`` read one pair alone, to measure what the other adds
FUSIONS = ("level-sum", "product", "pair-sum", "pair1", "pair2")
PAIR2_TRAINING = ("normal", "synthetic")
#: teacher 1's level that the reconstructing student starts from
DECODER_INPUT_STRIDE = 32
#: the discriminator's batch (the reimplementation's is 24; 8 bounds a CPU's memory)
DISCRIMINATOR_BATCH = 8


def fuse_maps(pair1: list[torch.Tensor], pair2: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Per-level maps of the two pairs (same levels, same order) -> one map."""
    if rule not in FUSIONS:
        raise ValueError(f"unknown fusion {rule!r}: one of {', '.join(FUSIONS)}")
    if rule == "level-sum":
        return torch.stack([a + b for a, b in zip(pair1, pair2, strict=True)]).prod(dim=0)
    if rule == "product":
        return torch.stack([*pair1, *pair2]).prod(dim=0)
    if rule in ("pair1", "pair2"):
        return torch.stack(pair1 if rule == "pair1" else pair2).prod(dim=0)
    return torch.stack(pair1).prod(dim=0) + torch.stack(pair2).prod(dim=0)


def _summed(maps: list[torch.Tensor], levels: int) -> torch.Tensor:
    """Six (B, S, S) level maps, pair 1's then pair 2's -> (B, levels, S, S) of their
    per-level sums: the discriminator's input."""
    return torch.stack([a + b for a, b in zip(maps[:levels], maps[levels:], strict=True)],
                       dim=1)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    """3x3 conv then BatchNorm, in the order :func:`anomap.inference.fuse_conv_bn` folds."""
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]


class AttentionGate(nn.Module):
    """(B, C, h, w) teacher-2 features -> (B, 1, h, w) weights in (0, 1)."""

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*_conv_bn(in_channels, mid_channels), nn.ReLU(inplace=True),
                                    nn.Conv2d(mid_channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(features))


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BN with an identity shortcut (ResNet's basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(channels, channels), nn.ReLU(inplace=True),
                                  *_conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class DecoderStage(nn.Module):
    """Upsample to the level's size, conv + residual block, gate, output head."""

    def __init__(self, in_channels: int, width: int, out_channels: int, attention: bool) -> None:
        super().__init__()
        self.entry = nn.Sequential(*_conv_bn(in_channels, width), nn.ReLU(inplace=True))
        self.block = ResidualBlock(width)
        self.gate = AttentionGate(out_channels, width) if attention else None
        self.head = nn.Sequential(*_conv_bn(width, out_channels))

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features passed to the next stage, this level's output)."""
        if x.shape[-2:] != guide.shape[-2:]:
            x = F.interpolate(x, size=guide.shape[-2:], mode="bilinear", align_corners=False)
        hidden = self.block(self.entry(x))
        if self.gate is not None:
            hidden = hidden * self.gate(guide)
        return hidden, self.head(hidden)


class ReconstructionStudent(nn.Module):
    """Decoder from teacher 1's deepest features to teacher 2's pyramid.

    ``out_channels`` maps each stride to teacher 2's channels there; stage
    widths grow with the stride (``width`` at stride 4) so every stage costs
    about the same. ``forward`` takes teacher 2's features (finest first):
    they set each level's size and, with attention, drive the gates.
    """

    def __init__(self, in_channels: int, out_channels: dict[int, int], width: int = 32,
                 attention: bool = True) -> None:
        super().__init__()
        self.strides = sorted(out_channels)
        stages, previous = [], in_channels
        for stride in reversed(self.strides):
            stage_width = max(8, width * stride // 4)
            stages.append(DecoderStage(previous, stage_width, out_channels[stride], attention))
            previous = stage_width
        self.stages = nn.ModuleList(stages)  # coarsest first

    def forward(self, deep: torch.Tensor, guides: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs, x = [], deep
        for stage, guide in zip(self.stages, reversed(guides), strict=True):
            x, out = stage(x, guide)
            outputs.append(out)
        return outputs[::-1]  # finest first, as the teachers' pyramids


class RSTPM(STPM):
    """STPM's pair plus a second teacher whose pyramid a decoder rebuilds."""

    name = "rstpm"
    relative_cost = 3.0  # two teachers, a student and a decoder

    def __init__(self, backbone: BackboneName = "efficientnet_lite0",
                 weights: TeacherWeights = "imagenet", strides: Strides = (4, 8, 16),
                 second_backbone: Annotated[str, Opt(
                     "pair 2's teacher", metavar="NAME")] = "efficientnet_lite1",
                 second_weights: Annotated[str | None, Opt(
                     "pair 2's teacher weights: imagenet or a .pth file", pretrained=True,
                     metavar="W")] = "imagenet",
                 attention: Annotated[bool, Opt(
                     "gates on the reconstructing student")] = True,
                 pair2_training: Annotated[str, Opt(
                     "images pair 2 learns to rebuild", choices=PAIR2_TRAINING,
                     metavar="IMAGES")] = "normal",
                 fusion: Annotated[str, Opt(
                     "how the two pairs' maps combine", choices=FUSIONS, inference=True,
                     metavar="RULE")] = "level-sum",
                 decoder_width: Annotated[int, Opt(
                     "decoder channels at stride 4", metavar="C")] = 32,
                 anomaly_source: AnomalySourceName = None, p_anomaly: AnomalyShare = 0.5,
                 discriminator: Annotated[bool, Opt(
                     "a U-Net on the maps, trained after the students on synthetic "
                     "anomalies; it multiplies the map (IROS 2022)")] = False,
                 discriminator_width: Annotated[int, Opt(
                     "the discriminator's width (DRAEM's 64)", metavar="C")] = 16,
                 discriminator_epochs: Annotated[int, Opt(
                     "the discriminator's epochs, after the students'", metavar="N")] = 10,
                 **config: Any) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}: one of {', '.join(FUSIONS)}")
        if pair2_training not in PAIR2_TRAINING:
            raise ValueError(f"unknown pair2_training {pair2_training!r}: one of "
                             f"{', '.join(PAIR2_TRAINING)}")
        if max(strides) > DECODER_INPUT_STRIDE:
            raise ValueError(f"rstpm: strides {list(strides)} go beyond teacher 1's stride "
                             f"{DECODER_INPUT_STRIDE}, where the reconstructing student starts")
        super().__init__(backbone=backbone, weights=weights, strides=strides,
                         second_backbone=second_backbone, second_weights=second_weights,
                         attention=bool(attention), pair2_training=pair2_training,
                         fusion=fusion, decoder_width=int(decoder_width),
                         anomaly_source=None if anomaly_source is None else str(anomaly_source),
                         p_anomaly=float(p_anomaly), discriminator=bool(discriminator),
                         discriminator_width=int(discriminator_width),
                         discriminator_epochs=int(discriminator_epochs), **config)
        levels = tuple(self.config["strides"])
        self.teacher2 = create_backbone(second_backbone, out_strides=levels,
                                        weights=second_weights)
        self.teacher2.requires_grad_(False)
        self.teacher2.eval()
        self.reconstruction = ReconstructionStudent(
            self.teacher.out_channels[-1], dict(zip(levels, self.teacher2.out_channels,
                                                    strict=True)),
            width=int(decoder_width), attention=bool(attention))
        self.textures = LazyAnomalySource(self.config["anomaly_source"])
        self.discriminator = None
        if discriminator:
            self.discriminator = DiscriminativeNetwork(int(discriminator_width),
                                                       in_channels=len(levels))
            self.discriminator.apply(init_weights)

    @classmethod
    def teacher_strides(cls, strides: tuple[int, ...]) -> tuple[int, ...]:
        """Teacher 1 also gives its deepest level, the decoder's input."""
        return tuple(sorted({*strides, DECODER_INPUT_STRIDE}))

    @classmethod
    def synthetic_kinds(cls, config: dict[str, Any]) -> set[str]:
        """Pair 2 rebuilds images with DRAEM's textures pasted in, when asked to, and
        the discriminator segments them."""
        synthetic = config.get("pair2_training") == "synthetic" or config.get("discriminator")
        return {"texture"} if synthetic else set()

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """``paper``: ResNet-18 and ResNet-50 teachers (the paper's), trained with the
        official STPM code's recipe on which the paper builds."""
        stpm = STPM.presets()["large-defects"]
        return {**cls.teacher_presets(cls.paper_recipe(), {"backbone": "resnet18",
                                                          "second_backbone": "resnet50"},
                                      {"loss_factor": 1.0}),
                "large-defects": Preset(stpm.recipe, stpm.config,
                                        map_normalization=stpm.map_normalization,
                                        use="STPM's large-defects settings for both pairs")}

    @classmethod
    def option_phrases(cls, config: dict[str, Any]) -> list[str]:
        defaults = cls.default_config()
        parts = [f"pair 2 {config.get('second_backbone', defaults['second_backbone'])}"]
        if not config.get("attention", True):
            parts.append("no attention")
        if config.get("discriminator"):
            parts.append(f"discriminator {config.get('discriminator_width', 16)} wide")
        if config.get("pair2_training", "normal") == "synthetic":
            parts.append("pair 2 on synthetic anomalies")
        parts.append(f"fusion {config.get('fusion', defaults['fusion'])}")
        return parts

    def train(self, mode: bool = True) -> RSTPM:
        super().train(mode)
        self.teacher2.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The students; the discriminator trains in its own stage, after them."""
        skip = ({id(p) for p in self.discriminator.parameters()}
                if self.discriminator is not None else set())
        return [p for p in super().trainable_parameters() if id(p) not in skip]

    def finish_training(self, images: torch.Tensor, *, device: torch.device, seed: int,
                        progress: bool = False) -> list[dict[str, float]]:
        """Train the discriminator on ``images`` (uint8, the training set) with every
        other network frozen; -> its per-epoch history ([] without one)."""
        if self.discriminator is None:
            return []
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(seed)
        self.discriminator.apply(init_weights)
        self.requires_grad_(False)
        self.discriminator.requires_grad_(True)
        epochs = self.config["discriminator_epochs"]
        optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, sorted({max(1, round(f * epochs)) for f in (0.8, 0.9)}), 0.2)
        batch = DISCRIMINATOR_BATCH
        history = []
        self.eval()
        self.discriminator.train()
        for epoch in tqdm(range(epochs), desc="discriminator", disable=not progress,
                          unit="epoch"):
            order, total = torch.randperm(len(images), generator=generator), 0.0
            for start in range(0, len(images) - 1, batch):  # a batch of 1 breaks BatchNorm
                index = order[start:start + batch]
                clean = to_float(images[index].to(device))
                with torch.no_grad():
                    augmented, masks = synthesize(clean, self.textures.get(clean.shape[-1]),
                                                  p_anomaly=self.config["p_anomaly"])
                summed = self.level_sums(augmented)
                loss = focal_loss(self._discriminate(summed).softmax(dim=1), masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            schedule.step()
            history.append({"epoch": epoch + 1, "focal": total / len(images)})
        self.requires_grad_(True)
        self.teacher.requires_grad_(False)
        self.teacher2.requires_grad_(False)
        self.eval()
        return history

    def _discriminate(self, summed: torch.Tensor) -> torch.Tensor:
        """2-class logits of the (B, levels, H, W) summed maps; sizes not divisible
        by 32 are edge-padded and cropped back, as DRAEM does."""
        assert self.discriminator is not None
        h, w = summed.shape[-2:]
        return self.discriminator(pad_to_multiple(summed))[..., :h, :w]

    def level_sums(self, images: torch.Tensor) -> torch.Tensor:
        """(B, levels, S, S): each trained level's two maps summed, the discriminator's
        input, computed without gradients: its loss can never reach the students."""
        with torch.no_grad():
            return _summed(self.level_maps(images), len(self.config["strides"]))

    def _split(self, targets: list[torch.Tensor]
               ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Frozen features -> (teacher 1 at pair 1's levels, teacher 1's deepest, teacher 2)."""
        first = targets[:len(self.teacher.out_strides)]
        by_stride = dict(zip(self.teacher.out_strides, first, strict=True))
        return ([by_stride[s] for s in self.config["strides"]], first[-1],
                targets[len(first):])

    def frozen_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher 1 (pair 1's levels and its deepest) and teacher 2, of the images as given."""
        with torch.no_grad():
            return [*self.teacher(self.teacher.normalize(images)),
                    *self.teacher2(self.teacher2.normalize(images))]

    def _pairs(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                          list[tuple[torch.Tensor, torch.Tensor]]]:
        """(teacher, student) features per level for pair 1 and pair 2. While training
        on synthetic anomalies, pair 2's student sees the defective copy of ``images``."""
        first, deep, second = self._split(targets if targets is not None
                                          else self.frozen_targets(images))
        student = self.student(self.teacher.normalize(images))
        guides = second
        if self.training and self.config["pair2_training"] == "synthetic":
            with torch.no_grad():
                augmented, _ = synthesize(images, self.textures.get(images.shape[-1]),
                                          p_anomaly=self.config["p_anomaly"])
                _, deep, guides = self._split(self.frozen_targets(augmented))
        rebuilt = self.reconstruction(deep, guides)
        return (list(zip(first, student, strict=True)),
                list(zip(second, rebuilt, strict=True)))

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        pair1, pair2 = self._pairs(images, targets)
        factor = 2 * self.config["loss_factor"]  # normalized_distance holds 1/2
        first = [factor * normalized_distance(t, s).mean() for t, s in pair1]
        second = [factor * normalized_distance(t, s).mean() for t, s in pair2]
        losses = {f"pair1_level{i}": v.detach() for i, v in enumerate(first)}
        losses |= {f"pair2_level{i}": v.detach() for i, v in enumerate(second)}
        losses["loss"] = torch.stack(first).sum() + torch.stack(second).sum()
        return losses

    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The six (B, S, S) maps: pair 1's levels finest first, then pair 2's."""
        size = images.shape[-2:]
        pair1, pair2 = self._pairs(images)
        return [F.interpolate(normalized_distance(t, s)[:, None], size=size, mode="bilinear",
                              align_corners=False)[:, 0] for t, s in [*pair1, *pair2]]

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """The ``map_strides`` levels of both pairs, fused by ``fusion``."""
        maps = self.level_maps(images)
        strides = self.config["strides"]
        used = [i for i, s in enumerate(strides) if s in (self.config.get("map_strides")
                                                          or strides)]
        pair1, pair2 = maps[:len(strides)], maps[len(strides):]
        fused = fuse_maps([pair1[i] for i in used], [pair2[i] for i in used],
                          self.config["fusion"])
        if self.discriminator is None:
            return fused
        return fused * self._discriminate(_summed(maps, len(strides))).softmax(dim=1)[:, 1]

    def write_training_samples(self, images: torch.Tensor, path: Any, n: int = 8) -> Path:
        """Pair 2's inputs when it trains on synthetic anomalies (normal | anomaly | mask)."""
        if self.config["pair2_training"] != "synthetic":
            raise ValueError("rstpm trains on the normal images as they are unless "
                             "pair2_training is 'synthetic': there are no samples to show")
        return write_sample_grid(images, self.textures.get(images.shape[-1]), path, n=n,
                                 p_anomaly=1.0)
