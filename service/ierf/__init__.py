"""ierf: explain what vision models see.

The engine (this package minus :mod:`ierf.serving`) is pure PyTorch. One analysis unit runs
through it: the pointwise feature vector (PFV) at one position of a layer, and its
instance-specific effective receptive field (iERF).

Public entry points::

    import ierf
    explainer = ierf.SRD(model)
    maps = explainer.saliency(x, target)          # (B, H, W) signed
    erfs = explainer.ierf(x, "layer3.5", pos)     # (B, P, H, W), each sums to 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ierf._lazy import lazy_getattr
from ierf.errors import InputSizeError, ModelChangedError, UnsupportedModelError

if TYPE_CHECKING:
    from ierf.methods import available_methods, create_explainer, method_version, why_unsupported
    from ierf.srd import SRD, Decomposition, StateLayout

# Imported on first use (PEP 562): `import ierf` stays torch-free, so the CLI's --server mode (which only
# talks to a server through the SDK) starts in a fraction of a second instead of ~4 s.
_LAZY = {
    "SRD": "ierf.srd",
    "Decomposition": "ierf.srd",
    "StateLayout": "ierf.srd",
    "available_methods": "ierf.methods",
    "create_explainer": "ierf.methods",
    "method_version": "ierf.methods",
    "why_unsupported": "ierf.methods",
}
__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [
    "SRD",
    "Decomposition",
    "InputSizeError",
    "ModelChangedError",
    "StateLayout",
    "UnsupportedModelError",
    "available_methods",
    "create_explainer",
    "method_version",
    "why_unsupported",
]
__version__ = "0.1.0"
