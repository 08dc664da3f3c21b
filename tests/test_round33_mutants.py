"""Mutation round 33 on ``ierf.srd.rules`` outside the gate code: ``_pair``, activations, convolution padding,
convolutions and linear layers, batch-norm folds, max and average pooling, adaptive and global means,
identities, padding, sums and differences, concatenation, flatten, squeeze and reshape heads, and the loud
refusals of spellings the rules do not model.

Each test fails on a plausible slip that the suite let through. Spellings the rules accept must decompose the
model's own function (logits equal to the model's) and give the float64 reference's maps; spellings that
compute something else must be refused, naming what is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.errors import UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference
from torch import nn

Op = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class _Spelled(nn.Module):
    """conv -> ReLU -> ``op`` -> (global mean of a map) -> linear: ``op`` is the spelling under test; it may
    use ``conv2`` (4 -> 4 channels, 3x3), ``conv3`` (4 -> 4, 2x2, no padding), ``conv1`` (1x1), ``conv8``
    (8 -> 4, 1x1), ``maxpool`` and ``act``."""

    def __init__(self, op: Op, features: int = 4, bn: nn.Module | None = None, flat: bool = False) -> None:
        super().__init__()
        self.flat = flat  # whether ``op`` already gives (B, features) vectors
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 2)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv8 = nn.Conv2d(8, 4, 1)
        self.maxpool = nn.MaxPool2d(2, (2, 1), 1, (1, 2), ceil_mode=True)
        self.bn = bn if bn is not None else nn.Identity()
        self.act = nn.ReLU()
        self.op = op
        self.fc = nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.op(self, self.act(self.conv(x)))
        return self.fc(z if self.flat else z.mean((2, 3)))


def _model(op: Op, features: int = 4, bn: nn.Module | None = None, flat: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _Spelled(op, features, bn, flat).double().eval()


def _assert_exact(model: nn.Module, hw: tuple[int, int] = (7, 9), seed: int = 1) -> None:
    """The decomposed logits are the model's and the maps the float64 reference's (targets 0 and 2)."""
    x = _x((1, 3, *hw), seed)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-10, rtol=1e-10)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-8)


# ---- spellings the rules accept: the model's own function, the reference's maps -----------------------------
ACCEPTED: dict[str, tuple[Op, int]] = {
    # U01/U02: a (height, width) pair read as (height, height) or swapped
    "conv_pairs": (lambda m, a: m.act(F.conv2d(a, m.conv2.weight, m.conv2.bias, (1, 2), (2, 1), (2, 1))), 4),
    "avg_pool_pairs": (lambda m, a: m.act(m.conv3(F.avg_pool2d(a, (3, 2), (2, 1), (1, 0)))), 4),
    # U13/U14/U15: padding="same" with a dilated even kernel, different dilations per axis
    "same_dilated": (
        lambda m, a: m.act(F.conv2d(a, m.conv3.weight, m.conv3.bias, 1, "same", (1, 2))),
        4,
    ),
    "same_dilated_tall": (
        lambda m, a: m.act(F.conv2d(a, m.conv3.weight, m.conv3.bias, 1, "same", (3, 1))),
        4,
    ),
    # U16: padding="valid"
    "valid": (lambda m, a: m.act(F.conv2d(a, m.conv2.weight, m.conv2.bias, padding="valid")), 4),
    # U18: an (h, w) padding of a module convolution
    "conv_padding_pair": (lambda m, a: m.act(F.conv2d(a, m.conv2.weight, m.conv2.bias, 1, (2, 0))), 4),
    # U19/U20: a grouped, strided, dilated functional convolution
    "grouped_functional": (
        lambda m, a: m.act(F.conv2d(a, m.conv2.weight[:, :2], m.conv2.bias, 2, 1, 1, 2)),
        4,
    ),
    "strided_not_dilated": (lambda m, a: m.act(F.conv2d(a, m.conv2.weight, None, 2, 2, 2)), 4),
    # U24: F.linear with a bias, on pooled features
    "functional_linear": (lambda m, a: m.act(F.linear(a.mean((2, 3)), m.conv1.weight[:, :, 0, 0], m.conv1.bias)), 4),
    # U22: F.conv2d with its defaults (no padding)
    "conv_defaults": (lambda m, a: m.act(F.conv2d(a, m.conv3.weight)), 4),
    # an eval-mode rrelu is the leaky ReLU of slope (lower + upper) / 2
    "rrelu_eval": (lambda m, a: F.rrelu(m.conv2(a), 0.1, 0.7), 4),
    # U11/U12: activations written as tensor methods
    "tanh_method": (lambda m, a: m.conv2(a).tanh(), 4),
    "sigmoid_method": (lambda m, a: m.conv2(a).sigmoid(), 4),
    # U43/U44: an average pool with no padding leaves none out of the count
    "avg_pool_no_padding_excluded": (
        lambda m, a: m.act(m.conv3(F.avg_pool2d(a, 2, 1, 0, count_include_pad=False))),
        4,
    ),
    # U46: average padding along the height only (counted in)
    "avg_pool_row_padding": (lambda m, a: m.act(m.conv3(F.avg_pool2d(a, 3, 1, (1, 0)))), 4),
    # U48: F.avg_pool2d's count_include_pad defaults to True
    "avg_pool_padding_default": (lambda m, a: m.act(m.conv3(F.avg_pool2d(a, 3, 1, 1))), 4),
    # U49/U51: adaptive pooling to (None, k) and to a non-square even grid
    "adaptive_none_height": (lambda m, a: m.act(m.conv3(F.adaptive_avg_pool2d(a, (None, 3)))), 4),
    "adaptive_non_square": (lambda m, a: m.act(m.conv1(F.adaptive_avg_pool2d(m.act(m.conv2(a)), (3, 2)))), 4),
    # U55: a keepdim mean is a 1x1 map, flattened afterwards
    "mean_keepdim": (lambda m, a: torch.flatten(m.act(m.conv1(torch.mean(a, (2, 3), keepdim=True))), 1), 4),
    "mean_flat": (lambda m, a: torch.mean(m.act(m.conv2(a)), (2, 3)), 4),
    # U74/U75/U76/U77/U78: differences, negations and constants added
    "map_minus_constant": (lambda m, a: m.act(m.conv2(a) - 0.75), 4),
    "map_minus_map": (lambda m, a: m.act(m.conv2(a) - m.conv3(F.pad(a, (0, 1, 0, 1)))), 4),
    "negated": (lambda m, a: m.act(-m.conv2(a)), 4),
    "negated_method": (lambda m, a: m.act(m.conv2(a).neg() + 0.5), 4),
    # U79: a map divided by a number
    "divided": (lambda m, a: m.act(m.conv2(a) / 4.0), 4),
    # U82/U83: concatenation along dim -3 of maps, and along dim -1 of vectors
    "cat_minus_three": (lambda m, a: m.act(torch.cat([m.conv2(a), a], -3)), 8),
    "cat_vectors": (lambda m, a: torch.cat([m.conv2(a).mean((2, 3)), a.mean((2, 3))], -1), 8),
    # U38: a ceil-mode max pool of a channel concatenation of maps (SqueezeNet's Fire modules)
    "max_pool_of_concat_ceil": (
        lambda m, a: m.act(m.conv8(F.max_pool2d(torch.cat([m.act(m.conv2(a)), a], 1), 2, ceil_mode=True))),
        4,
    ),
    # U40: a ceil-mode max pool of an earlier max pool's paths
    "max_pool_of_max_pool_ceil": (
        lambda m, a: m.act(m.conv1(F.max_pool2d(F.max_pool2d(a, 3, 1), 2, ceil_mode=True))),
        4,
    ),
    # U37/U41: a dilated ceil-mode max pool module (inside a stage: an exact head that reads its PFVs unevenly
    # shares its bias unlike the reference, README Limits)
    "max_pool_module_dilated_ceil": (lambda m, a: m.act(m.conv1(m.maxpool(a))), 4),
    # U94: chunk of 4 channels into 3 pieces is 2 + 2
    "chunk_three": (lambda m, a: torch.cat(m.act(m.conv2(a)).chunk(3, 1)[::-1], 1), 4),
    # U35: an empty stride is the kernel (torch's own default for torch.max_pool2d)
    "max_pool_empty_stride": (lambda m, a: m.act(m.conv1(F.max_pool2d(a, 2, []))), 4),
    # torch.max_pool2d, the aten spelling the rule also registers (the float64 reference took it for a plain
    # function, with no winner routing, until round 33b)
    "max_pool_aten_spelling": (lambda m, a: m.act(m.conv1(torch.max_pool2d(a, (2, 3), (2, 1), 1))), 4),
    # U73: a difference of constants with alpha (shape or parameter arithmetic) is torch's a - alpha * b
    "constant_difference_alpha": (
        lambda m, a: m.act(m.conv2(a) + torch.sub(m.conv2.bias, m.conv1.bias, alpha=2).view(1, -1, 1, 1)),
        4,
    ),
    # U56: torch.mean over (2, 3) without keepdim gives (B, C) vectors (cat along -1 is their channel dim)
    "cat_mean_function_vectors": (
        lambda m, a: torch.cat([torch.mean(m.conv2(a), (2, 3)), torch.mean(a, (2, 3))], -1),
        8,
    ),
}


FLAT = {"mean_keepdim", "mean_flat", "cat_vectors", "functional_linear", "cat_mean_function_vectors"}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_spellings_are_the_models_function_and_match_the_reference(name: str) -> None:
    """U01 U02 U11 U12 U13 U14 U15 U16 U18 U19 U20 U22 U24 U35 U37 U38 U40 U41 U43 U44 U46 U48 U49 U51 U55
    U56 U73 U74 U75 U76 U77 U78 U79 U82 U83 U94: every rule's arithmetic read off its arguments (pairs, defaults,
    paddings, dilations, divisors, signs, dims) as torch reads them; a slip changes the logits or the maps."""
    op, features = ACCEPTED[name]
    _assert_exact(_model(op, features, flat=name in FLAT), (6, 8) if name == "adaptive_non_square" else (7, 9))


# ---- batch-norm folds ------------------------------------------------------------------------------------
def _bn(small_var: bool = True) -> nn.BatchNorm2d:
    """A batch norm with random affine parameters and running statistics; small variances make eps count."""
    bn = nn.BatchNorm2d(4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(4, generator=g))
        bn.running_mean.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) * (0.01 if small_var else 1.0) + 0.002)
    return bn


def _functional_bn(m: nn.Module, z: torch.Tensor, *args: object) -> torch.Tensor:
    return F.batch_norm(z, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, *args)


BATCH_NORMS: dict[str, Op] = {
    # F.batch_norm with running statistics near eps (U32, its default eps, is equivalent: torch.fx records every
    # argument of F.batch_norm as a keyword, so the rule's default is never read)
    "functional_default_eps": lambda m, a: m.act(_functional_bn(m, m.conv2(a))),
    # U29: the same statistics folded with two eps values are two folds
    "same_statistics_two_eps": lambda m, a: m.act(
        _functional_bn(m, m.conv2(m.act(_functional_bn(m, m.conv2(a), False, 0.1, 1e-5))), False, 0.1, 0.05)
    ),
    "module": lambda m, a: m.act(m.bn(m.conv2(a))),
}


@pytest.mark.parametrize("name", list(BATCH_NORMS))
def test_batch_norm_folds_are_the_models_function_and_match_the_reference(name: str) -> None:
    """U25 U26 U27 U28 U29: eps in the scale and the shift, the weight and bias of the fold, and a fold cached
    per eps: with variances near eps, any of these changes the logits."""
    _assert_exact(_model(BATCH_NORMS[name], bn=_bn()))


# ---- spellings the rules must refuse ---------------------------------------------------------------------
def _stochastic_depth(a: torch.Tensor, *args: object) -> torch.Tensor:
    """torchvision's function, read off its own module: torch.fx wraps it there (a leaf of the trace)."""
    return importlib.import_module("torchvision.ops.stochastic_depth").stochastic_depth(a, *args)


REFUSED: dict[str, tuple[Op, type[Exception], str]] = {
    # U08
    "rrelu_training": (
        lambda m, a: F.rrelu(m.conv2(a), training=True),
        UnsupportedModelError,
        r"rrelu with training=True",
    ),
    # U31
    "functional_bn_training": (
        lambda m, a: m.act(_functional_bn(m, m.conv2(a), True)),
        ValueError,
        r"F.batch_norm called with training=True",
    ),
    # U33: a batch norm that keeps no running statistics normalises by the batch's own, even in eval mode
    "batch_norm_without_running_statistics": (
        lambda m, a: m.act(m.nostats(m.conv2(a))),
        UnsupportedModelError,
        r"batch norm without running statistics",
    ),
    # U34: the winners' indices are a value SRD does not track (a max unpool reads them); F.max_pool2d with
    # return_indices=True is traced as max_pool2d_with_indices, which has no rule at all
    "max_pool_return_indices": (
        lambda m, a: m.max_with_indices(a)[0],
        UnsupportedModelError,
        r"max pooling with return_indices",
    ),
    # U42 U47: the module spelling of a ceil-mode average pool
    "avg_pool_module_ceil_mode": (lambda m, a: m.pool(a), UnsupportedModelError, r"ceil_mode"),
    # U43
    "avg_pool_divisor_override": (
        lambda m, a: F.avg_pool2d(a, 2, divisor_override=3),
        UnsupportedModelError,
        r"divisor_override",
    ),
    # U50 U52: an uneven adaptive pooling read by anything but a flatten and a Linear
    "adaptive_uneven_width": (
        lambda m, a: F.adaptive_avg_pool2d(a, (7, 4)),
        UnsupportedModelError,
        r"from 7x9 to 7x4 has uneven windows",
    ),
    # U57
    "mean_of_everything": (lambda m, a: a.mean((2, 3)) + a.mean(), UnsupportedModelError, r"mean over every dimension"),
    # U59
    "dropout_training": (lambda m, a: F.dropout(a, 0.5, True), ValueError, r"dropout called with training=True"),
    # U60 U61
    "stochastic_depth_training": (
        lambda m, a: _stochastic_depth(a, 0.5, "row", True),
        ValueError,
        r"stochastic depth called with training=True",
    ),
    "stochastic_depth_default_training": (
        lambda m, a: _stochastic_depth(a, 0.5, "row"),
        ValueError,
        r"stochastic depth called with training=True",
    ),
    # U64 U70
    "constant_pad_module": (lambda m, a: m.pad(a), UnsupportedModelError, r"padding with the constant 0.5"),
    # U69
    "pad_with_value": (lambda m, a: F.pad(a, (1, 1, 1, 1), value=0.5), UnsupportedModelError, r"constant 0.5"),
    # U67
    "negative_pad": (lambda m, a: F.pad(a, (-1, 0, 0, 0)), UnsupportedModelError, r"non-negative"),
    # U68
    "reflect_pad": (lambda m, a: F.pad(a, (1, 1, 1, 1), mode="reflect"), UnsupportedModelError, r"mode 'reflect'"),
    # U80
    "divided_by_a_map": (
        lambda m, a: a / (m.act(m.conv2(a)) + 1.0),
        UnsupportedModelError,
        r"division by a feature map",
    ),
    # U84 U85 U86 U87
    "flatten_batch": (lambda m, a: torch.flatten(a, 0).view(1, -1)[:, :4], UnsupportedModelError, r"flatten\(0, -1\)"),
    "flatten_default": (lambda m, a: torch.flatten(a).view(1, -1)[:, :4], UnsupportedModelError, r"flatten\(0, -1\)"),
    "flatten_method_default": (lambda m, a: a.flatten().view(1, -1)[:, :4], UnsupportedModelError, r"flatten\(0, -1\)"),
    "flatten_two_dims": (lambda m, a: a.flatten(1, 2)[:, :4, 0], UnsupportedModelError, r"flatten\(1, 2\)"),
    # U88: squeeze(-1) then squeeze(1) is not squeeze(-1).squeeze(-1)
    "squeeze_then_channel_squeeze": (
        lambda m, a: a.mean((2, 3), keepdim=True).squeeze(-1).squeeze(1)[:, :, 0],
        UnsupportedModelError,
        r"squeeze\(-1\)",
    ),
    # U96
    "chunk_of_rows": (lambda m, a: torch.cat(a.chunk(2, 2)[::-1], 2), UnsupportedModelError, r"chunk along dim 2"),
    # U17: a padding string torch does not know (torch refuses to run it; SRD must not explain it unpadded)
    "unknown_padding_string": (
        lambda m, a: m.act(F.conv2d(a, m.conv2.weight, None, 1, "SAME")),
        UnsupportedModelError,
        r"unknown padding 'SAME'",
    ),
    # U53: an uneven adaptive pooling read by a flatten and a Linear, and also by a mean
    "uneven_adaptive_read_twice": (
        lambda m, a: (lambda p: m.lin(torch.flatten(p, 1)) + p.mean((2, 3)))(F.adaptive_avg_pool2d(a, (2, 2))),
        UnsupportedModelError,
        r"from 7x9 to 2x2 has uneven windows",
    ),
    # U63: Normalize with one mean per channel but a wrong number of stds
    "normalize_std_count": (lambda m, a: m.norm(a), UnsupportedModelError, r"Normalize with 4 means and 2 stds"),
    # U90: squeezing (2, 3) of a 1xW map removes the height only
    "squeeze_row_map": (
        lambda m, a: F.avg_pool2d(a, (7, 1)).squeeze((2, 3)).mean(-1),
        UnsupportedModelError,
        r"squeeze\(\(2, 3\)\) of a 1x4x1x9 map",
    ),
    # U97 U98: an empty channel range, and a range of a flattened map's features, are not channel slices
    "empty_channel_range": (lambda m, a: a[:, 3:1], UnsupportedModelError, r"indexing a feature map \(supported"),
    "flattened_features_range": (
        lambda m, a: a.flatten(1)[:, :4],
        UnsupportedModelError,
        r"indexing a feature map \(supported",
    ),
}

FLAT_REFUSED = {
    "mean_of_everything",
    "flatten_batch",
    "flatten_default",
    "flatten_method_default",
    "flatten_two_dims",
    "squeeze_then_channel_squeeze",
    "uneven_adaptive_read_twice",
    "flattened_features_range",
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_spellings_the_rules_do_not_model_are_refused_by_name(name: str) -> None:
    """U08 U17 U31 U33 U34 U42 U43 U47 U50 U52 U53 U57 U59 U60 U61 U63 U64 U67 U68 U69 U70 U80
    U84 U85 U86 U87 U88 U90 U96 U97 U98: random or training-mode ops, unknown padding strings, pools with
    another divisor, uneven adaptive windows read by more than a flatten and a Linear, Normalize with a wrong
    count of stds, non-zero and negative padding, division by a map, flattening the batch, and squeezes,
    chunks and indexes of other dims are refused, naming what (decomposing them as the plain op would explain
    another function)."""
    op, error, message = REFUSED[name]
    model = _model(op, flat=name in FLAT_REFUSED, bn=_bn())
    model.pad, model.pool = nn.ConstantPad2d(1, 0.5), nn.AvgPool2d(2, ceil_mode=True)
    model.nostats = nn.BatchNorm2d(4, track_running_stats=False).double().eval()
    model.max_with_indices = nn.MaxPool2d(2, return_indices=True)
    from torchvision.transforms import Normalize

    model.norm = Normalize((0.1, 0.2, 0.3, 0.4), (0.5, 0.6)).eval()  # 4 means, 2 stds
    model.lin = nn.Linear(16, 4).double()
    with pytest.raises(error, match=message):
        ierf.SRD(model, head="exact").decompose(_x((1, 3, 7, 9), 1))


@pytest.mark.parametrize(
    "relu",
    [torch.relu_, F.relu_, lambda z: z.relu_()],
    ids=["torch.relu_", "F.relu_", "method"],
)
def test_in_place_relu_functions_keep_maps_differentiable(relu: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """U07: ``torch.relu_``/``F.relu_`` on a pre-activation in the autograd graph must run out of place
    (in place, they overwrite what the backward pass of the stage's ratios needs)."""
    model = _model(lambda m, a: relu(m.conv2(a)))
    x = _x((1, 3, 6, 7), seed=5).requires_grad_(True)
    saliency = ierf.SRD(model, head="exact").saliency(x, 1)
    (grad,) = torch.autograd.grad(saliency.square().sum(), x)
    assert bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)


class _Normalized(nn.Module):
    """torchvision's Normalize inside the model: on the input (a wrapped model's own preprocessing) and on a map."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.transforms import Normalize

        self.norm = Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.norm2 = Normalize((0.1, -0.2, 0.3, 0.0), (0.5, 1.5, 2.0, 0.7))
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.conv(self.norm(x)))
        return self.fc(self.act(self.conv2(self.norm2(z))).mean((2, 3)))


def test_normalize_inside_the_model_is_its_own_function() -> None:
    """U62: Normalize is ``(x - mean) / std``; a shift of ``-mean`` alone (not divided by std) decomposes
    another function, so the decomposed logits would not be the model's."""
    torch.manual_seed(0)
    model = _Normalized().double().eval()
    x = _x((2, 3, 7, 9), 3)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-10, rtol=1e-10)
    maps = dec.saliency(1)
    torch.testing.assert_close(maps.double().sum((1, 2)), model(x)[:, 1], atol=1e-5, rtol=1e-5)  # conservation


@pytest.mark.parametrize("shape", [(2, -1), (-1, 126)], ids=["two_rows", "rows_of_half"])
def test_views_that_move_features_into_the_batch_are_refused(shape: tuple[int, int]) -> None:
    """U92 U93: a 2-D view is a flatten only when it keeps the batch and every feature of an image in one
    row; (2, -1) or (-1, C*H*W/2) of one image makes two rows (two logit rows), which SRD must not read as one."""
    model = _model(lambda m, a: a.view(*shape), 126, flat=True)
    with pytest.raises(UnsupportedModelError, match=rf"view\({shape[0]}, {shape[1]}\) of a feature map"):
        ierf.SRD(model, head="exact").decompose(_x((1, 3, 7, 9), 1))
