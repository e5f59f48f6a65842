"""Make a trained model fast for inference.

Eval-mode BatchNorm is an affine map, so it folds into the convolution before
it: on a 2-core CPU BatchNorm otherwise costs about 30% of an STPM forward
pass. The folded copy gives the same maps (to float rounding) and is never
trained or saved; the run's checkpoint keeps the original layers.

On CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX) the networks
can also run in bfloat16, about twice as fast. It is opt-in: a trained STPM's
teacher and student agree closely on normal images, and rounding their
features to 8 bits of mantissa moves the small distances between them (single
image scores by up to 70% on MTD), although the metrics barely move (docs/speed.md).
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anomap.allocator import keep_freed_memory
from anomap.machine import cpu_flags

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags of x86 CPUs that compute bfloat16 natively (not emulated)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the convolution registered just before it in
    the same parent (the conv -> bn order all anomap networks use), in place.

    Returns the number of folded pairs as ``module._fused_pairs`` for checks.
    """
    fused = 0
    for parent in list(module.modules()):
        previous_name, previous = None, None
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.BatchNorm2d) and isinstance(previous, nn.Conv2d)
                    and previous.out_channels == child.num_features):
                setattr(parent, previous_name, fuse_conv_bn_eval(previous, child))
                setattr(parent, name, nn.Identity())
                fused += 1
            previous_name, previous = name, child
    module._fused_pairs = fused  # type: ignore[assignment]
    return module


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises bfloat16 instructions. Where that cannot be
    read (not Linux), False: emulated bfloat16 is slower than float32."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags(cpuinfo)[1])


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a CPU with native bfloat16, else ``fp32``
    (GPUs: ``fp32``, the setting measured). An explicit choice is kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: {', '.join(PRECISIONS)}")
    native = device.type != "cpu" or cpu_has_native_bf16()
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native else "fp32"
    if precision == "bf16" and not native:
        log.warning("bfloat16 asked for, but this CPU does not compute it natively: "
                    "expect it to be slower than float32")
    return precision


class InferenceModel(nn.Module):
    """A method's eval-mode copy with BatchNorm folded, channels-last weights
    (oneDNN's CPU convolutions, depthwise ones above all, are several times
    faster in that layout) and, for ``bf16``, bfloat16 autocast. Maps and
    scores always come back as float32; the original model is left untouched.
    On a CPU it also keeps freed memory for the next batch
    (:mod:`anomap.allocator`)."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS[1:]:
            raise ValueError(f"precision must be fp32 or bf16 here, got {precision!r}")
        method = copy.deepcopy(model).eval()
        method.requires_grad_(False)
        fuse_conv_bn(method)
        self.method = method.to(memory_format=torch.channels_last)
        self.precision = precision
        if next(method.parameters()).device.type == "cpu":
            keep_freed_memory()

    @property
    def config(self) -> dict[str, Any]:
        return self.method.config

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            return self.method.anomaly_map(images).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw maps in the network's frame; :mod:`anomap.scoring` reads them."""
        return self.anomaly_map(images)
