"""Baseline explainers behind the same verb as SRD: ``saliency(x, target) -> (B, H, W)``.

Each is created by name with :func:`ierf.create_explainer` (its module loads on first use):

=====================  ==================================================  =====================
name                   method                                              library
=====================  ==================================================  =====================
gradient               signed input gradient                               Captum 0.9.0
input_x_gradient       input x gradient                                    Captum 0.9.0
integrated_gradients   IG from the zero (mean-colour) input, 32 steps      Captum 0.9.0
smoothgrad             SmoothGrad, 16 samples, noise 15 % of image range    Captum 0.9.0
gradcam                Grad-CAM                                            pytorch-grad-cam 1.5.7
gradcam_plusplus       Grad-CAM++                                          pytorch-grad-cam 1.5.7
layercam               LayerCAM (2021)                                     pytorch-grad-cam 1.5.7
hirescam               HiResCAM (2020), signed                             pytorch-grad-cam 1.5.7
lrp                    LRP EpsilonPlusFlat + canonizer                     Zennit 0.5.1
=====================  ==================================================  =====================

The one rule for turning any method's output into a comparable map (all metrics see only this):

1. **Channels.** Attributions with an input-channel axis (gradient-type methods, LRP) are reduced
   by a *signed sum over channels*: the relevance of a pixel is the sum of its R, G and B
   relevances, as SRD's pixel relevance is. No absolute value is taken anywhere here; metrics that
   need non-negative maps take the positive part themselves and say so.
2. **Resolution.** Maps coarser than the input (CAM methods) are upsampled to the input size with
   ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``. Maps already at input
   resolution (gradient-type, LRP, SRD) are left as they are.
3. **Scale.** No min-max or other normalisation; sign and magnitude are the method's own.
4. **Type.** Detached float32 ``(B, H, W)`` on the input's device.

Targets: an ``int`` (same class for every image) or an integer tensor of shape ``(B,)`` (one class
per image). Every explainer runs in eval mode with frozen parameters and leaves the model exactly as
it found it (training flags, ``requires_grad``, ``.grad``, hook dictionaries), also when it raises.
"""

import importlib
from typing import Any

# Submodules load on first use (``ierf.baselines.cam`` pulls in pytorch-grad-cam, seconds of import).
_LAZY = {
    "cam": None,
    "gradient": None,
    "lrp": None,
    "collapse_channels": "_common",
    "to_input_resolution": "_common",
    "GradCAMExplainer": "cam",
    "GradCAMPlusPlusExplainer": "cam",
    "HiResCAMExplainer": "cam",
    "LayerCAMExplainer": "cam",
    "Gradient": "gradient",
    "InputTimesGradient": "gradient",
    "IntegratedGradientsExplainer": "gradient",
    "SmoothGrad": "gradient",
    "LRPExplainer": "lrp",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
    return module if _LAZY[name] is None else getattr(module, name)


BASELINE_METHODS = (
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradcam",
    "gradcam_plusplus",
    "layercam",
    "hirescam",
    "lrp",
)

__all__ = [
    "BASELINE_METHODS",
    "GradCAMExplainer",
    "GradCAMPlusPlusExplainer",
    "Gradient",
    "HiResCAMExplainer",
    "InputTimesGradient",
    "IntegratedGradientsExplainer",
    "LRPExplainer",
    "LayerCAMExplainer",
    "SmoothGrad",
    "cam",
    "collapse_channels",
    "gradient",
    "lrp",
    "to_input_resolution",
]
