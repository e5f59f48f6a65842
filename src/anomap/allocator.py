"""Keep freed memory in the process, so CPU batches stop page-faulting.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a
fresh ``mmap`` and hands it back to the kernel on ``free``. A CNN at 256 px and
batch 8 allocates activations of 50 MB (EfficientNet-Lite0's first expanded
layer: 8 x 96 x 128 x 128 floats), so every forward pass faults hundreds of MB of
zeroed pages back in, and the convolutions wait on the kernel. Measured on
this project's 2-core CPU (interleaved ``benchmarks/speed.py`` runs,
docs/speed.md), STPM with EfficientNet-Lite0 at 256 px: 29-39 images/s model-only
at batch 8 and 83-86 ms per training image with the system's setting, 51-65
images/s and 52-63 ms with freed memory kept.

PyTorch's GPU allocator caches freed blocks for the same reason; on the CPU it
leaves that to malloc, so anomap tells glibc to serve large blocks from its heap
and not to trim it: the process keeps its peak memory instead of returning it
between batches. Done once, by training and by :class:`anomap.inference.InferenceModel`
on a CPU. Elsewhere (musl, macOS, Windows) nothing changes. ``ANOMAP_SYSTEM_MALLOC=1``
in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: mallopt(3): a trim threshold of -1 disables trimming completely. A bounded one
#: (2 GiB was tried) still hands a training batch's freed activations back each step.
NEVER_TRIM = -1


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep them after free.
    Returns True when the setting took effect (once per process)."""
    if os.environ.get("ANOMAP_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mmap stays available as glibc's own fallback when the heap cannot grow
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if not done:
        log.debug("mallopt refused: memory allocation left as it was")
    return done


def return_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc's ``malloc_trim``),
    for a long-lived process at an idle moment: the service, after a burst of large
    photos, would otherwise look as big as its worst moment forever."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
