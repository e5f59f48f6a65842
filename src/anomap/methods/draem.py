"""DRAEM: a Discriminatively trained Reconstruction Anomaly Embedding Model
(Zavrtanik, Kristan and Skocaj, ICCV 2021).

No pretrained network: DRAEM learns from normal images with *synthetic*
defects pasted in (:mod:`anomap.synth`: Perlin-noise masks filled with
augmented foreign textures). A reconstructive sub-network learns to paint the
defect away (L2 + SSIM loss against the clean image); a discriminative U-Net
sees [reconstruction, input] side by side and learns to segment where they
differ (focal loss against the synthetic mask). On a real defect the
reconstruction again looks normal, and the segmentation is the anomaly map.

Facts from the paper and the official code (github.com/VitjanZ/DRAEM):

* reconstructive network: encoder of 5 blocks (2 x conv3x3-BN-ReLU) of widths
  b, 2b, 4b, 8b, 8b with max-pooling between, decoder mirroring it with
  bilinear x2 upsampling (align_corners=True) + conv-BN-ReLU, no skip
  connections, a final 3x3 conv to 3 channels and no output activation; b = 128.
* discriminative network: U-Net on the 6-channel [reconstruction, input], 6
  encoder levels (b, 2b, 4b, 8b, 8b, 8b), skip connections, 2-class logits; b = 64.
  Together about 97 M parameters.
* weights initialised N(0, 0.02) (convolutions) and N(1, 0.02) (BatchNorm scale).
* loss = L2 + (1 - SSIM; 11x11 Gaussian window, sigma 1.5) + focal loss
  (gamma 2, on the softmax, label smoothing 1e-5), weights 1 : 1 : 1.
* training images: rotated by U(-90, 90) degrees with probability 0.3 (black
  corners, imgaug's default fill); half of them then get an anomaly.
* image score: max of the anomaly map after 21x21 mean filtering (stride 1,
  zero padding counted in the mean, torch's default).
* training: Adam, lr 1e-4, batch 8, 256 px, 700 epochs; the official code
  multiplies lr by 0.2 at 80% and 90% of the epochs (the paper's text says
  x0.1 after epochs 400 and 600); we follow the code.

Inputs are images in [0, 1] without ImageNet normalisation, as in the paper.
The full-width networks cost about 200 GMAC per 256 px image: a GPU method.
:data:`CPU_CONFIG` and :meth:`DRAEM.cpu_recipe` are a measured CPU setting.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from anomap.methods.base import (
    AnomalyModel,
    AnomalyShare,
    AnomalySourceName,
    Opt,
    Preset,
    Recipe,
    ScoreWindow,
)
from anomap.synth import (
    AnomalySource,
    LazyAnomalySource,
    random_rotate,
    synthesize,
    write_sample_grid,
)
from anomap.unet import (
    DiscriminativeNetwork,
    conv_block,
    focal_loss,
    init_weights,
    pad_to_multiple,
    upsampling,
)

# A CPU setting, chosen by measurement: one training step (synthesis, forward,
# backward, Adam), batch 8, one thread, on a 2-core machine whose other core
# was busy, in ms per image:
#
#   widths (recon/disc)  params   128 px   256 px
#   128/64 (paper)       97.4 M    3652    17799
#    64/32               24.4 M     950     5046
#    32/16  <- CPU        6.1 M     260     1640
#    16/8                 1.5 M     119      581
#
# Quarter width at 128 px is ~14x cheaper than full width at 128 px and ~70x
# cheaper than the paper's setting; 1/8 width saves only 2x more (small layers
# stop using the CPU well) at a quarter of the capacity.
CPU_CONFIG: dict[str, Any] = {"base_width": 32, "disc_base_width": 16}


class ReconstructiveNetwork(nn.Module):
    """Encoder-decoder without skips: the bottleneck (1/16 resolution, 8b
    channels) forces it to redraw the image from what normal images look like."""

    def __init__(self, base_width: int = 128, in_channels: int = 3, out_channels: int = 3
                 ) -> None:
        super().__init__()
        b = base_width
        widths = (b, 2 * b, 4 * b, 8 * b, 8 * b)
        self.encoder = nn.ModuleList(
            conv_block(cin, cout) for cin, cout in zip((in_channels, *widths[:-1]), widths,
                                                    strict=True))
        # (up: cin -> cin, block: cin -> cout) per level, as the official decoder.
        levels = ((8 * b, 4 * b), (4 * b, 2 * b), (2 * b, b), (b, b))
        self.ups = nn.ModuleList(upsampling(cin, cin) for cin, _ in levels)
        self.decoder = nn.ModuleList(conv_block(cin, cout, mid=cin) for cin, cout in levels)
        self.head = nn.Conv2d(b, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            x = block(F.max_pool2d(x, 2) if i else x)
        for up, block in zip(self.ups, self.decoder, strict=True):
            x = block(up(x))
        return self.head(x)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised (size, size) Gaussian."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM over all pixels and channels (Gaussian window, zero padding, as
    the official loss); 1 for identical images."""
    channels = a.shape[1]
    window = gaussian_window(window_size, sigma).to(a.device, a.dtype)
    window = window.expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


class DRAEM(AnomalyModel):
    """Reconstruct, then segment the difference; trained on synthetic anomalies."""

    name = "draem"
    relative_cost = 2.0  # two U-Nets trained from scratch

    def __init__(self, base_width: Annotated[int, Opt(
                     "reconstructive network's width (paper 128)", metavar="C")] = 128,
                 disc_base_width: Annotated[int, Opt(
                     "discriminative network's width (paper 64)", metavar="C")] = 64,
                 anomaly_source: AnomalySourceName = None, p_anomaly: AnomalyShare = 0.5,
                 rotate_normal: Annotated[bool, Opt(
                     "turn normal training images, as the paper's code does")] = True,
                 score_window: ScoreWindow = 21, **config: Any) -> None:
        super().__init__(base_width=int(base_width), disc_base_width=int(disc_base_width),
                         anomaly_source=None if anomaly_source is None else str(anomaly_source),
                         p_anomaly=float(p_anomaly), rotate_normal=bool(rotate_normal),
                         score_window=int(score_window), **config)
        self.reconstructive = ReconstructiveNetwork(int(base_width))
        self.discriminative = DiscriminativeNetwork(int(disc_base_width))
        self.apply(init_weights)
        self.textures = LazyAnomalySource(self.config["anomaly_source"])

    @classmethod
    def default_recipe(cls) -> Recipe:
        return Recipe(epochs=700, batch_size=8, image_size=256, optimizer="adam", lr=1e-4,
                      weight_decay=0.0, lr_milestones=(0.8, 0.9), lr_gamma=0.2,
                      selection="last")

    @classmethod
    def cpu_recipe(cls) -> Recipe:
        """For :data:`CPU_CONFIG`: 128 px, 25 epochs, the paper's optimiser and
        schedule shape. 600 images x 25 epochs at the measured 0.26 s per image
        (one thread, other core busy) is 65 min, about half that with 2 free
        cores. That is ~1900 steps of 8, far fewer than the paper's ~20 k:
        expect lower accuracy than the paper; a GPU run should use the default.
        (In a 150-step toy check at this width lr 1e-3 did worse than 1e-4.)"""
        return cls.default_recipe().updated(epochs=25, image_size=128)

    @classmethod
    def presets(cls) -> dict[str, Preset]:
        return {"paper": Preset(cls.default_recipe(), holdout=0.0,
                                use="the paper's recipe on all normal images, for a GPU"),
                "cpu": Preset(cls.cpu_recipe(), CPU_CONFIG,
                              use="smaller networks, 128 px, 25 epochs: about 45 min on 2 cores")}

    @classmethod
    def synthetic_kinds(cls, config: dict[str, Any]) -> set[str]:
        return {"texture"}

    @property
    def anomaly_source(self) -> AnomalySource:
        """Built on first use (folders are cached at the training image size)."""
        return self.textures.get()

    def _networks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and 2-class logits; sizes not divisible by 32 are
        edge-padded and the outputs cropped back."""
        h, w = images.shape[-2:]
        x = pad_to_multiple(images)
        recon = self.reconstructive(x)
        logits = self.discriminative(torch.cat((recon, x), dim=1))
        return recon[..., :h, :w], logits[..., :h, :w]

    def synthetic_batch(self, images: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normal images, their augmented copies, masks): what one step trains on."""
        self.textures.get(images.shape[-1])
        with torch.no_grad():
            if self.config["rotate_normal"]:
                images = random_rotate(images, p=0.3, max_angle=90.0)
            augmented, masks = synthesize(images, self.anomaly_source,
                                          p_anomaly=self.config["p_anomaly"])
        return images, augmented, masks

    def training_loss(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        images, augmented, masks = self.synthetic_batch(images)
        recon, logits = self._networks(augmented)
        l2 = F.mse_loss(recon, images)
        ssim_loss = 1.0 - ssim(recon, images)
        focal = focal_loss(logits.softmax(dim=1), masks)
        loss = l2 + ssim_loss + focal
        return {"loss": loss, "l2": l2.detach(), "ssim": ssim_loss.detach(),
                "focal": focal.detach()}

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, logits = self._networks(images)
        return logits.softmax(dim=1)[:, 1]

    def write_training_samples(self, images: torch.Tensor, path: str | Path, n: int = 8
                               ) -> Path:
        """A PNG of normal | synthetic anomaly | mask rows, from this model's source."""
        return write_sample_grid(images, self.textures.get(images.shape[-1]), path, n=n,
                                 p_anomaly=1.0)


def count_macs(base_width: int = 128, disc_base_width: int = 64, size: int = 256) -> int:
    """Multiply-accumulates of one forward pass (convolutions only, which dominate)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        k = math.prod(module.kernel_size) * module.in_channels // module.groups
        total += output.numel() * k

    with torch.device("meta"):
        model = DRAEM(base_width=base_width, disc_base_width=disc_base_width)
        handles = [m.register_forward_hook(hook) for m in model.modules()
                   if isinstance(m, nn.Conv2d)]
        model.eval()._networks(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return total
