"""Writing files so that work is never lost: every checkpoint, table, picture
and report goes through a temporary file in the same folder and a rename, so
a crash or Ctrl-C mid-write leaves the previous version intact, never a
truncated one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def _default_file_mode() -> int:
    """The mode a plain open() would give (mkstemp's 0600 would hide results
    from other users). Read from /proc: os.umask() would briefly change
    process state."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_torch(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_json(obj: Any, path: str | Path) -> Path:
    return save_text(json.dumps(obj, indent=2, default=_json_default) + "\n", path)
