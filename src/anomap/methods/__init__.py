"""The methods anomap implements, by name."""

from __future__ import annotations

from typing import Any

from anomap.methods.base import (
    DEFAULT_HOLDOUT,
    PAPER,
    PAPER_LITE,
    SELECTION_RULES,
    AnomalyModel,
    Recipe,
)
from anomap.methods.draem import DRAEM
from anomap.methods.fractalad import FractalAD
from anomap.methods.patchcore import PatchCore
from anomap.methods.rstpm import RSTPM
from anomap.methods.stpm import STPM

METHODS: dict[str, type[AnomalyModel]] = {cls.name: cls for cls in (STPM, DRAEM, RSTPM,
                                                                       FractalAD, PatchCore)}


def get_method(name: str) -> type[AnomalyModel]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


def build_model(name: str, **config: Any) -> AnomalyModel:
    """Instantiate a method with its defaults updated by ``config``."""
    cls = get_method(name)
    merged = {**cls.default_config(), **config}
    return cls(**merged)


def build_untrained(name: str, **config: Any) -> AnomalyModel:
    """``build_model`` without loading pretrained weights: for a model whose
    weights come from a checkpoint next, or that is only used to draw samples."""
    cls = get_method(name)
    return build_model(name, **{**config, **dict.fromkeys(cls.pretrained_options())})


__all__ = ["DEFAULT_HOLDOUT", "METHODS", "PAPER", "PAPER_LITE", "SELECTION_RULES",
           "AnomalyModel", "Recipe", "build_model", "build_untrained", "get_method"]
