"""One verb across methods: every explainer exposes ``saliency(x, target) -> (B, H, W)``.

Methods register a factory under a short name; serving and benchmarks pick them by that name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


class Explainer(Protocol):
    """What a saliency method offers: signed maps at input resolution."""

    name: str

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor: ...


ExplainerFactory = Callable[..., Explainer]
_REGISTRY: dict[str, ExplainerFactory] = {}
# Modules whose import registers methods; imported on first lookup so the registry stays lazy.
_PROVIDERS = ("ierf.srd", "ierf.baselines")


def register_method(name: str) -> Callable[[ExplainerFactory], ExplainerFactory]:
    """Class/function decorator: make a method available to :func:`create_explainer`."""

    def wrap(factory: ExplainerFactory) -> ExplainerFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_providers() -> None:
    for module in _PROVIDERS:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a provider not built yet must not hide the others
            if exc.name != module:
                raise


def available_methods() -> list[str]:
    """Names accepted by :func:`create_explainer`, sorted."""
    _load_providers()
    return sorted(_REGISTRY)


def method_version(name: str) -> str | None:
    """The version a method declares (``version`` on its factory); part of cache keys and provenance."""
    _load_providers()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return getattr(_REGISTRY[name], "version", None)


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model``."""
    _load_providers()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(model, **options)
