"""One verb across methods: every explainer exposes ``saliency(x, target) -> (B, H, W)``.

Methods register a factory under a short name; serving and benchmarks pick them by that name.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ierf.errors import BrokenModelError, UnsupportedModelError


class Explainer(Protocol):
    """What a saliency method offers: signed maps at input resolution."""

    name: str

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor: ...


def check_model_finite(model: nn.Module, what: str) -> None:
    """Called once ``what`` (a method's output) came out NaN or infinite for a finite input: a model whose own
    parameters or buffers are not finite (a diverged fine-tune) raises BrokenModelError naming them, the
    server's fault rather than the caller's; otherwise a ValueError (an overflow for this input)."""
    broken = [
        name
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if broken:
        listed = ", ".join(broken[:4]) + (f", … ({len(broken)} tensors)" if len(broken) > 4 else "")
        raise BrokenModelError(f"{what} holds NaN or infinite values for this input (non-finite values in {listed})")
    raise ValueError(f"{what} holds NaN or infinite values for this input (its parameters are finite: an overflow)")


def refuse_wrapped(model: nn.Module, method: str) -> None:
    """Methods that trace the model (SRD, LRP's canonizers) cannot see through a multi-device wrapper,
    TorchScript or a torch.compile wrapper: refused with the module to pass instead."""
    for name, m in model.named_modules():
        what = "the model" if name == "" else f"submodule {name!r}"
        if isinstance(m, nn.DataParallel | nn.parallel.DistributedDataParallel):
            raise UnsupportedModelError(
                f"{what} is a {type(m).__name__}, which wraps a model for training on several devices: pass the "
                f"model itself (its .module) to {method}"
            )
        if isinstance(m, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                f"{what} is TorchScript (torch.jit.script or torch.jit.trace), whose graph torch.fx cannot trace: "
                "pass the eager nn.Module it was made from"
            )
        if type(m).__name__ == "OptimizedModule":
            raise UnsupportedModelError(
                f"{what} is a torch.compile wrapper (OptimizedModule), which torch.fx cannot trace: pass the "
                "module itself (its ._orig_mod); module.compile() in place works too"
            )


ExplainerFactory = Callable[..., Explainer]
_REGISTRY: dict[str, ExplainerFactory] = {}
# Method name -> the module whose import registers it, imported on first use of that method only: the
# baselines pull in Captum, pytorch-grad-cam and Zennit (seconds of import an SRD user need not pay).
_PROVIDERS: dict[str, str] = {
    "srd": "ierf.srd",
    **dict.fromkeys(("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"), "ierf.baselines.gradient"),
    **dict.fromkeys(("gradcam", "gradcam_plusplus", "layercam", "hirescam"), "ierf.baselines.cam"),
    "lrp": "ierf.baselines.lrp",
}


# Method name -> "module:function" saying why the method cannot explain a model (None: it can), checked
# from the model's structure alone, without building the explainer (LRP's private copy) or importing the
# libraries the other methods need. Methods without an entry take every model their checks at call time do.
_REFUSALS: dict[str, str] = {"lrp": "ierf.baselines.lrp:why_unsupported"}


def check_input(x: object, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The shared verb's input: a finite (B, C, H, W) floating tensor (of ``dtype`` when given), or a
    precise error. Every method validates with this, so the same bad call gets the same message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense tensor, got layout {x.layout} (convert it with .to_dense())")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device: it has a shape but no values to explain")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a normalised floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x has an empty dimension: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    return x


def resolve_target(target: object, batch: int) -> torch.Tensor:
    """int, 0-d or (B,) integer tensor -> LongTensor (B,) on the CPU, for baselines and metrics alike: bools
    and floats are refused, not cast (True was class 1, 2.7 class 2), and -1 is not "the last class". Range
    is checked against the logits later."""
    if isinstance(target, bool):
        raise TypeError("target must be an int or an integer tensor, got bool")
    if isinstance(target, numbers.Integral):  # numpy's integers too (labels read from arrays)
        if target < 0:
            raise ValueError(f"target out of range: the model has classes 0 and up, got {int(target)}")
        target = torch.full((batch,), int(target), dtype=torch.long)
    elif isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"target tensor must have an integer dtype, got {target.dtype}")
        if target.dim() == 0:
            target = target.reshape(1).expand(batch)
        elif target.shape != (batch,):
            raise ValueError(f"target must be an int or a tensor of shape ({batch},), got {tuple(target.shape)}")
        target = target.to(torch.long).cpu()
    else:
        raise TypeError(f"target must be an int or an integer tensor, got {type(target).__name__}")
    if (target < 0).any():
        raise ValueError(f"target out of range: the model has classes 0 and up, got {target.tolist()}")
    if target.is_inference():  # made under the caller's torch.inference_mode: autograd cannot save it
        with torch.inference_mode(False):
            target = target.clone()
    return target


def register_method(name: str) -> Callable[[ExplainerFactory], ExplainerFactory]:
    """Class/function decorator: make a method available to :func:`create_explainer`."""

    def wrap(factory: ExplainerFactory) -> ExplainerFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def _factory(name: str) -> ExplainerFactory:
    if name not in _REGISTRY and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names accepted by :func:`create_explainer`, sorted (nothing is imported to list them)."""
    return sorted(set(_PROVIDERS) | set(_REGISTRY))


def method_version(name: str) -> str | None:
    """The version a method declares (``version`` on its factory); part of cache keys and provenance."""
    return getattr(_factory(name), "version", None)


def why_unsupported(name: str, model: nn.Module) -> str | None:
    """Why method ``name`` cannot explain ``model``'s architecture (None when nothing refuses it up front), so
    a server lists only the methods each model can run."""
    if name not in _PROVIDERS and name not in _REGISTRY:  # refused as everywhere, without importing a method
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    if name not in _REFUSALS:
        return None
    module, function = _REFUSALS[name].split(":")
    return getattr(importlib.import_module(module), function)(model)


def create_explainer(name: str, model: nn.Module, **options: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model``."""
    return _factory(name)(model, **options)
