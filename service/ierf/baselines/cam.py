"""CAM-family baselines with the formulas of pytorch-grad-cam 1.5.7.

The library's ``__call__`` is not used: it ReLUs, min-max normalises each map to [0, 1] and resizes
with OpenCV, which destroys the map's scale and sign. Instead activations and gradients of the
target layer are captured here (hooks removed in ``finally``), the library's own
``get_cam_image`` computes the raw channel-weighted map, and then:

* the method's ReLU is applied only where the method defines one: Grad-CAM, Grad-CAM++ and
  LayerCAM define ``ReLU(sum_k w_k A^k)`` (Selvaraju et al. eq. 2; Chattopadhay et al.; Jiang et
  al.), so they return non-negative maps; HiResCAM is defined without it (Draelos & Carin 2020) and
  stays signed. ``relu=False`` returns the pre-ReLU map of any of them;
* no min-max normalisation;
* bilinear upsampling (align_corners=False) to the input size.

Target layer: by default the input of the model's last ``AdaptiveAvgPool2d`` (the final feature map
feeding the classifier), or for models that pool functionally the output of their last top-level block
with a convolution (see :func:`final_feature_module`); no per-architecture configuration. ``layer="layer3"`` picks the
output of a named module instead. A module called several times per forward (shared activation
modules) contributes its last call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from ierf._transient import transient_hook
from ierf.baselines._common import check_input, check_ordinary_tensors, check_target_range, finish, model_guard
from ierf.methods import register_method, resolve_target


def final_feature_module(model: nn.Module) -> tuple[str, nn.Module, bool]:
    """(name, module, use_input) of the final feature map feeding the classifier.

    The input of the last AdaptiveAvgPool2d in registration order; for models that pool functionally
    (torchvision's MobileNetV2 and DenseNet call ``F.adaptive_avg_pool2d``), the output of the last
    top-level block that holds a convolution (their ``features``: the layer pytorch-grad-cam's own
    examples pick for these networks).
    """
    pools = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if pools:
        return (*pools[-1], True)
    blocks = [
        (name, child)
        for name, child in model.named_children()
        if any(isinstance(m, nn.Conv2d) for m in child.modules())
    ]
    if blocks:
        return (*blocks[-1], False)
    raise ValueError(
        "cannot find the final feature map: the model has no nn.AdaptiveAvgPool2d and no top-level block "
        "with a convolution; pass layer=<module name> to choose the CAM layer"
    )


class _Capture:
    """Activation and its gradient at one module (its output, or its input when ``use_input``), from the
    forward of the thread that installed it: an SRD call on the same model in another thread runs the
    hooked module too."""

    def __init__(self, module: nn.Module, use_input: bool) -> None:
        self.activation: torch.Tensor | None = None
        self.thread = threading.get_ident()
        hook = self._pre_hook if use_input else self._hook
        self.handle = module.register_forward_pre_hook(hook) if use_input else module.register_forward_hook(hook)

    @transient_hook
    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if threading.get_ident() == self.thread and args and isinstance(args[0], torch.Tensor):
            self.activation = args[0]
            return (args[0].clone(), *args[1:])  # an in-place module must not rewrite the captured input
        return None

    @transient_hook
    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() == self.thread and isinstance(output, torch.Tensor):
            self.activation = output
            return output.clone()  # later in-place ops (ReLU(inplace=True)) must not rewrite the captured map
        return None


@contextlib.contextmanager
def _captured(module: nn.Module, use_input: bool) -> Iterator[_Capture]:
    capture = _Capture(module, use_input)
    try:
        yield capture
    finally:
        capture.handle.remove()


class _CAMExplainer:
    """Capture -> library formula -> optional ReLU -> bilinear upsampling."""

    name = ""
    version = "2-grad-cam-1.5.7"  # 2: a layer whose output is later changed in place is read before it
    library_class: type[BaseCAM]
    defines_relu = True

    def __init__(self, model: nn.Module, layer: str | None = None, relu: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_ordinary_tensors(model)
        self.model = model
        if layer is None:
            self.layer, self.module, self.use_input = final_feature_module(model)
        else:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ValueError(f"model has no module named {layer!r}")
            self.layer, self.module, self.use_input = layer, modules[layer], False
        if relu is not None and not isinstance(relu, bool):  # relu="false" is truthy: it turned the ReLU on
            raise TypeError(f"relu must be True, False or None, got {relu!r}")
        self.relu = self.defines_relu if relu is None else relu

    def _activations_and_gradients(
        self, x: torch.Tensor, target: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _captured(self.module, self.use_input) as capture:
            logits = self.model(x.clone())  # a first op in place must not write into the differentiated input
        check_target_range(logits, target)
        activation = capture.activation
        if activation is None or activation.dim() != 4:
            shape = None if activation is None else tuple(activation.shape)
            raise ValueError(f"CAM layer {self.layer!r} must produce a (B, C, h, w) map, got {shape}")
        selected = logits.gather(1, target.to(logits.device)[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, activation, create_graph=create_graph)
        return activation, grad

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.model)
        target = resolve_target(target, x.shape[0])
        check_ordinary_tensors(self.model)  # again: the caller may have loaded other weights since
        with model_guard(self.model):
            x_in = x.detach().requires_grad_(True)  # makes the feature map part of a graph
            activation, grad = self._activations_and_gradients(x_in, target, create_graph=False)
            formula = self.library_class(model=self.model, target_layers=[])
            cam = formula.get_cam_image(
                x_in,
                self.module,
                None,
                activation.detach().cpu().float().numpy(),  # numpy has no bfloat16 (a model or autocast in it)
                grad.detach().cpu().float().numpy(),
                eigen_smooth=False,
            )
        maps = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))
        if self.relu:
            maps = maps.clamp_min(0.0)
        return finish(maps.to(x.device), tuple(x.shape[-2:]), self.model)


@register_method("gradcam")
class GradCAMExplainer(_CAMExplainer):
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k mean(dy/dA^k) A^k)."""

    name = "gradcam"
    library_class = GradCAM

    def differentiable_saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        """Grad-CAM kept in the autograd graph (create_graph) for the manipulation attack.

        The same formula as the library path, in torch; the caller owns the model state.
        """
        target = resolve_target(target, x.shape[0])
        check_ordinary_tensors(self.model)
        if not x.requires_grad:  # as the gradient family: with frozen parameters nothing else starts a graph
            x = x.detach().requires_grad_(True)
        activation, grad = self._activations_and_gradients(x, target, create_graph=True)
        cam = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)
        if self.relu:
            cam = torch.relu(cam)
        return torch.nn.functional.interpolate(
            cam[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
        )[:, 0]


@register_method("gradcam_plusplus")
class GradCAMPlusPlusExplainer(_CAMExplainer):
    """Grad-CAM++ (Chattopadhay et al. 2018), as pytorch-grad-cam computes it: its alpha
    g^2 / (2 g^2 + sum(A) g^3 + 1e-6) adds a constant where the paper divides exactly, so with small
    gradients (~1e-3 at a last layer) the weights shrink and the map is not proportional to the
    model's scale (EfficientNet-Lite0 at 448^2: 0.37x the paper's map, its maximum 62 % lower, the same
    shape: Pearson 0.996). Kept for parity with the library users compare against."""

    name = "gradcam_plusplus"
    library_class = GradCAMPlusPlus


@register_method("layercam")
class LayerCAMExplainer(_CAMExplainer):
    """LayerCAM (Jiang et al. 2021): ReLU(sum_k ReLU(dy/dA^k_ij) A^k_ij), position-wise weights."""

    name = "layercam"
    library_class = LayerCAM


@register_method("hirescam")
class HiResCAMExplainer(_CAMExplainer):
    """HiResCAM (Draelos & Carin 2020): sum_k dy/dA^k_ij A^k_ij, signed (no ReLU in the definition)."""

    name = "hirescam"
    library_class = HiResCAM
    defines_relu = False
