"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection",
CVPR 2022): a memory bank of a frozen ImageNet network's patch features from
the normal images, and the distance of each test patch to its nearest neighbour
in it. Nothing is trained; it is the cheapest method to fit.

Recipe (paper): features of two middle levels (WideResNet-50 layers 2 and 3;
here the teacher's strides 8 and 16), each averaged over its 3x3 patch
neighbourhood ("locally aware"), the coarser upsampled to the finer and
concatenated; a greedy coreset (in a random 128-dimensional projection) picks
the bank from all training patches; the map is each patch's distance to its
nearest bank feature, upsampled and smoothed with a Gaussian of sigma 4; the
image score is the largest patch distance, reweighted by how isolated its
nearest bank feature is among that feature's own ``b`` neighbours (b = 9).

anomap's contract is that a network outputs a map and the score is read from
it (:mod:`anomap.scoring`), so that an export scores as its run. The
reweighting is therefore applied to the whole map of an image (a factor in
(0, 1]): the map's max is the paper's reweighted score (of the smoothed map),
and the map's shape within an image is the paper's.

Memory is bounded and stated: at most ``MAX_CANDIDATES`` patch features are
kept from the training images (a uniform sample of each image's patches), and
the bank holds at most ``bank_size`` of them (docs/patchcore.md has the sizes).
Nearest neighbours come from faiss (exact L2) when it is installed; an export
computes the same exact distances inside its graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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

#: most training patch features the coreset chooses from (a uniform sample per image)
MAX_CANDIDATES = 100_000
#: the paper's dimension for the coreset's random projection
PROJECTION_DIM = 128
#: the paper's b: the nearest bank feature and its neighbours that reweight the score
NEIGHBOURS = 9


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) maps smoothed by a separable Gaussian (reflect padding at the edges)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4 * sigma)))
    radius = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def greedy_coreset(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` rows of ``features`` (N, D) chosen farthest-first in a
    random projection: each next row is the one farthest from those chosen."""
    count = features.shape[0]
    if size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    if features.shape[1] > PROJECTION_DIM:
        projection = torch.randn(features.shape[1], PROJECTION_DIM, generator=generator)
        features = features @ (projection / math.sqrt(PROJECTION_DIM))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(count, (1,), generator=generator))
    nearest = ((features - features[chosen[0]]) ** 2).sum(dim=1)
    for i in range(1, size):
        chosen[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, ((features - features[chosen[i]]) ** 2).sum(dim=1))
    return chosen


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class PatchCore(AnomalyModel):
    """A memory bank of normal patch features; the map is the distance to it."""

    name = "patchcore"
    relative_cost = 0.1  # one forward pass per image, no gradient

    def __init__(self, backbone: BackboneName = "efficientnet_lite0",
                 weights: TeacherWeights = "imagenet", strides: Strides = (8, 16),
                 bank_size: Annotated[int, Opt(
                     "memory bank: patch features kept by the greedy coreset (memory: "
                     "bank x feature size x 4 bytes)", metavar="N")] = 10_000,
                 neighbourhood: Annotated[int, Opt(
                     "patch neighbourhood averaged into each feature (odd)",
                     metavar="P")] = 3,
                 reweight: Annotated[bool, Opt(
                     "the paper's reweighting of the image score by how isolated the "
                     "nearest bank feature is", inference=True)] = True,
                 smoothing: Annotated[float, Opt(
                     "Gaussian sigma of the map, pixels (paper 4)", inference=True,
                     metavar="S")] = 4.0,
                 score_window: ScoreWindow = 1, **config: Any) -> None:
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be a positive odd number, got {neighbourhood}")
        if bank_size < 2:
            raise ValueError(f"bank_size must be at least 2, got {bank_size}")
        super().__init__(backbone=backbone, weights=weights, strides=list(strides),
                         bank_size=int(bank_size), neighbourhood=int(neighbourhood),
                         reweight=bool(reweight), smoothing=float(smoothing),
                         score_window=score_window, **config)
        self.teacher = create_backbone(backbone, out_strides=tuple(strides), weights=weights)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        dim = sum(self.teacher.out_channels)
        # filled by memorize(); saved with the weights, so a run needs no training images
        self.register_buffer("bank", torch.zeros(0, dim))
        self.register_buffer("bank_neighbours", torch.zeros(0, NEIGHBOURS - 1, dtype=torch.long))

    @classmethod
    def default_recipe(cls) -> Recipe:
        """One pass over the training images; nothing is learnt by gradient."""
        return Recipe(epochs=1, batch_size=32, image_size=256, selection="last")

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        """``paper``: the paper's WideResNet-50 (layers 2 and 3: strides 8 and 16);
        ``paper-lite``: the offline EfficientNet-Lite0 teacher."""
        return cls.teacher_presets(cls.default_recipe(), {"backbone": "wide_resnet50_2"})

    @classmethod
    def option_phrases(cls, config: dict[str, Any]) -> list[str]:
        return [f"levels {'/'.join(map(str, config.get('strides') or []))}",
                f"bank {config.get('bank_size')}"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        for name in ("bank", "bank_neighbours"):  # its size is the run's, not the default's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> PatchCore:
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, D, h, w) locally aware patch features at the
        finest requested stride."""
        size = self.config["neighbourhood"]
        levels = self.teacher(self.teacher.normalize(images))
        levels = [F.avg_pool2d(level, size, stride=1, padding=size // 2) for level in levels]
        target = levels[0].shape[-2:]
        return torch.cat([level if level.shape[-2:] == target else
                          F.interpolate(level, size=target, mode="bilinear",
                                        align_corners=False) for level in levels], dim=1)

    @torch.no_grad()
    def memorize(self, batches: Iterable[torch.Tensor], count: int, seed: int = 0) -> None:
        """Build the bank from ``count`` training images given in ``batches``."""
        generator = torch.Generator().manual_seed(seed)
        per_image: int | None = None
        kept = []
        for images in batches:
            patches = self.features(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
            if per_image is None:
                per_image = max(1, min(patches.shape[1], MAX_CANDIDATES // max(count, 1)))
            for image_patches in patches.float().cpu():
                pick = torch.randperm(image_patches.shape[0], generator=generator)[:per_image]
                kept.append(image_patches[pick])
        candidates = torch.cat(kept)
        chosen = greedy_coreset(candidates, self.config["bank_size"], seed)
        bank = candidates[chosen].contiguous()
        self.bank = bank.to(self.bank.device)
        neighbours = min(NEIGHBOURS - 1, len(bank) - 1)
        self.bank_neighbours = self._search(bank, bank, neighbours + 1)[1][:, 1:].to(
            self.bank.device)

    def _search(self, queries: torch.Tensor, bank: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 distances, indices) of each query's ``k`` nearest bank rows:
        faiss in eager mode when installed, the same exact distances as matrix
        products otherwise (and inside an exported graph)."""
        faiss = None if torch.compiler.is_exporting() else _faiss()
        if faiss is not None and not queries.requires_grad:
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(bank.detach().float().cpu().contiguous().numpy())
            distances, indices = index.search(queries.detach().float().cpu().contiguous()
                                              .numpy(), k)
            return (torch.from_numpy(distances).to(queries.device).clamp_min(0),
                    torch.from_numpy(indices).to(queries.device))
        squared = ((queries * queries).sum(1, keepdim=True) - 2 * queries @ bank.T
                   + (bank * bank).sum(1)[None]).clamp_min(0)
        distances, indices = squared.topk(k, dim=1, largest=False)
        return distances, indices

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        raise RuntimeError("patchcore learns no weights: the loop calls memorize() instead")

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.bank) == 0:
            raise RuntimeError("patchcore has an empty memory bank: train it first")
        features = self.features(images)
        dim, height, width = features.shape[1:]
        queries = features.flatten(2).transpose(1, 2).reshape(-1, dim).float()
        squared, nearest = self._search(queries, self.bank, 1)
        patch_maps = squared[:, 0].sqrt().reshape(-1, height, width)  # batch stays dynamic
        maps = F.interpolate(patch_maps[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.config["smoothing"])
        if self.config["reweight"] and self.bank_neighbours.shape[0]:
            maps = maps * self._weights(queries.reshape(-1, height * width, dim),
                                        patch_maps.flatten(1),
                                        nearest[:, 0].reshape(-1, height * width))[:, None, None]
        return maps

    def _weights(self, queries: torch.Tensor, distances: torch.Tensor,
                 nearest: torch.Tensor) -> torch.Tensor:
        """The paper's factor, per image: at the patch farthest from the bank (m_test*,
        nearest bank feature m*), 1 - exp(|m_test* - m*|) / sum over m* and its
        neighbours m of exp(|m_test* - m|); written as a softmax, which cannot overflow."""
        worst = distances.argmax(dim=1, keepdim=True)  # (B, 1)
        query = queries.gather(1, worst[..., None].expand(-1, 1, queries.shape[-1]))  # (B, 1, D)
        star = nearest.gather(1, worst)[:, 0]  # (B,)
        group = torch.cat((star[:, None], self.bank_neighbours[star]), dim=1)  # (B, b)
        members = self.bank[group]  # (B, b, D)
        spread = ((members - query) ** 2).sum(-1).clamp_min(0).sqrt()
        return 1.0 - torch.softmax(spread, dim=1)[:, 0]
