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

from ierf.errors import UnsupportedModelError
from ierf.methods import available_methods, create_explainer, method_version
from ierf.srd import SRD, Decomposition, StateLayout

__all__ = [
    "SRD",
    "Decomposition",
    "StateLayout",
    "UnsupportedModelError",
    "available_methods",
    "create_explainer",
    "method_version",
]
__version__ = "0.1.0"
