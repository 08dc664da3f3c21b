"""Decomposition rules, keyed by operation, registered in one place.

Each rule reads the node's inputs — a :class:`Source` (a post-activation PFV map), an :class:`Affine`
bundle, or a plain constant — and returns the node's value in the same vocabulary. Activations are the
stage boundaries: their rule asks the interpreter to compute the stage's sharing ratios. An operation
without a rule makes :class:`~ierf.errors.UnsupportedModelError` name the op and its module path; nothing
is silently approximated.

To support a new layer type, register a function here (Zennit-style: small rules over stock modules).
Attention and LayerNorm rules (ViTs) plug in the same way: a rule that returns an Affine bundle whose
terms carry their token routes.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ierf.errors import InputSizeError, UnsupportedModelError
from ierf.srd.derived import DERIVED
from ierf.srd.terms import Affine, DenseTerm, add, cat_channels, max_pool_of_paths, max_pool_routes, replace


@dataclass
class Source:
    """A post-activation PFV map (or the input image) and its id in the decomposition."""

    tensor: torch.Tensor
    id: int


class Interpreter(Protocol):
    def activation(self, node: fx.Node, value: Any, apply: Callable[[torch.Tensor], torch.Tensor]) -> Source: ...

    def where(self, node: fx.Node) -> str: ...


Rule = Callable[..., Any]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
# Plain Python functions with a rule that torch.fx would trace into (no ``__torch_function__`` dispatch):
# the tracer keeps them as single nodes so their rule sees the call.
OPAQUE_FUNCTIONS: list[Callable[..., Any]] = []
METHOD_RULES: dict[str, Rule] = {}


def module_rule(*types: type) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = fn
        return fn

    return wrap


def function_rule(*fns: Any) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for f in fns:
            FUNCTION_RULES[f] = fn
        return fn

    return wrap


def method_rule(*names: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for n in names:
            METHOD_RULES[n] = fn
        return fn

    return wrap


def as_affine(value: Any, where: str) -> Affine:
    if isinstance(value, Affine):
        return value
    if isinstance(value, Source):
        return Affine.of_source(value.tensor, value.id)
    if isinstance(value, ChannelGroups):
        raise UnsupportedModelError(
            f"{where}: a feature map viewed as (B, groups, C/groups, H, W) is only transposed (1, 2) and viewed "
            "back to (B, C, H, W) (a channel shuffle)"
        )
    if isinstance(value, Broadcast):
        raise UnsupportedModelError(
            f"{where}: a (B, C, 1, 1) map expanded to (B, C, {value.height}, {value.width}) is only the gate of a "
            "product (x * y.expand_as(x), a squeeze-excitation)"
        )
    if isinstance(value, VectorColumn):
        raise UnsupportedModelError(f"{where}: a (B, C) vector unsqueezed to (B, C, 1) is only unsqueezed again")
    raise UnsupportedModelError(f"{where}: expected a feature map, got {type(value).__name__}")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------------------
# Activations: the PFV boundaries. Any element-wise nonlinearity works (SRD is activation-agnostic).
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.PReLU,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Threshold,
    nn.RReLU,  # in eval mode a fixed leaky ReLU (a model in training mode is refused: graph.check_model_state)
    nn.Softshrink,
    nn.Hardshrink,
)
ACTIVATION_FUNCTIONS: tuple[Any, ...] = (
    F.relu,
    torch.relu,
    F.relu_,
    torch.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.mish,
    F.hardtanh,
    torch.tanh,
    torch.sigmoid,
    F.hardsigmoid,
    F.softsign,
    F.logsigmoid,
    F.tanhshrink,
    F.threshold,
    F.rrelu,
    F.softshrink,
    F.hardshrink,
    torch.special.expit,
)
ACTIVATION_METHODS: tuple[str, ...] = ("relu", "relu_", "sigmoid", "tanh")


@module_rule(*ACTIVATION_MODULES)
def _activation_module(ctx: Interpreter, node: fx.Node, module: nn.Module, x: Any) -> Source:
    def apply(z: torch.Tensor) -> torch.Tensor:
        if getattr(module, "inplace", False) and z.requires_grad:
            z = z.clone()  # the stage's autograd graph still needs z (differentiable maps)
        return module(z)

    return ctx.activation(node, x, apply)


@function_rule(*ACTIVATION_FUNCTIONS)
def _activation_function(ctx: Interpreter, node: fx.Node, fn: Any, x: Any, *args: Any, **kwargs: Any) -> Source:
    kwargs.pop("inplace", None)
    if fn in (F.relu_, torch.relu_):
        fn = torch.relu
    if fn is F.rrelu:
        training = kwargs.pop("training", args[2] if len(args) > 2 else False)
        if training:
            raise UnsupportedModelError(
                f"{ctx.where(node)}: rrelu with training=True draws a random slope per element at every call"
            )
        args = args[:2]  # lower, upper (an inplace flag after training is dropped as for every activation)
    return ctx.activation(node, x, lambda z: fn(z, *args, **kwargs))


@method_rule(*ACTIVATION_METHODS)
def _activation_method(ctx: Interpreter, node: fx.Node, name: str, x: Any, *args: Any, **kwargs: Any) -> Source:
    fn = {"relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[name]
    return ctx.activation(node, x, fn)


# --------------------------------------------------------------------------------------------------------
# Convolutions and linear layers.
def _conv_padding(padding: Any, weight: torch.Tensor, dilation: tuple[int, int], where: str) -> tuple[int, ...]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            kh, kw = weight.shape[2:]
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise UnsupportedModelError(f"{where}: unknown padding {padding!r}")
    py, px = _pair(padding)
    return (py, py, px, px)


def _conv(ctx, node, x, weight, bias, stride, padding, dilation, groups) -> Affine:
    where = ctx.where(node)
    dilation = _pair(dilation)
    pad = _conv_padding(padding, weight, dilation, where)
    a = as_affine(x, where)
    if weight.shape[1] * groups != a.channels:  # its terms would read a slice of the weight silently
        raise ValueError(
            f"{where}: the convolution takes {weight.shape[1] * groups} input channels (weight "
            f"{tuple(weight.shape)}, groups={groups}) but its input has {a.channels}"
        )
    return a.conv(weight, bias, _pair(stride), pad, dilation, groups, where)


@module_rule(nn.Conv2d)
def _conv2d_module(ctx, node, m: nn.Conv2d, x) -> Affine:
    if m.padding_mode != "zeros":
        raise UnsupportedModelError(f"{ctx.where(node)}: padding_mode={m.padding_mode!r} (only 'zeros' is supported)")
    return _conv(ctx, node, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


@function_rule(F.conv2d, torch.conv2d)
def _conv2d_function(ctx, node, fn, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Affine:
    return _conv(ctx, node, x, weight, bias, stride, padding, dilation, groups)


@module_rule(nn.Linear)
def _linear_module(ctx, node, m: nn.Linear, x) -> Affine:
    return as_affine(x, ctx.where(node)).linear(m.weight, m.bias, ctx.where(node))


@function_rule(F.linear)
def _linear_function(ctx, node, fn, x, weight, bias=None) -> Affine:
    return as_affine(x, ctx.where(node)).linear(weight, bias, ctx.where(node))


# --------------------------------------------------------------------------------------------------------
# Batch norm (eval): folded into a per-channel scale and shift, eps in both (spec §2.4).
def _batch_norm(ctx, node, x, mean, var, weight, bias, eps) -> Affine:
    if mean is None or var is None:
        raise UnsupportedModelError(f"{ctx.where(node)}: batch norm without running statistics uses batch statistics")

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale, shift

    sources = tuple(t for t in (mean, var, weight, bias) if t is not None)
    scale, shift = DERIVED.get(f"bn{eps}:{weight is not None}:{bias is not None}", sources, fold)
    return as_affine(x, ctx.where(node)).scale_shift(scale, shift)


@module_rule(nn.BatchNorm2d, nn.BatchNorm1d)
def _bn_module(ctx, node, m: nn.modules.batchnorm._BatchNorm, x) -> Affine:
    if m.training:
        raise ValueError(f"{ctx.where(node)}: batch norm in training mode; call model.eval()")
    return _batch_norm(ctx, node, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)


@function_rule(F.batch_norm)
def _bn_function(
    ctx,
    node,
    fn,
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
) -> Affine:
    if training:
        raise ValueError(f"{ctx.where(node)}: F.batch_norm called with training=True")
    return _batch_norm(ctx, node, x, running_mean, running_var, weight, bias, eps)


# --------------------------------------------------------------------------------------------------------
# Pooling.
def _stride(stride: Any, kernel: tuple[int, int]) -> tuple[int, int]:
    """A pool's stride; torch takes None or an empty list or tuple as "the kernel's"."""
    return kernel if stride is None or (isinstance(stride, list | tuple) and not stride) else _pair(stride)


def _refuse_return_indices(where: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where}: max pooling with return_indices has no SRD rule (the indices would feed an unpooling "
        "or gather that relevance cannot follow); pool without them"
    )


def _max_pool(ctx, node, x, kernel, stride, padding, dilation, ceil_mode, return_indices) -> Affine:
    where = ctx.where(node)
    if return_indices:
        raise _refuse_return_indices(where)
    kernel = _pair(kernel)
    stride = _stride(stride, kernel)
    if isinstance(x, Source):
        tensor, route = x.tensor, Affine.of_source(x.tensor, x.id).terms[0].route
    elif isinstance(x, Affine) and len(x.terms) == 1 and not x.biases and isinstance(x.terms[0], DenseTerm):
        tensor, route = x.terms[0].x, x.terms[0].route
    elif _channel_slices(x):
        # A channel concatenation of PFV maps (SqueezeNet's Fire modules): winners are per channel, so each
        # slice is pooled on its own and the slices are concatenated again.
        parts = sorted(x.terms, key=lambda t: t.c0)
        return cat_channels(
            [max_pool_routes(t.x, t.route, kernel, stride, _pair(padding), _pair(dilation), ceil_mode) for t in parts]
        )
    elif _pooled_paths(x):
        return max_pool_of_paths(x, kernel, stride, _pair(padding), _pair(dilation), ceil_mode)
    else:
        raise UnsupportedModelError(f"{where}: max pooling of {_describe_value(x)}")
    return max_pool_routes(tensor, route, kernel, stride, _pair(padding), _pair(dilation), ceil_mode)


def _describe_value(x: Any) -> str:
    """What a max-pool was given, for its refusal: the case decides what the user can change."""
    if isinstance(x, Affine) and x.biases:
        return "a map plus a constant, such as a convolution's output (max pooling needs an activation first)"
    if isinstance(x, Affine) and len({t.route.source for t in x.terms}) > 1:
        return "a sum of several feature maps (max pooling needs an activation first)"
    return "a value that is not made of PFV maps as they are, such as an average pooling's or a convolution's output"


def _pooled_paths(x: Any) -> bool:
    """Whether ``x`` is an earlier max-pool's paths (masked copies of PFV maps, possibly side by side in a
    channel concatenation): a sum of paths with no constant, which a pooling of its own only regroups."""
    return (
        isinstance(x, Affine)
        and not x.biases
        and x.pending_pool is None
        and not x.is_vector
        and x.flat_from is None
        and len(x.terms) > 1
        and all(isinstance(t, DenseTerm) for t in x.terms)
    )


def _channel_slices(x: Any) -> bool:
    """Whether ``x`` is PFV maps side by side on disjoint channel slices that fill every channel."""
    if not isinstance(x, Affine) or x.biases or x.pending_pool is not None or len(x.terms) < 2:
        return False
    if not all(isinstance(t, DenseTerm) for t in x.terms):
        return False
    spans = sorted((t.c0, t.c0 + t.channels) for t in x.terms)
    return spans[0][0] == 0 and spans[-1][1] == x.channels and all(a[1] == b[0] for a, b in itertools.pairwise(spans))


@module_rule(nn.MaxPool2d)
def _max_pool_module(ctx, node, m: nn.MaxPool2d, x) -> Affine:
    return _max_pool(ctx, node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


@function_rule(F.max_pool2d, torch.max_pool2d)
def _max_pool_function(
    ctx, node, fn, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
) -> Affine:
    return _max_pool(ctx, node, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@function_rule(F.max_pool2d_with_indices)  # what fx records for F.max_pool2d(..., return_indices=True)
def _max_pool_with_indices_function(ctx, node, fn, x, *args, **kwargs) -> Affine:
    raise _refuse_return_indices(ctx.where(node))


def _avg_pool(ctx, node, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> Affine:
    where = ctx.where(node)
    kernel = _pair(kernel)
    stride = _stride(stride, kernel)
    py, px = _pair(padding)
    if ceil_mode or divisor_override is not None or ((py or px) and not count_include_pad):
        raise UnsupportedModelError(
            f"{where}: average pooling with ceil_mode, divisor_override or padding excluded from the count"
        )
    return as_affine(x, where).avg_pool(kernel, stride, (py, py, px, px), where)


@module_rule(nn.AvgPool2d)
def _avg_pool_module(ctx, node, m: nn.AvgPool2d, x) -> Affine:
    return _avg_pool(
        ctx, node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override
    )


@function_rule(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _avg_pool_function(
    ctx,
    node,
    fn,
    x,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
) -> Affine:
    return _avg_pool(ctx, node, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_avg(ctx, node, x, output_size) -> Affine:
    where = ctx.where(node)
    a = as_affine(x, where)
    oh, ow = (
        _pair(output_size)
        if not isinstance(output_size, list | tuple)
        else (
            a.height if output_size[0] is None else output_size[0],
            a.width if output_size[1] is None else output_size[1],
        )
    )
    if (oh, ow) == (a.height, a.width):
        return a
    if a.height % oh or a.width % ow:
        if not _read_by_flatten_then_linear(ctx, node):
            raise UnsupportedModelError(
                f"{where}: adaptive average pooling from {a.height}x{a.width} to {oh}x{ow} has uneven windows; "
                "supported only when a flatten and a Linear layer read it next"
            )
        return a.adaptive_avg_pool(oh, ow, where)
    k = (a.height // oh, a.width // ow)
    return a.avg_pool(k, k, (0, 0, 0, 0), where)


def _read_by_flatten_then_linear(ctx, node) -> bool:
    """Whether ``node``'s value reaches the rest of the graph only through a flatten and then a Linear,
    which fold a pending uneven pooling into the Linear's weight (shape queries such as ``x.size(0)`` aside).
    Checked on the graph once the uneven case arises, so no other rule ever sees the pending value."""
    role = {n: getattr(rule, "pending_pool_role", None) for n, rule, _ in ctx.program.steps}

    def readers(n) -> list:  # the ops that consume n's value, looking through identities (eval dropout)
        found = []
        for user in n.users:
            if role.get(user) == "pass":
                found += readers(user)
            elif role.get(user) != "shape":
                found.append(user)
        return found

    flats = readers(node)
    return bool(flats) and all(
        role.get(f) == "flatten" and readers(f) and all(role.get(u) == "linear" for u in readers(f)) for f in flats
    )


@module_rule(nn.AdaptiveAvgPool2d)
def _adaptive_avg_module(ctx, node, m: nn.AdaptiveAvgPool2d, x) -> Affine:
    return _adaptive_avg(ctx, node, x, m.output_size)


@function_rule(F.adaptive_avg_pool2d)
def _adaptive_avg_function(ctx, node, fn, x, output_size) -> Affine:
    return _adaptive_avg(ctx, node, x, output_size)


def _global_mean(ctx, node, x, dim, keepdim) -> Affine:
    where = ctx.where(node)
    if dim is None:
        raise UnsupportedModelError(f"{where}: mean over every dimension (only the spatial mean is supported)")
    if isinstance(x, ChannelGroups):  # a (B, G, C/G, H, W) view: its dims are not a map's
        raise UnsupportedModelError(
            f"{where}: mean over dims {dim} of a grouped channel view (B, G, C/G, H, W): a mean within channel "
            "groups has no rule (a (B, C, H, W) map's mean over its height and width has)"
        )
    dims = {d % 4 for d in ((dim,) if isinstance(dim, int) else dim)}
    if dims != {2, 3}:
        what = "one spatial dim" if dims in ({2}, {3}) else f"dims {dim}"
        raise UnsupportedModelError(
            f"{where}: mean over {what} (only the mean over both spatial dims at once is supported: x.mean((2, 3)))"
        )
    a = as_affine(x, where)
    pooled = a.avg_pool((a.height, a.width), (a.height, a.width), (0, 0, 0, 0), where)
    return pooled if keepdim else pooled.flatten()


@function_rule(torch.mean)
def _mean_function(ctx, node, fn, x, dim=None, keepdim=False, **kwargs) -> Affine:
    return _global_mean(ctx, node, x, dim, keepdim)


@method_rule("mean")
def _mean_method(ctx, node, name, x, dim=None, keepdim=False, **kwargs) -> Affine:
    return _global_mean(ctx, node, x, dim, keepdim)


# --------------------------------------------------------------------------------------------------------
# Structure: identity-like ops, padding, residual add, concat, flatten/reshape.
IDENTITY_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout1d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@module_rule(*IDENTITY_MODULES)
def _identity_module(ctx, node, m: nn.Module, x, *args, **kwargs) -> Any:
    if m.training and not isinstance(m, nn.Identity):
        raise ValueError(f"{ctx.where(node)}: dropout in training mode; call model.eval()")
    return x


@function_rule(F.dropout, F.dropout2d, torch.dropout)
def _dropout_function(ctx, node, fn, x, p=0.5, training=False, inplace=False) -> Any:
    if training:
        raise ValueError(f"{ctx.where(node)}: dropout called with training=True")
    return x


try:  # torchvision's EfficientNet and ConvNeXt drop residual branches at random while training
    from torchvision.ops import stochastic_depth as _stochastic_depth_op
except ImportError:  # pragma: no cover - torchvision is a dependency
    _stochastic_depth_op = None

if _stochastic_depth_op is not None:
    OPAQUE_FUNCTIONS.append(_stochastic_depth_op)  # plain Python: fx would trace into its random mask

    @function_rule(_stochastic_depth_op)
    def _stochastic_depth(ctx, node, fn, x, p=0.0, mode="row", training=True) -> Any:
        if training and p > 0:
            raise ValueError(
                f"{ctx.where(node)}: stochastic depth called with training=True drops rows at random; "
                "pass training=self.training (torchvision's StochasticDepth does) and call model.eval()"
            )
        return x


try:  # the input normalisation put in front of a torchvision model: nn.Sequential(Normalize(mean, std), model)
    from torchvision.transforms import Normalize as _Normalize
    from torchvision.transforms.v2 import Normalize as _NormalizeV2
except ImportError:  # pragma: no cover - torchvision is a dependency
    _Normalize = _NormalizeV2 = None

if _Normalize is not None:

    @module_rule(_Normalize, _NormalizeV2)
    def _normalize_module(ctx, node, m: nn.Module, x) -> Affine:
        """``(x - mean) / std`` per channel: a channel affine map, folded into the stage like a batch norm
        (its tensors-only forward cannot be traced through)."""
        where = ctx.where(node)
        bundle = as_affine(x, where)
        ref = bundle._reference_tensor()
        mean = torch.as_tensor(m.mean, dtype=ref.dtype, device=ref.device).reshape(-1)
        std = torch.as_tensor(m.std, dtype=ref.dtype, device=ref.device).reshape(-1)
        c = bundle.channels
        if bundle.is_vector or bundle.flat_from is not None or {mean.numel(), std.numel()} - {1, c}:
            raise UnsupportedModelError(
                f"{where}: Normalize with {mean.numel()} means and {std.numel()} stds on a value of shape "
                f"{tuple(_shape_of(bundle))} (one per channel of a (B, C, H, W) map, or one for all)"
            )
        mean, std = mean.expand(c), std.expand(c)
        return bundle.scale_shift(1.0 / std, -mean / std)


@method_rule("contiguous", "clone")
def _identity_method(ctx, node, name, x, *args, **kwargs) -> Any:
    return x  # maps, channel groups and constants alike


def _zero_pad(ctx, node, x, pad, value=0.0) -> Affine:
    where = ctx.where(node)
    if value != 0:
        raise UnsupportedModelError(f"{where}: padding with the constant {value} (only zero padding)")
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        pad = (*pad, 0, 0)
    if len(pad) != 4 or min(pad) < 0:
        raise UnsupportedModelError(f"{where}: padding {pad} (non-negative 2-D padding only)")
    left, right, top, bottom = pad
    return as_affine(x, where).zero_pad((top, bottom, left, right), where)


@module_rule(nn.ZeroPad2d, nn.ConstantPad2d)
def _pad_module(ctx, node, m: nn.Module, x) -> Affine:
    return _zero_pad(ctx, node, x, m.padding, getattr(m, "value", 0.0))


@function_rule(F.pad)
def _pad_function(ctx, node, fn, x, pad, mode="constant", value=None) -> Affine:
    if mode != "constant":
        raise UnsupportedModelError(f"{ctx.where(node)}: F.pad mode {mode!r} (only constant zero padding)")
    return _zero_pad(ctx, node, x, pad, value or 0.0)


def _is_map(v: Any) -> bool:
    return isinstance(v, Source | Affine | ChannelGroups | VectorColumn | Broadcast)


def _add(ctx, node, a, b, alpha=1) -> Any:
    where = ctx.where(node)
    if alpha != 1:
        raise UnsupportedModelError(f"{where}: add with alpha={alpha}")
    if _is_map(a) and _is_map(b):
        return add(as_affine(a, where), as_affine(b, where))
    if _is_map(a) or _is_map(b):
        m, c = (a, b) if _is_map(a) else (b, a)
        bundle = as_affine(m, where)
        const = torch.as_tensor(c, dtype=bundle.terms[0].x.dtype, device=bundle.terms[0].x.device)
        return bundle.add_constant(const, where)
    return a + b


@function_rule(operator.add, operator.iadd, torch.add)
def _add_function(ctx, node, fn, a, b, alpha=1) -> Any:
    return _add(ctx, node, a, b, alpha)


@method_rule("add", "add_")
def _add_method(ctx, node, name, a, b, alpha=1) -> Any:
    return _add(ctx, node, a, b, alpha)


def _computed_from(node: Any, other: Any) -> bool:
    """Whether fx node ``node`` is computed (through any ops) from fx node ``other``."""
    if not isinstance(node, fx.Node) or not isinstance(other, fx.Node) or node is other:
        return False
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is other:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


_GATE_OPERAND = "ierf_gate_operand"  # node.meta key: index of a product's operand computed from the other
_GATE_REDUCES = "ierf_gate_reduces"  # node.meta key: whether that operand is computed through a reduction
_GATE_MIXES = "ierf_gate_mixes"  # node.meta key: ... through a reduction or a convolution (one-channel maps)

# Ops that pool positions or channels (torch.max/min reduce only with a dim, which gates always give).
_REDUCING_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d)
_REDUCING_NAMES = frozenset(
    {"adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "lp_pool2d"}
    | {"mean", "sum", "amax", "amin", "max", "min", "logsumexp"}
)


def _reduces(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), _REDUCING_MODULES)
    if node.op == "call_method":
        return node.target in _REDUCING_NAMES
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name in _REDUCING_NAMES or name.lstrip("_") in _REDUCING_NAMES
    return False


def _convolves(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), nn.Conv2d)
    return node.op == "call_function" and node.target in (F.conv2d, torch.conv2d)


def _computed_through_reduction(
    gate: fx.Node, main: fx.Node, model: nn.Module, mixes: Callable[[fx.Node, nn.Module], bool] = _reduces
) -> bool:
    """Whether some op between ``main`` and ``gate`` pools positions or channels (the squeeze of a
    squeeze-excitation, the channel mean of a spatial gate), or whatever ``mixes`` says mixes them. An
    element-wise function of the map itself, as in ``x * sigmoid(x)``, has none."""
    seen: set[fx.Node] = set()
    stack = [gate]
    while stack:
        n = stack.pop()
        if n is main or n in seen:
            continue
        seen.add(n)
        if mixes(n, model) and _computed_from(n, main):
            return True
        stack.extend(n.all_input_nodes)
    return False


def _gated(ctx, node: fx.Node, a: Any, b: Any) -> Affine | None:
    """``x * g`` where ``g`` is a PFV map of gates computed from ``x`` itself, one per channel
    (squeeze-excitation) or one per position (spatial attention). The gate is taken as this image's constant
    scale, as max-pool winners are: ``x * g`` is then linear in ``x``, so relevance flows exactly through
    the gated map and none through the gate's own branch. None for any other product (two full maps, as in
    GLU-style gating or ``x * sigmoid(x)``, whose factors have no such roles)."""
    if _GATE_OPERAND not in node.meta:  # the graph is fixed: walk it once, not on every forward
        first, second = (_before_reshapes(n) for n in node.args[:2])
        node.meta[_GATE_OPERAND] = 1 if _computed_from(second, first) else 0 if _computed_from(first, second) else None
    which = node.meta[_GATE_OPERAND]
    if which is None:
        return None
    gate, main = (b, a) if which == 1 else (a, b)
    if not isinstance(gate, Source):
        return None
    return _scaled_by_gate(ctx, node, as_affine(main, ""), gate.tensor, which)


def _scaled_by_gate(ctx, node: fx.Node, m: Affine, g: torch.Tensor, which: int) -> Affine | None:
    """``m * g`` with ``g`` held at its value, one factor per channel or per position (an expanded view of
    either is read as what it is); None where ``g`` has no gate's shape."""
    if _GATE_REDUCES not in node.meta:
        gate_node, main_node = _before_reshapes(node.args[which]), _before_reshapes(node.args[1 - which])
        node.meta[_GATE_REDUCES] = _computed_through_reduction(gate_node, main_node, ctx.program.model)
    if g.dim() != 4 or m.is_vector or m.flat_from is not None or m.pending_pool is not None:
        return None
    g = _unexpanded(g, skip_batch=True)  # y.expand_as(x): one factor per channel (or per position)
    per_channel = g.shape[1] == m.channels and g.shape[2:] == (1, 1)
    per_position = g.shape[1] == 1 and g.shape[2:] == (m.height, m.width)
    if g.shape[0] != m.batch or not (per_channel or per_position):
        return None
    if (m.height, m.width) == (1, 1) and g.shape[1] == m.channels and not node.meta[_GATE_REDUCES]:
        # On a 1x1 map a per-channel gate has the map's own shape, as the factor of x * sigmoid(x) does:
        # only a squeeze (pooling) between the map and the gate shows it is one.
        return None
    if per_position and m.channels == 1:
        # Likewise a spatial gate on a one-channel map: a pooling or a convolution between map and gate
        # (a spatial attention's conv over its channel statistics) shows it is one, x * sigmoid(x) has none.
        if _GATE_MIXES not in node.meta:
            gate_node, main_node = _before_reshapes(node.args[which]), _before_reshapes(node.args[1 - which])
            node.meta[_GATE_MIXES] = _computed_through_reduction(
                gate_node, main_node, ctx.program.model, lambda n, model: _reduces(n, model) or _convolves(n, model)
            )
        if not node.meta[_GATE_MIXES]:
            return None
    # A gate straight after a convolution and its batch norm (SE-ResNet blocks): each kernel tap is a path of
    # its own for the sharing ratios, and the gate scales every tap's contribution, so the taps are formed
    # here (a tap tensor per path; a convolution kept whole shares one kernel across the batch).
    m = m.taps_split()

    def gated(value: torch.Tensor, c0: int, channels: int) -> torch.Tensor:
        return value * (g if per_position else g[:, c0 : c0 + channels])

    out = m.rekeyed()
    out.terms = [replace(t, x=gated(t.x, t.c0, t.channels)) for t in out.terms]
    out.biases = [replace(bias, value=gated(bias.value, bias.c0, bias.channels)) for bias in out.biases]
    return out


def _expanded(ctx, node, x: Any, size: tuple[int, ...]) -> Any:
    """A 1x1 map expanded over a (B, C, H, W) map's positions (only a gate's factor may be), or, where H and W
    are 1, the map itself."""
    where = ctx.where(node)
    if not _is_one_by_one_map(x):
        raise UnsupportedModelError(
            f"{where}: expand to {tuple(size)} of a feature map (only a (B, C, 1, 1) gate, as in x * y.expand_as(x))"
        )
    b, c = _shape_of(x)[:2]
    size = tuple(int(s) for s in size)
    if len(size) != 4 or size[0] not in (b, -1) or size[1] not in (c, -1) or min(size[2:]) < 1:
        raise UnsupportedModelError(f"{where}: expand of a (B, C, 1, 1) map to {size} (only over positions)")
    return x if size[2:] == (1, 1) else Broadcast(x, size[2], size[3])


@method_rule("expand_as")
def _expand_as_method(ctx, node, name, x, other) -> Any:
    if not _is_map(x):
        return x.expand(_shape_of(other)) if _is_map(other) else x.expand_as(other)
    return _expanded(ctx, node, x, tuple(_shape_of(other)))


@method_rule("expand")
def _expand_method(ctx, node, name, x, *size) -> Any:
    if len(size) == 1 and isinstance(size[0], tuple | list | torch.Size):
        size = tuple(size[0])
    if not _is_map(x):
        return x.expand(*size)
    return _expanded(ctx, node, x, size)


# Ops that only reshape a gate on its way to a product (y.view(B, C, 1, 1).expand_as(x)): the gate's role is
# read off the node they start from.
_RESHAPING_METHODS = frozenset({"view", "reshape", "unsqueeze", "expand", "expand_as"})


def _before_reshapes(n: Any) -> Any:
    while isinstance(n, fx.Node) and n.args:
        reshapes = (n.op == "call_method" and n.target in _RESHAPING_METHODS) or (
            n.op == "call_function"
            and (
                n.target in (torch.unsqueeze, torch.reshape)
                or (n.target is operator.getitem and _adds_two_trailing_axes(n.args[1]))
            )
        )
        if not reshapes:
            break
        n = n.args[0]
    return n


_PRODUCT_FUNCTIONS = (operator.mul, operator.imul, torch.mul)
_PRODUCT_METHODS = ("mul", "mul_", "multiply")


# Function and method rules are called alike, (ctx, node, the function or method name, *args): one rule
# serves both spellings.
@function_rule(*_PRODUCT_FUNCTIONS)
@method_rule(*_PRODUCT_METHODS)
def _mul(ctx, node, _op, a, b) -> Any:
    where = ctx.where(node)
    gates = ctx.program.gate_branches.gates
    if node in gates:  # the gate was computed as the model computes it (GateBranches)
        which = gates[node]
        main, g = (a, b) if which == 1 else (b, a)
        out = None
        if _is_map(main) and isinstance(g, torch.Tensor) and not isinstance(main, VectorColumn | Broadcast):
            out = _scaled_by_gate(ctx, node, as_affine(main, where), g, which)
        if out is None:
            raise UnsupportedModelError(
                f"{where}: product of two feature maps that is not a gate: the factor computed from the map has "
                f"shape {tuple(_shape_of(g))}, neither one gate per channel (B, C, 1, 1) nor one per position "
                "(B, 1, H, W) of that map"
            )
        return out
    if isinstance(a, Broadcast) or isinstance(b, Broadcast):
        broadcast, other = (a, b) if isinstance(a, Broadcast) else (b, a)
        if not _is_map(other) or isinstance(other, Broadcast) or _shape_of(other)[2:] != _shape_of(broadcast)[2:]:
            raise UnsupportedModelError(
                f"{where}: product of an expanded (B, C, 1, 1) map with anything but the map it was expanded to"
            )
        a, b = (broadcast.value, other) if a is broadcast else (other, broadcast.value)
    if _is_map(a) and _is_map(b):
        gated = _gated(ctx, node, a, b)
        if gated is None:
            raise UnsupportedModelError(
                f"{where}: product of two feature maps that is not a gate (a PFV map of one factor per channel "
                "or per position, computed from the other operand, through a pooling where the map is 1x1, "
                "times a map of single-path terms); "
                "for an activation written as a product, such as x * sigmoid(x), register its module "
                "with ierf.srd.register_activation"
            )
        return gated
    if _is_map(a) or _is_map(b):
        m, c = (a, b) if _is_map(a) else (b, a)
        bundle = as_affine(m, where)
        return bundle.scale_shift(_channel_factor(bundle, c, where, "multiplication"), None)
    return a * b


def _unexpanded(t: torch.Tensor, skip_batch: bool = False) -> torch.Tensor:
    """An expanded view (``y.expand_as(x)``) cut back to what it was expanded from: a stride-0 dim holds one
    value, so one index of it is the whole factor along that dim."""
    return t[
        tuple(
            slice(0, 1) if step == 0 and not (skip_batch and d == 0) else slice(None)
            for d, step in enumerate(t.stride())
        )
    ]


def _channel_factor(bundle: Affine, c: Any, where: str, what: str) -> torch.Tensor:
    """A constant factor of a feature map as one number per channel, (C,): a Python number, or a tensor that
    broadcasts to the map without enlarging it and varies only along the channels ((C,), (1, C, 1, 1), ...;
    the ``/ std`` of an input normalisation). A scale that varies by position or image is no channel
    affine map (the terms SRD keeps cannot carry it): refused."""
    ref = bundle._reference_tensor()
    if isinstance(c, bool) or not isinstance(c, int | float | torch.Tensor):
        raise UnsupportedModelError(f"{where}: {what} of a feature map by {type(c).__name__}")
    if not isinstance(c, torch.Tensor) or c.numel() == 1:  # a learnt scalar (a Parameter) too
        return ref.new_full((bundle.channels,), float(c.detach() if isinstance(c, torch.Tensor) else c))
    if bundle.pending_pool is not None or bundle.flat_from is not None:
        raise UnsupportedModelError(
            f"{where}: {what} of a flattened or pooled vector by a tensor of shape {tuple(c.shape)} "
            "(only a number there)"
        )
    c = _unexpanded(c)  # scale.expand_as(x): the per-channel factor it was expanded from
    shape = (
        (bundle.batch, bundle.channels)
        if bundle.is_vector
        else (bundle.batch, bundle.channels, bundle.height, bundle.width)
    )
    try:
        fits = torch.broadcast_shapes(tuple(c.shape), shape) == shape
    except RuntimeError:
        fits = False
    full = (1,) * (len(shape) - c.dim()) + tuple(c.shape)
    if not fits or any(n != 1 for i, n in enumerate(full) if i != 1):
        raise UnsupportedModelError(
            f"{where}: {what} of a feature map of shape {shape} by a tensor of shape {tuple(c.shape)} "
            + (
                "(only a number, or one factor per feature: (C,) or (1, C))"
                if bundle.is_vector
                else "(only a number, or one factor per channel: (C, 1, 1) or (1, C, 1, 1), e.g. "
                "gamma.view(1, -1, 1, 1); a 1-D tensor broadcasts along the width)"
            )
        )
    return c.detach().to(ref.dtype).reshape(-1).expand(bundle.channels).to(ref.device)


def _negated(value: Any, where: str) -> Affine:
    bundle = as_affine(value, where)
    return bundle.scale_shift(bundle._reference_tensor().new_full((bundle.channels,), -1.0), None)


@function_rule(operator.sub, operator.isub, torch.sub, torch.subtract)
@method_rule("sub", "sub_", "subtract")
def _sub(ctx, node, _op, a, b, alpha=1) -> Any:
    """``a - b`` as ``a + (-b)``: a difference of maps, or a constant taken off (an input normalisation's
    ``x - mean``); numbers (shape arithmetic) are just subtracted."""
    where = ctx.where(node)
    if not (_is_map(a) or _is_map(b)):
        return a - alpha * b if alpha != 1 else a - b
    if alpha != 1:
        raise UnsupportedModelError(f"{where}: sub with alpha={alpha}")
    if _is_map(b):
        return _add(ctx, node, a, _negated(b, where))
    return _add(ctx, node, a, -b)


@function_rule(operator.neg, torch.neg, torch.negative)
@method_rule("neg", "neg_", "negative")
def _neg(ctx, node, _op, x) -> Any:
    return _negated(x, ctx.where(node)) if _is_map(x) else -x


@function_rule(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide)
@method_rule("div", "div_", "divide", "true_divide")
def _div(ctx, node, _op, a, b, rounding_mode=None) -> Any:
    """A feature map divided by a constant (a number, or one per channel: ``/ std``) is scaled by its
    reciprocal; a division by a feature map is not linear in it."""
    if not (_is_map(a) or _is_map(b)):
        return torch.div(a, b, rounding_mode=rounding_mode) if rounding_mode is not None else a / b
    where = ctx.where(node)
    if _is_map(b):
        raise UnsupportedModelError(f"{where}: division by a feature map")
    if rounding_mode is not None:
        raise UnsupportedModelError(f"{where}: division of a feature map with rounding_mode={rounding_mode!r}")
    bundle = as_affine(a, where)
    return bundle.scale_shift(1.0 / _channel_factor(bundle, b, where, "division"), None)


@function_rule(torch.cat, torch.concat)
def _cat_function(ctx, node, fn, tensors, dim=0) -> Affine:
    where = ctx.where(node)
    parts = [as_affine(t, where) for t in tensors]
    ndim = 2 if parts[0].is_vector else 4  # (B, C) vectors: dim -1 is the channel dim too
    if dim % ndim != 1:
        raise UnsupportedModelError(f"{where}: torch.cat along dim {dim} (only channel concatenation)")
    return cat_channels(parts)


def _flatten(ctx, node, x, start_dim=1, end_dim=-1) -> Affine:
    where = ctx.where(node)
    if start_dim != 1 or end_dim not in (-1, 3):
        raise UnsupportedModelError(f"{where}: flatten({start_dim}, {end_dim}) (only flattening all but the batch)")
    return as_affine(x, where).flatten()


@module_rule(nn.Flatten)
def _flatten_module(ctx, node, m: nn.Flatten, x) -> Affine:
    return _flatten(ctx, node, x, m.start_dim, m.end_dim)


@function_rule(torch.flatten)
def _flatten_function(ctx, node, fn, x, start_dim=0, end_dim=-1) -> Affine:
    return _flatten(ctx, node, x, start_dim, end_dim)


@method_rule("flatten")
def _flatten_method(ctx, node, name, x, start_dim=0, end_dim=-1) -> Affine:
    return _flatten(ctx, node, x, start_dim, end_dim)


def _is_squeeze(node: Any) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == "squeeze")
        or (node.op == "call_function" and node.target is torch.squeeze)
    )


def _squeeze_dim(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _pairs_with_next_squeeze(node: fx.Node) -> bool:
    """``node`` squeezes one dim and its only reader squeezes the last of the three left: together they
    are ``squeeze(-1).squeeze(-1)`` (or ``squeeze(2)``), the hand-written flatten of a pooled 1x1 map."""
    users = list(node.users)
    if len(users) != 1 or not _is_squeeze(users[0]) or users[0].args[0] is not node:
        return False
    second = _squeeze_dim(users[0])
    return isinstance(_squeeze_dim(node), int) and isinstance(second, int) and second % 3 == 2


def _squeeze(ctx, node, x, dim=None) -> Any:
    """Squeezing the spatial dims of a 1x1 map is a flatten (a pooled map before the classifier), in one
    call or in two; anything else would leave a value SRD does not track."""
    if not _is_map(x):
        return torch.squeeze(x) if dim is None else torch.squeeze(x, dim)
    where = ctx.where(node)
    a = as_affine(x, where)
    first = node.args[0] if node.args else None
    if a.is_vector and _is_squeeze(first) and _pairs_with_next_squeeze(first):
        return a  # the second squeeze of the pair: the first already flattened the map
    one_by_one = not a.is_vector and a.flat_from is None and a.pending_pool is None and a.height == a.width == 1
    dims = None if dim is None else {d % 4 for d in (tuple(dim) if isinstance(dim, tuple | list) else (dim,))}
    if one_by_one and (dims == {2, 3} or (dims in ({2}, {3}) and _pairs_with_next_squeeze(node))):
        return a.flatten()
    shape = "x".join(str(v) for v in (a.batch, a.channels, a.height, a.width))
    raise UnsupportedModelError(
        f"{where}: squeeze({'' if dim is None else dim}) of a {shape} map (only squeezing both spatial dims of "
        "a 1x1 map: squeeze((2, 3)), or squeeze(-1).squeeze(-1); squeeze() would also drop a batch of one)"
    )


@method_rule("squeeze")
def _squeeze_method(ctx, node, name, x, dim=None) -> Any:
    return _squeeze(ctx, node, x, dim)


@function_rule(torch.squeeze)
def _squeeze_function(ctx, node, fn, x, dim=None) -> Any:
    return _squeeze(ctx, node, x, dim)


@dataclass
class ChannelGroups:
    """A (B, C, H, W) map viewed as (B, groups, C/groups, H, W), possibly with those two dimensions swapped:
    the middle of a channel shuffle (ShuffleNet), held until it is viewed back as (B, C, H, W)."""

    value: Affine
    groups: int
    swapped: bool = False

    def order(self) -> list[int]:
        """Old channel of each new channel once viewed back."""
        c = self.value.channels
        per = c // self.groups
        if not self.swapped:
            return list(range(c))
        return [j * per + i for i in range(per) for j in range(self.groups)]


@dataclass
class VectorColumn:
    """A (B, C) vector unsqueezed once, (B, C, 1): held until a second unsqueeze makes it a 1x1 map."""

    value: Source | Affine


@dataclass
class Broadcast:
    """A (B, C, 1, 1) map expanded to (B, C, H, W) with ``expand_as``/``expand`` (a squeeze-excitation's gate
    written ``x * y.expand_as(x)``): the same factor as the 1x1 map itself in a product, and nothing else."""

    value: Source | Affine
    height: int
    width: int


# A squeeze-excitation written with Linear layers: the gate, a (B, C) vector, becomes a 1x1 map with
# view/reshape(B, C, 1, 1), unsqueeze twice, [:, :, None, None] or [..., None, None].
def _as_vector(x: Any) -> Source | Affine | None:
    """``x`` if it is a (B, C) vector of PFVs or of an affine map of them (not a flattened map), else None."""
    if isinstance(x, Source) and x.tensor.dim() == 2:
        return x
    if isinstance(x, Affine) and x.is_vector and x.flat_from is None and x.pending_pool is None:
        return x
    return None


def _vector_to_map(v: Source | Affine) -> Source | Affine:
    """The (B, C) vector as the (B, C, 1, 1) map it already is to SRD (a vector is a 1x1 map of PFVs)."""
    if isinstance(v, Source):
        return Source(v.tensor[:, :, None, None], v.id)
    return replace(v.rekeyed(), is_vector=False)


def _is_one_by_one_map(x: Any) -> bool:
    if isinstance(x, Source):
        return x.tensor.dim() == 4 and x.tensor.shape[2:] == (1, 1)
    return (
        isinstance(x, Affine)
        and not x.is_vector
        and x.flat_from is None
        and x.pending_pool is None
        and (x.height, x.width) == (1, 1)
    )


@method_rule("view", "reshape")
def _reshape_method(ctx, node, name, x, *shape) -> Any:
    where = ctx.where(node)
    if len(shape) == 1 and isinstance(shape[0], tuple | list | torch.Size):
        shape = tuple(shape[0])
    if isinstance(x, ChannelGroups):
        a = x.value
        if tuple(shape) in ((a.batch, a.channels, a.height, a.width), (-1, a.channels, a.height, a.width)):
            return a.permute_channels(x.order(), where)
        raise UnsupportedModelError(f"{where}: {name}{tuple(shape)} of channel groups (only back to (B, C, H, W))")
    if not _is_map(x):
        return getattr(x, name)(*shape)
    vector = _as_vector(x)
    if vector is not None and len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        b, c = _shape_of(vector)
        if shape[0] in (b, -1) and shape[1] in (c, -1) and (shape[0], shape[1]) != (-1, -1):
            return _vector_to_map(vector)
    a = as_affine(x, where)
    numel = a.channels * a.height * a.width
    if len(shape) == 2 and shape[0] in (a.batch, -1) and shape[1] in (-1, numel):
        return a.flatten()
    grouped = (
        len(shape) == 5
        and shape[0] in (a.batch, -1)
        and tuple(shape[3:]) == (a.height, a.width)
        and shape[1] > 0
        and shape[1] * shape[2] == a.channels
        and not (a.is_vector or a.flat_from is not None or a.pending_pool is not None)
    )
    if grouped:
        return ChannelGroups(a, int(shape[1]))
    raise UnsupportedModelError(
        f"{where}: {name}{tuple(shape)} of a feature map (supported: flattening, (B, groups, C/groups, H, W) "
        "for a channel shuffle, and a (B, C) vector to (B, C, 1, 1))"
    )


def _transpose(ctx, node, x, dim0, dim1) -> Any:
    if isinstance(x, ChannelGroups) and {dim0 % 5, dim1 % 5} == {1, 2}:
        return ChannelGroups(x.value, x.groups, not x.swapped)
    if _is_map(x) or isinstance(x, ChannelGroups):
        raise UnsupportedModelError(f"{ctx.where(node)}: transpose({dim0}, {dim1}) of a feature map")
    return torch.transpose(x, dim0, dim1)


@function_rule(torch.transpose)
def _transpose_function(ctx, node, fn, x, dim0, dim1) -> Any:
    return _transpose(ctx, node, x, dim0, dim1)


@method_rule("transpose")
def _transpose_method(ctx, node, name, x, dim0, dim1) -> Any:
    return _transpose(ctx, node, x, dim0, dim1)


def _channel_pieces(ctx, node, x, sizes: Callable[[int], list[int]], dim: int, what: str) -> Any:
    """A feature map cut along its channels into pieces of ``sizes(channels)``, each a channel slice."""
    where = ctx.where(node)
    a = as_affine(x, where)
    if dim % 4 != 1 or a.is_vector or a.flat_from is not None:
        raise UnsupportedModelError(f"{where}: {what} along dim {dim} of a feature map (only channels)")
    pieces, lo = [], 0
    for size in sizes(a.channels):
        pieces.append(a.channel_slice(lo, lo + size, where))
        lo += size
    return tuple(pieces)


@function_rule(torch.chunk)
@method_rule("chunk")
def _chunk(ctx, node, _op, x, chunks, dim=0) -> Any:
    if not _is_map(x):
        return torch.chunk(x, chunks, dim)

    def sizes(channels: int) -> list[int]:  # torch.chunk's rule: equal pieces, the last one smaller
        size = -(-channels // chunks)
        return [min(size, channels - lo) for lo in range(0, channels, size)]

    return _channel_pieces(ctx, node, x, sizes, dim, "chunk")


@function_rule(torch.split)
@method_rule("split")
def _split(ctx, node, _op, x, split_size_or_sections=None, dim=0, split_size=None) -> Any:
    if split_size_or_sections is None:  # Tensor.split names it split_size
        split_size_or_sections = split_size
    if not _is_map(x):
        return torch.split(x, split_size_or_sections, dim)

    def sizes(channels: int) -> list[int]:  # torch.split's rule: pieces of one size (the last smaller), or given
        if isinstance(split_size_or_sections, int):
            step = split_size_or_sections
            return [min(step, channels - lo) for lo in range(0, channels, step)]
        given = [int(s) for s in split_size_or_sections]
        if sum(given) != channels:
            raise UnsupportedModelError(
                f"{ctx.where(node)}: split sizes {given} do not add up to the map's {channels} channels"
            )
        return given

    return _channel_pieces(ctx, node, x, sizes, dim, "split")


@method_rule("size")
def _size_method(ctx, node, name, x, dim=None) -> Any:
    shape = _shape_of(x)
    return shape if dim is None else shape[dim]


@function_rule(getattr)
def _getattr_function(ctx, node, fn, x, attr) -> Any:
    if _is_map(x) and attr == "shape":
        return _shape_of(x)
    if _is_map(x):
        raise UnsupportedModelError(f"{ctx.where(node)}: attribute {attr!r} of a feature map")
    return getattr(x, attr)


@function_rule(operator.getitem)
def _getitem_function(ctx, node, fn, x, index) -> Any:
    if not _is_map(x):
        return x[index]
    where = ctx.where(node)
    if _as_vector(x) is not None and _adds_two_trailing_axes(index):
        return _vector_to_map(_as_vector(x))  # y[:, :, None, None]
    bundle = as_affine(x, where)
    c = bundle.channels
    picked = _channel_index(index, c)
    if picked is None or bundle.is_vector or bundle.flat_from is not None:
        raise UnsupportedModelError(
            f"{where}: indexing a feature map (supported: a channel range x[:, a:b], and one channel x[:, k] "
            "put back with unsqueeze(1), as torchvision's transform_input does)"
        )
    lo, hi, drops_dim = picked
    if drops_dim and not all(_unsqueezes_channel_dim(user) for user in node.users):
        raise UnsupportedModelError(
            f"{where}: x[:, {lo}] removes the channel dimension; only unsqueeze(1) may follow it"
        )
    return bundle.channel_slice(lo, hi, where)  # kept 4-D: the unsqueeze that follows restores nothing


def _adds_two_trailing_axes(index: Any) -> bool:
    """``[:, :, None, None]`` or ``[..., None, None]``."""
    if not isinstance(index, tuple) or len(index) not in (3, 4) or any(i is not None for i in index[-2:]):
        return False
    head = index[:-2]
    if len(head) == 1:
        return head[0] is Ellipsis
    return all(isinstance(i, slice) and i == slice(None) for i in head)


def _picks_one_channel(index: Any) -> bool:
    """``[:, k]``: one channel, its dimension dropped."""
    return isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int)


def _channel_index(index: Any, channels: int) -> tuple[int, int, bool] | None:
    """(lo, hi, dimension dropped) for ``[:, k]`` and ``[:, a:b]`` (steps of 1), else None."""
    if not isinstance(index, tuple) or len(index) != 2 or index[0] != slice(None):
        return None
    pick = index[1]
    if _picks_one_channel(index) and -channels <= pick < channels:
        k = pick % channels
        return k, k + 1, True
    if isinstance(pick, slice) and pick.step in (None, 1):
        lo, hi, _ = pick.indices(channels)
        return (lo, hi, False) if lo < hi else None
    return None


def _unsqueezes_channel_dim(node: fx.Node) -> bool:
    unsqueeze = (node.op == "call_function" and node.target is torch.unsqueeze) or (
        node.op == "call_method" and node.target == "unsqueeze"
    )
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return unsqueeze and dim == 1


def _unsqueeze(ctx, node, x, dim) -> Any:
    if not _is_map(x):
        return torch.unsqueeze(x, dim)
    if isinstance(x, VectorColumn) and dim in (2, 3, -1, -2):  # (B, C, 1) -> (B, C, 1, 1)
        return _vector_to_map(x.value)
    if _as_vector(x) is not None and dim in (2, -1):  # (B, C) -> (B, C, 1)
        return VectorColumn(_as_vector(x))
    source = node.args[0]
    picked = (  # x[:, k]: the channel dimension was dropped
        isinstance(source, fx.Node)
        and source.op == "call_function"
        and source.target is operator.getitem
        and _picks_one_channel(source.args[1])
    )
    if not picked or dim != 1:
        raise UnsupportedModelError(f"{ctx.where(node)}: unsqueeze({dim}) of a feature map")
    return x  # the channel picked by x[:, k], already held as a one-channel map


@function_rule(torch.unsqueeze)
def _unsqueeze_function(ctx, node, fn, x, dim) -> Any:
    return _unsqueeze(ctx, node, x, dim)


@method_rule("unsqueeze")
def _unsqueeze_method(ctx, node, name, x, dim) -> Any:
    return _unsqueeze(ctx, node, x, dim)


@function_rule(operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)
def _compare(ctx, node, fn, a, b) -> Any:
    """Comparisons of sizes (a ViT checks its input size with ``torch._assert(h == self.image_size)``)."""
    if _is_map(a) or _is_map(b):
        raise UnsupportedModelError(f"{ctx.where(node)}: comparison ({fn.__name__}) of a feature map")
    return fn(a, b)


@function_rule(torch._assert)
def _assert_function(ctx, node, fn, condition, message="") -> None:
    """The model's own check of its input (an image size): a failed one is the input's fault."""
    if _is_map(condition):
        raise UnsupportedModelError(f"{ctx.where(node)}: an assertion on a feature map")
    if not condition:  # a message formatted while tracing shows proxies, not this input's values
        said = f": {message}" if message and "Proxy(" not in str(message) else ""
        raise InputSizeError(f"{ctx.where(node)}: the model's own check of its input failed{said}")


@function_rule(operator.floordiv)  # shape arithmetic only
def _shape_arith(ctx, node, fn, a, b) -> Any:
    if _is_map(a) or _is_map(b):
        raise UnsupportedModelError(f"{ctx.where(node)}: {fn.__name__} on a feature map")
    return fn(a, b)


def _shape_of(x: Any) -> torch.Size:
    if isinstance(x, Source):
        return x.tensor.shape
    if isinstance(x, VectorColumn):
        return torch.Size((*_shape_of(x.value), 1))
    if isinstance(x, Broadcast):
        b, c = _shape_of(x.value)[:2]
        return torch.Size((b, c, x.height, x.width))
    if isinstance(x, ChannelGroups):
        a = x.value
        per = a.channels // x.groups
        middle = (per, x.groups) if x.swapped else (x.groups, per)
        return torch.Size((a.batch, *middle, a.height, a.width))
    if isinstance(x, Affine):
        if x.is_vector:
            return torch.Size((x.batch, x.channels))
        if x.flat_from is not None:
            return torch.Size((x.batch, math.prod(x.flat_from)))
        return torch.Size((x.batch, x.channels, x.height, x.width))
    return x.shape


def known_module_types() -> tuple[type, ...]:
    """Module classes with a rule (traced as leaves); read at trace time so late registrations count."""
    return tuple(MODULE_RULES)


def register_activation(*types: type[nn.Module]) -> None:
    """Declare module classes element-wise activations (PFV boundaries), applied by their own forward.

    For custom activations whose arithmetic the tracer cannot see through (a smooth stand-in for ReLU6,
    say). The caller vouches that the module is element-wise; SRD applies it exactly as the model does.
    """
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_activation takes nn.Module subclasses, got {t!r}")
        MODULE_RULES[t] = _activation_module


@dataclass(frozen=True)
class GateBranches:
    """Products whose one factor is a gate computed from the other (squeeze-excitation, spatial or split
    attention) through a branch that feeds nothing else: ``gates`` maps each product to its gate operand's
    index, ``native`` holds the branch's nodes. No relevance flows through a gate, so its branch is run as
    the model runs it, on plain tensors: any op may sit there (channel max, softmax, conv1d, ...), and its
    activations are no PFV maps of the decomposition."""

    gates: dict[fx.Node, int]
    native: frozenset[fx.Node]


_SOFTMAX = (F.softmax, torch.softmax, nn.Softmax)


def _is_shape_node(n: fx.Node) -> bool:
    """A size, or arithmetic on sizes: ints, computed by the rules (no map flows through them)."""
    if n.op == "call_method" and n.target in ("size", "dim"):
        return True
    if n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",):
        return True
    arithmetic = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub)
    inputs = n.all_input_nodes
    return n.op == "call_function" and n.target in arithmetic and bool(inputs) and all(map(_is_shape_node, inputs))


def _mixes(n: fx.Node, model: nn.Module) -> bool:
    """Pools positions or channels, or mixes channels (a convolution or a Linear layer)."""
    if _reduces(n, model) or _convolves(n, model):
        return True
    if n.op == "call_module":
        return isinstance(model.get_submodule(str(n.target)), nn.Linear | nn.Conv1d)
    return n.op == "call_function" and n.target in (F.linear, F.conv1d, torch.conv1d)


# Ops that move or pick a gate's values without computing new ones.
_REARRANGING_METHODS = _RESHAPING_METHODS | frozenset(
    {"transpose", "permute", "flatten", "squeeze", "contiguous", "split", "chunk"}
)
_REARRANGING_FUNCTIONS = (
    torch.unsqueeze,
    torch.reshape,
    torch.transpose,
    torch.permute,
    torch.flatten,
    torch.squeeze,
    torch.split,
    torch.chunk,
    operator.getitem,
)


_SCALINGS = (operator.truediv, operator.mul, operator.add, operator.sub)


def _is_gate_root(n: fx.Node, model: nn.Module) -> bool:
    """A PFV map of gates: an activation's output (sigmoid, hard sigmoid, ...) or a softmax (split attention),
    possibly rearranged (reshaped, transposed, split, indexed) on its way to the product, or scaled or shifted
    by a number (the hard sigmoid of MobileNetV3 ports, ``F.relu6(x + 3) / 6``)."""
    while n.args and isinstance(n.args[0], fx.Node):
        rearranged = (n.op == "call_method" and n.target in _REARRANGING_METHODS) or (
            n.op == "call_function" and n.target in _REARRANGING_FUNCTIONS
        )
        scaled = n.op == "call_function" and n.target in _SCALINGS and isinstance(n.args[1], int | float)
        if not (rearranged or scaled):
            break
        n = n.args[0]
    module = model.get_submodule(str(n.target)) if n.op == "call_module" else None
    if is_activation(n, module):
        return True
    if module is not None:
        return isinstance(module, nn.Softmax)
    return (n.op == "call_function" and n.target in _SOFTMAX) or (n.op == "call_method" and n.target == "softmax")


def gate_branches(graph: fx.Graph, model: nn.Module) -> GateBranches:
    """Find every product ``x * g`` whose gate ``g`` is a PFV map computed from ``x`` through a pooling or a
    channel mixing, by a branch whose nodes (shape arithmetic aside) feed only that gate."""
    descendants: dict[fx.Node, set[fx.Node]] = {}

    def computed_from(n: fx.Node, main: fx.Node) -> bool:
        if main not in descendants:
            seen: set[fx.Node] = set()
            stack = list(main.users)
            while stack:
                u = stack.pop()
                if u not in seen:
                    seen.add(u)
                    stack.extend(u.users)
            descendants[main] = seen
        return n in descendants[main]

    candidates: dict[fx.Node, tuple[int, set[fx.Node]]] = {}  # product -> (gate operand index, branch)
    for node in graph.nodes:
        products = (node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS) or (
            node.op == "call_method" and node.target in _PRODUCT_METHODS
        )
        if not products or len(node.args) < 2:
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            continue
        if _is_shape_node(a) or _is_shape_node(b):
            continue
        for which, main, gate in ((1, a, b), (0, b, a)):
            branch: set[fx.Node] = set()
            stack = [gate]
            while stack:
                n = stack.pop()
                if n is main or n in branch or _is_shape_node(n) or not computed_from(n, main):
                    continue
                branch.add(n)
                stack.extend(n.all_input_nodes)
            mixed = any(_mixes(n, model) for n in branch)
            if gate in branch and mixed and _is_gate_root(gate, model):
                candidates[node] = (which, branch)
                break
    # Branches may share nodes (split attention: one softmax gates every split): keep the products whose
    # branch nodes feed only branches and gate operands, dropping the others until that holds.
    while True:
        native = set().union(*(branch for _, branch in candidates.values()))
        operands: dict[fx.Node, set[fx.Node]] = {}
        for node, (which, _) in candidates.items():
            operands.setdefault(node.args[which], set()).add(node)
        failing = [
            node
            for node, (which, branch) in candidates.items()
            if node in native
            or node.args[1 - which] in native
            or any(u not in native and u not in operands.get(n, ()) for n in branch for u in n.users)
        ]
        if not failing:
            break
        for node in failing:
            del candidates[node]
    return GateBranches({node: which for node, (which, _) in candidates.items()}, frozenset(native))


def is_activation(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return module is not None and MODULE_RULES.get(_type_for(module)) is _activation_module
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def _type_for(module: nn.Module) -> type | None:
    from ierf.srd.graph import rule_type

    return rule_type(module, known_module_types())


# What each rule does with a map whose uneven adaptive pooling is pending (see _read_by_flatten_then_linear):
# flatten passes it on, Linear folds it into its weight, shape queries read only the pooled shape, and
# identities (eval-mode dropout, nn.Identity, contiguous) hand the very same value on.
for _rule, _role in (
    (_identity_module, "pass"),
    (_dropout_function, "pass"),
    (_identity_method, "pass"),
    (_flatten_module, "flatten"),
    (_flatten_function, "flatten"),
    (_flatten_method, "flatten"),
    (_reshape_method, "flatten"),
    (_linear_module, "linear"),
    (_linear_function, "linear"),
    (_size_method, "shape"),
    (_getattr_function, "shape"),
):
    _rule.pending_pool_role = _role
