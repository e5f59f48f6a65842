"""anomap.allocator: after keep_freed_memory(), large blocks come from malloc's heap."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

from anomap.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
#: mallinfo2 exists from glibc 2.33 on
HAS_MALLINFO2 = GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


class MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h); hblkhd = bytes held in mmapped blocks."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_tensors_are_not_mmapped_once_freed_memory_is_kept() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert keep_freed_memory()
    mmapped = libc.mallinfo2().hblkhd
    block = torch.ones(64 * 2**20 // 4)  # 64 MB: above glibc's largest mmap threshold
    # served from the heap, not by a fresh mmap (without keep_freed_memory, hblkhd grows
    # by the block's 64 MB)
    assert libc.mallinfo2().hblkhd == mmapped
    del block  # kept alive until the check above


def test_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMAP_SYSTEM_MALLOC", "1")
    assert keep_freed_memory.__wrapped__() is False
