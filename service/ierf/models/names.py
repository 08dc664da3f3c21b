"""The registry's architecture names, importable without torch: the service checks its config against
them where the application is built (the registry itself checks it matches them when it loads)."""

from __future__ import annotations

ARCHITECTURES: tuple[str, ...] = (
    "efficientnet_lite0",
    "resnet18",
    "resnet50",
    "resnet101",
    "vgg16",
    "vgg16_bn",
    "densenet121",
    "googlenet",
    "inception_v3",
    "mobilenet_v2",
)

# The centre crop each architecture's preprocessing ends with (what a configured ``resize`` must not undercut).
CENTRE_CROPS: dict[str, int] = {name: 299 if name == "inception_v3" else 224 for name in ARCHITECTURES}
