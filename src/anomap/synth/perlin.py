"""Perlin gradient noise and the binary masks DRAEM-style methods cut with it.

Why Perlin: thresholded gradient noise gives blobs of every size and shape,
from one large patch to many small specks, with smooth irregular borders, so a
network trained to find them cannot rely on any particular defect shape.

Recipe (DRAEM, Zavrtanik et al. 2021, and its official code): the lattice has
2**kx by 2**ky cells, kx and ky drawn independently from 0..5; the noise is
rotated by an angle in (-90, 90) degrees about the image centre (outside the
rotated square is 0, below the threshold, so never anomalous) and thresholded
at 0.5.

Everything runs in torch on whole batches, each sample with its own lattice;
random numbers are drawn on the CPU from the given generator (or torch's global
one, which the training loop seeds), so a seed gives the same masks on any
device.
"""

from __future__ import annotations

import math

import torch

from anomap.synth.augment import rotate


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivative
    at the lattice points, so cell borders do not show."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(res_y: torch.Tensor, res_x: torch.Tensor, height: int, width: int, *,
                 max_res: int | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Gradient noise (B, H, W), roughly in [-1, 1], sample b with res_y[b] x res_x[b] cells.

    Random gradient angles are drawn for a (max_res + 1)^2 lattice per sample
    whatever the sample's own resolution, so how many random numbers are
    consumed never depends on the draws themselves.
    """
    res_y = res_y.long().cpu()
    res_x = res_x.long().cpu()
    batch = res_y.numel()
    if max_res is None:
        max_res = int(torch.cat([res_y, res_x]).max()) if batch else 1
    side = max_res + 1
    angles = torch.rand(batch, side, side, generator=generator) * (2.0 * math.pi)
    angles = angles.to(device)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=-1).reshape(-1, 2)

    # Lattice coordinates of every row and column: i * res / size (as the official code).
    ys = torch.arange(height, device=device, dtype=torch.float32) / height
    xs = torch.arange(width, device=device, dtype=torch.float32) / width
    ys = ys[None] * res_y.to(device, torch.float32)[:, None]  # (B, H)
    xs = xs[None] * res_x.to(device, torch.float32)[:, None]  # (B, W)
    iy, ix = ys.floor(), xs.floor()
    fy, fx = ys - iy, xs - ix
    base = torch.arange(batch, device=device)[:, None, None] * side * side
    row = iy.long()[:, :, None] * side
    col = ix.long()[:, None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[base + row + dy * side + col + dx]  # (B, H, W, 2)
        return g[..., 0] * (fy - dy)[:, :, None] + g[..., 1] * (fx - dx)[:, None, :]

    ty, tx = _fade(fy)[:, :, None], _fade(fx)[:, None, :]
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2.0) * torch.lerp(top, bottom, tx)


def perlin_mask(batch: int, height: int, width: int, *, min_scale_exp: int = 0,
                max_scale_exp: int = 5, threshold: float = 0.5, rotate: bool = True,
                max_angle: float = 90.0, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Binary anomaly masks (B, 1, H, W) of 0./1. from thresholded, rotated Perlin noise.

    Per sample the lattice has 2**ky x 2**kx cells, ky and kx uniform in
    [min_scale_exp, max_scale_exp]. Measured with the defaults: 4-5% of the
    pixels are anomalous on average (5.5% before rotation, the official
    code's figure too), and about 1 sample in 20 comes out empty.
    """
    if not 0 <= min_scale_exp <= max_scale_exp:
        raise ValueError("need 0 <= min_scale_exp <= max_scale_exp")
    ky = torch.randint(min_scale_exp, max_scale_exp + 1, (batch,), generator=generator)
    kx = torch.randint(min_scale_exp, max_scale_exp + 1, (batch,), generator=generator)
    noise = perlin_noise(2 ** ky, 2 ** kx, height, width, max_res=2 ** max_scale_exp,
                         generator=generator, device=device)[:, None]
    if rotate:
        angles = (torch.rand(batch, generator=generator) * 2.0 - 1.0) * max_angle
        noise = _rotate(noise, angles)
    return (noise > threshold).float()


_rotate = rotate  # the keyword argument above shadows the function's name

__all__ = ["perlin_mask", "perlin_noise"]
