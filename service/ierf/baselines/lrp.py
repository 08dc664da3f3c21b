"""LRP through Zennit 0.5.1: the EpsilonPlusFlat composite with an architecture canonizer.

Rules (Zennit's EpsilonPlusFlat): flat rule for the first (pixel) layer, z+ for every other
convolution, epsilon (1e-6) for linear layers, Norm for sums and average pools, pass-through for
activations; batch norms are merged into the preceding convolution first. EpsilonGammaBox would
need pixel bounds per model, which the generic interface does not know, so it is not the default.

Canonizers: torchvision ResNets (including the TinyResNet, built from torchvision's BasicBlock) get
Zennit's ResNet canonizer (BN merge + residual sums as ``Sum`` modules so the Norm rule splits
relevance over both branches). EfficientNet-Lite (lukemelas layout: ``_blocks.N._project_conv`` …)
gets :class:`EfficientNetLiteCanonizer`, written here with Zennit's building blocks. Anything else
gets the sequential BN merge only; residual additions written as ``a + b`` then receive the
plain gradient split (each branch gets the full relevance), which is documented LRP behaviour for
uncanonised graphs, not a bug here. The sequential merge (ResNets' too) pairs each linear layer with
the next BN in *registration* order, which is not always execution order (DenseNet: a layer's last
convolution is followed by the next layer's ``norm1``, which normalises the whole concatenation): every
pair is checked against the model's torch.fx graph (the BN's input must be that layer's output, used by
nothing else), and a model with a pair that fails is refused (``UnsupportedModelError``) when the
explainer is made. Every BN merge here is exact: Zennit's leaves each merged BN
computing x / sqrt(1 + eps), which moved the logits being explained (ResNet18: ~1e-4; EfficientNet's
eps = 1e-3 over 49 BNs: ~0.05), so maps differ from Zennit's own canonizers by that much.

Relevance starts as 1 at the target logit (Zennit's convention), so maps are comparable in sign
across images whatever the logit's sign. Zennit rewrites weights in place while registered, so the
explainer works on a private deep copy of the model: the caller's model is never touched, even
temporarily (safe when other threads use it concurrently). The copy follows the model: a call after
the caller changed a parameter or buffer (in place, replaced, or moved to another device), replaced a
submodule (an activation has no tensors of its own) or changed a normalisation's ``eps`` copies again.
Writes through ``.data`` bypass the version counter the check reads, as do other edits of a module's
attributes (a stride, a slope): after those, make a new explainer. A model whose tensors were made under
``torch.inference_mode()`` is refused (ValueError), as by the other autograd-based methods.
"""

from __future__ import annotations

import copy
import numbers
import threading

import torch
import torch.fx as fx
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from zennit.attribution import Gradient
from zennit.canonizers import (
    AttributeCanonizer,
    Canonizer,
    CompositeCanonizer,
    NamedMergeBatchNorm,
    SequentialMergeBatchNorm,
)
from zennit.composites import EpsilonPlusFlat
from zennit.core import collect_leaves
from zennit.layer import Sum
from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

from ierf._fused_steps import watch_fused_optimizers
from ierf.baselines._common import (
    check_input,
    check_ordinary_tensors,
    check_target_range,
    collapse_channels,
    finish,
    model_guard,
)
from ierf.errors import UnsupportedModelError
from ierf.methods import refuse_wrapped, register_method, resolve_target
from ierf.metrics._checks import check_positive_finite
from ierf.srd.graph import TRACE_LOCK  # fx patches nn.Module.__call__ process-wide: one trace at a time

watch_fused_optimizers()  # the stamp reads version counters, which fused optimiser steps leave alone


def _is_mbconv(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("_block_args", "_depthwise_conv", "_project_conv", "_bn2"))


def _make_identity(batch_norm: nn.Module) -> None:
    """Zennit's merge leaves the BN as x / sqrt(1 + eps) instead of the identity; with EfficientNet's
    eps = 1e-3 over 49 BNs that shifted logits by ~0.05 (ResNet18's eps = 1e-5: ~1e-4). Setting
    running_var = 1 - eps makes it exact (restored on removal with the other BN statistics)."""
    batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)


class _ExactNamedMergeBatchNorm(NamedMergeBatchNorm):
    @staticmethod
    def merge_batch_norm(modules: list[nn.Module], batch_norm: nn.Module) -> None:
        NamedMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        _make_identity(batch_norm)

    def copy(self) -> _ExactNamedMergeBatchNorm:
        return self.__class__(self.name_map)


class _ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
    @staticmethod
    def merge_batch_norm(modules: list[nn.Module], batch_norm: nn.Module) -> None:
        SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        _make_identity(batch_norm)


class ResNetCanonizer(CompositeCanonizer):
    """Zennit's ResNetCanonizer (BN merge, residual sums as ``Sum`` modules) with the exact BN merge."""

    def __init__(self) -> None:
        super().__init__((_ExactSequentialMergeBatchNorm(), ResNetBottleneckCanonizer(), ResNetBasicBlockCanonizer()))


class _EfficientNetBatchNormMerge(NamedMergeBatchNorm):
    """BN merge for the lukemelas EfficientNet layout, whose convs and BNs are not in a Sequential."""

    _PAIRS = (("_conv_stem", "_bn0"), ("_conv_head", "_bn1"))
    _BLOCK_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))

    def __init__(self) -> None:
        super().__init__(name_map=[])

    def apply(self, root_module: nn.Module) -> list[Canonizer]:
        modules = dict(root_module.named_modules())
        name_map = []
        for name, module in modules.items():
            prefix = f"{name}." if name else ""
            pairs = self._BLOCK_PAIRS if _is_mbconv(module) else self._PAIRS
            for conv, bn in pairs:
                if f"{prefix}{conv}" in modules and f"{prefix}{bn}" in modules:
                    name_map.append(([f"{prefix}{conv}"], f"{prefix}{bn}"))
        return _ExactNamedMergeBatchNorm(name_map).apply(root_module)

    def copy(self) -> _EfficientNetBatchNormMerge:
        return self.__class__()


class _MBConvSumCanonizer(AttributeCanonizer):
    """Route the MBConv skip connection through a Zennit ``Sum`` so the Norm rule applies to it."""

    def __init__(self) -> None:
        super().__init__(self._attribute_map)

    @classmethod
    def _attribute_map(cls, name: str, module: nn.Module) -> dict | None:
        if not _is_mbconv(module):
            return None
        return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}

    @staticmethod
    def forward(self: nn.Module, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        x = inputs
        if self._block_args.expand_ratio != 1:
            x = self._swish(self._bn0(self._expand_conv(inputs)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        args = self._block_args
        if args.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
            x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
        return x


class EfficientNetLiteCanonizer(CompositeCanonizer):
    """BN merge + skip sums for EfficientNet-Lite models in the lukemelas layout (no SE blocks)."""

    def __init__(self) -> None:
        super().__init__((_EfficientNetBatchNormMerge(), _MBConvSumCanonizer()))


def _sequential_merge_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """The (linear, batch norm) leaves Zennit's ``SequentialMergeBatchNorm.apply`` would merge."""
    pairs = []
    last = None
    for leaf in collect_leaves(model):
        if isinstance(last, SequentialMergeBatchNorm.linear_type) and isinstance(
            leaf, SequentialMergeBatchNorm.batch_norm_type
        ):
            pairs.append((last, leaf))
        last = leaf
    return pairs


class _LeafTracer(fx.Tracer):
    """Keeps every module Zennit merges as one ``call_module`` node, whatever its class."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        merged = (*SequentialMergeBatchNorm.linear_type, *SequentialMergeBatchNorm.batch_norm_type)
        return isinstance(m, merged) or super().is_leaf_module(m, qualified_name)


def _check_sequential_merges(model: nn.Module) -> None:
    """Refuse a model whose registration-order BN merge would not be exact.

    Merging folds the BN into the layer's weights, which is right only if the BN's input is exactly that
    layer's output and nothing else reads it (DenseNet's registration order pairs a layer's ``conv2`` with
    the next layer's ``norm1``: Zennit then failed deep inside with a size mismatch, and on a model whose
    channel counts happened to agree it would have merged silently and wrongly)."""
    pairs = _sequential_merge_pairs(model)
    if not pairs:
        return
    names = {id(m): name for name, m in model.named_modules()}
    try:
        with TRACE_LOCK:
            graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many types: what matters is that the merges cannot be checked
        raise UnsupportedModelError(
            f"LRP canonizer: could not trace {type(model).__name__} with torch.fx to check its batch-norm merges "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    for linear, batch_norm in pairs:
        linear_name, bn_name = names.get(id(linear), "?"), names.get(id(batch_norm), "?")
        linear_calls, bn_calls = calls.get(linear_name, []), calls.get(bn_name, [])
        if not linear_calls and not bn_calls:
            continue  # neither runs in eval (an auxiliary head): merging them changes nothing that runs
        exact = (
            len(linear_calls) == 1
            and len(bn_calls) == 1
            and bool(bn_calls[0].args)
            and bn_calls[0].args[0] is linear_calls[0]
            and set(linear_calls[0].users) == {bn_calls[0]}
        )
        if not exact:
            raise UnsupportedModelError(
                f"LRP canonizer: batch norm {bn_name!r} follows {linear_name!r} in registration order but does not "
                f"normalise exactly that layer's output in the forward pass, so it cannot be merged into it "
                f"({type(model).__name__} is not supported by lrp)"
            )


def canonizers_for(model: nn.Module) -> list[Canonizer]:
    """Pick the canonizer matching the architecture (see the module docstring); raises
    ``UnsupportedModelError`` for an architecture none of them canonises exactly."""
    modules = list(model.modules())
    if any(isinstance(m, BasicBlock | Bottleneck) for m in modules):
        _check_sequential_merges(model)
        return [ResNetCanonizer()]
    blocks = [name for name, m in model.named_modules() if _is_mbconv(m)]
    if blocks:
        with_se = [name for name in blocks if getattr(model.get_submodule(name), "has_se", False)]
        if with_se:  # checked before any canonizer touches the model
            raise UnsupportedModelError(f"LRP canonizer: squeeze-excitation blocks are not supported: {with_se[:3]}")
        return [EfficientNetLiteCanonizer()]
    _check_sequential_merges(model)
    return [_ExactSequentialMergeBatchNorm()]


def why_unsupported(model: nn.Module) -> str | None:
    """Why LRP refuses ``model``'s architecture (its canonizers' check, on the model itself: it only traces
    and reads), or None."""
    try:
        canonizers_for(model)
    except UnsupportedModelError as exc:
        return str(exc)
    return None


def _state_stamp(model: nn.Module) -> tuple:
    """Identity, storage and version counter of every parameter and buffer: any in-place update bumps
    a version, a replaced or moved tensor changes identity or storage (~0.5 ms for ResNet50). Every
    submodule's identity too (a swapped activation has no tensors to notice it by), and each ``eps`` (a
    BN's eps changes its output; momentum does not in eval). Inference tensors have no version counter:
    their models are refused (``check_ordinary_tensors``), the stamp only must not fail on them."""
    tensors = tuple(
        (name, id(t), t.data_ptr(), None if t.is_inference() else t._version, t.device)
        for name, t in (*model.named_parameters(), *model.named_buffers())
    )
    modules = tuple(
        (name, id(m), eps if isinstance(eps := getattr(m, "eps", None), numbers.Real) else None)
        for name, m in model.named_modules(remove_duplicate=False)
    )
    return tensors, modules


@register_method("lrp")
class LRPExplainer:
    """LRP-EpsilonPlusFlat (Zennit) with the matching canonizer; signed channel-summed relevance."""

    name = "lrp"
    version = "1-zennit-0.5.1"

    def __init__(self, model: nn.Module, epsilon: float = 1e-6) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_wrapped(model, "LRP")  # its canonizers trace the model, as SRD does
        self.source = model
        self.epsilon = check_positive_finite(epsilon, "epsilon")  # NaN was blamed on the input at the first map
        self._lock = threading.Lock()  # one thread at a time decides whether to copy again
        self._copy_source(_state_stamp(model), None)  # unsupported architectures fail here, not on the first call

    def _copy_source(self, stamp: tuple, canonizers: list[Canonizer] | None) -> None:
        """A private copy, and its canonizers unless the architecture's are given (choosing them traces the
        model with torch.fx, which patches ``nn.Module.__call__`` process-wide: done when the explainer is
        built, never again during calls while only tensors changed). The copy is taken outside a caller's
        inference mode: inference tensors would be useless to autograd."""
        check_ordinary_tensors(self.source)
        with torch.inference_mode(False):
            model = copy.deepcopy(self.source).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if canonizers is None:
            canonizers = canonizers_for(model)
        self.model, self._canonizers, self._copied_from = model, canonizers, stamp

    def _current(self) -> tuple[nn.Module, list[Canonizer]]:
        """The copy (and canonizers) this call uses, taken again if the caller's model changed since (a
        fine-tuning step, new weights loaded, a move to the GPU): the map must explain the model as it is now.
        A call keeps the copy it got even if another call replaces it meanwhile."""
        with self._lock:
            stamp = _state_stamp(self.source)
            if stamp != self._copied_from:
                same_modules = stamp[1] == self._copied_from[1]  # only tensors changed: same architecture
                self._copy_source(stamp, self._canonizers if same_modules else None)
            return self.model, self._canonizers

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.source)
        target = resolve_target(target, x.shape[0])
        model, canonizers = self._current()
        composite = EpsilonPlusFlat(epsilon=self.epsilon, canonizers=canonizers)
        with model_guard(model):
            try:
                composite.register(model)
                x_in = x.detach().clone().requires_grad_(True)

                def output_relevance(logits: torch.Tensor) -> torch.Tensor:
                    check_target_range(logits, target)
                    return torch.nn.functional.one_hot(target.to(logits.device), logits.shape[1]).to(logits.dtype)

                _, relevance = Gradient(model)(x_in, output_relevance)
            finally:
                composite.remove()
        return finish(collapse_channels(relevance), tuple(x.shape[-2:]), self.source)

    def differentiable_saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        """Refused: no map derivative is offered for LRP.

        Zennit's rules run inside autograd hooks that build a graph only when the output relevance itself
        requires grad; from a constant one-hot they leave a stray remainder (0.00049 where finite
        differences give 180 on TinyResNet, the wrong sign on a small net), and a relevance made to
        require grad gave a derivative of exactly 0. An attack on such a path meets gradient masking and
        reads as robustness, so it is not offered until a path passes a finite-difference check.
        """
        raise NotImplementedError(
            "LRP offers no differentiable map: Zennit's rule hooks do not carry the map's derivative "
            "(checked against finite differences), so a gradient-based attack on it would measure gradient "
            "masking; use saliency() for the map"
        )
