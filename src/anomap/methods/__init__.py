"""The methods anomap implements, by name."""

from __future__ import annotations

from typing import Any

from anomap.methods.base import SELECTION_RULES, AnomalyModel, Recipe
from anomap.methods.draem import DRAEM
from anomap.methods.stpm import STPM

METHODS: dict[str, type[AnomalyModel]] = {cls.name: cls for cls in (STPM, DRAEM)}


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


__all__ = ["METHODS", "SELECTION_RULES", "AnomalyModel", "Recipe", "build_model", "get_method"]
