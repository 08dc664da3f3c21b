"""Model registry: ``load_model(name)`` gives an eval-mode model with its preprocessing, class names
and a weights digest. Nothing downloads; see :mod:`ierf.models.registry` for where weights are found.

    from ierf.models import load_model
    m = load_model("efficientnet_lite0")          # bundled real ImageNet weights
    x = m.preprocess(image)[None]                 # (1, 3, 224, 224)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ierf.models.classes import class_index, imagenet_class_names

if TYPE_CHECKING:
    from ierf.models.preprocessing import IMAGENET, TF_LITE, Preprocessing
    from ierf.models.registry import (
        WEIGHTS_DIR_ENV,
        ClassScore,
        LoadedModel,
        ModelSpec,
        available_models,
        build_module,
        file_digest,
        load_model,
        model_spec,
        resolve_weights,
    )

# The registry and preprocessing import torch: loaded on first use (PEP 562), so class names stay cheap.
_LAZY = dict.fromkeys(("IMAGENET", "TF_LITE", "Preprocessing"), "ierf.models.preprocessing") | dict.fromkeys(
    (
        "WEIGHTS_DIR_ENV",
        "ClassScore",
        "LoadedModel",
        "ModelSpec",
        "available_models",
        "build_module",
        "file_digest",
        "load_model",
        "model_spec",
        "resolve_weights",
    ),
    "ierf.models.registry",
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet (`ierf.srd.register_activation` after `import ierf`)
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'ierf.models' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "IMAGENET",
    "TF_LITE",
    "WEIGHTS_DIR_ENV",
    "ClassScore",
    "LoadedModel",
    "ModelSpec",
    "Preprocessing",
    "available_models",
    "build_module",
    "class_index",
    "file_digest",
    "imagenet_class_names",
    "load_model",
    "model_spec",
    "resolve_weights",
]
