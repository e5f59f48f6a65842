"""anomap: unsupervised visual anomaly detection and localization.

``from anomap import Detector`` loads the library API on first use, so that
``import anomap.data`` (or the CLI's ``--help``) does not load every method.
"""

from __future__ import annotations

from typing import Any

from anomap.version import __version__

__all__ = ["Detector", "Prediction", "__version__", "select"]


def __getattr__(name: str) -> Any:
    if name in ("Detector", "Prediction"):
        from anomap import run

        return getattr(run, name)
    if name == "select":  # choose the method without a defective image (docs/auto.md)
        from anomap import auto

        return auto.select
    raise AttributeError(f"module 'anomap' has no attribute {name!r}")
