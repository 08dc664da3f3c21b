"""Model registry: ``load_model(name)`` gives an eval-mode model with its preprocessing, class names
and a weights digest. Nothing downloads; see :mod:`ierf.models.registry` for where weights are found.

    from ierf.models import load_model
    m = load_model("efficientnet_lite0")          # bundled real ImageNet weights
    x = m.preprocess(image)[None]                 # (1, 3, 224, 224)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ierf._lazy import lazy_getattr
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
__getattr__ = lazy_getattr(__name__, _LAZY)


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
