"""Mutation round 36 on ``ierf.srd.reference``, the float64 per-tap oracle the fast engine is compared with.

A slip in the reference that every comparison misses makes the oracle blind on that branch: the fast engine
could then be wrong there too and the suite would still pass. Each test here reaches a branch of the reference
that no earlier comparison reached (a batch norm on vectors, a functional layer's bias given as a keyword,
in-place constants, asymmetric max-pool geometry, an all-zero pre-activation, the reference's own saliency),
and checks it against the fast engine (they must agree), against the model's logits, or against an SRD
invariant (ratios summing to one per PFV, conservation).

The round also found three spellings the rules accept but the oracle or the rules got wrong: torchvision's
Normalize in front of a model and ``torch.subtract`` / ``.subtract`` with a constant (the reference ran the
shift on every path: ratios not summing to one, maps 50x off), and a max or average pool with ``stride=()``
(torch's default, the kernel; the rules raised a bare IndexError).
"""

from __future__ import annotations

from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference, randomise_bn
from torch import nn
from torchvision.transforms import Normalize
from torchvision.transforms.v2 import Normalize as NormalizeV2

Op = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class _Spelled(nn.Module):
    """conv -> ReLU -> ``op`` -> global mean (unless ``op`` gives vectors) -> linear; ``op`` may use ``conv2``
    (4 -> 4, 3x3, padded), ``conv1`` (4 -> 4, 1x1), ``lin`` (4 -> 4), ``bn`` (2-D) and ``bn1`` (1-D)."""

    def __init__(self, op: Op, flat: bool) -> None:
        super().__init__()
        self.flat = flat
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm2d(4)
        self.bn1 = nn.BatchNorm1d(4)
        self.act = nn.ReLU()
        self.op = op
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.op(self, self.act(self.conv(x)))
        return self.fc(z if self.flat else z.mean((2, 3)))


def _model(op: Op, flat: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(_Spelled(op, flat), seed=4).double().eval()


def _assert_reference_is_the_engine(model: nn.Module, x: torch.Tensor) -> dict:
    """The decomposed logits are the model's, the reference's ratios sum to one per carried PFV, and its maps
    are the fast engine's (targets 0 and 2)."""
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-10, rtol=1e-10)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    for stage in dec_ref["stages"]:
        total = sum(mu.sum(0) for mus in stage.ratios.values() for mu in mus)
        # a PFV whose contributors all carry nothing (z is a bias alone, or zero) has ratios 0 (spec §9.2)
        carried = total != 0
        assert float(carried.double().mean()) > 0.5
        torch.testing.assert_close(total[carried], torch.ones_like(total[carried]), atol=1e-9, rtol=0)
    assert_matches_reference(dec, ref, dec_ref, (0, 2), 1e-8)
    return dec_ref


SPELLINGS: dict[str, tuple[Op, bool]] = {
    # R01 R10: a batch norm on vectors (BatchNorm1d after a Linear): its shift is a bias of its own
    "batch_norm_1d": (lambda m, a: m.act(m.bn1(m.lin(a.mean((2, 3))))), True),
    # R19: F.batch_norm, whose weight and bias torch.fx records as keywords
    "functional_batch_norm": (
        lambda m, a: m.act(F.batch_norm(m.conv2(a), m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias)),
        False,
    ),
    # R19: F.linear with its bias given as a keyword
    "functional_linear_bias_keyword": (
        lambda m, a: m.act(F.linear(a.mean((2, 3)), m.lin.weight, bias=m.lin.bias)),
        True,
    ),
    # R09: torch.add of a map and a number (a constant bias)
    "torch_add_constant": (lambda m, a: m.act(torch.add(m.conv2(a), 0.5)), False),
    # R07: torch.sub of a number and a map
    "torch_sub_from_constant": (lambda m, a: m.act(torch.sub(0.5, m.conv2(a))), False),
    # torch.subtract and .subtract, spellings of the rules the reference did not know as differences with a
    # constant until round 36: the constant then rode on every path and its ratios did not sum to one
    "torch_subtract_constant": (lambda m, a: m.act(torch.subtract(m.conv2(a), 0.5)), False),
    "subtract_method_constant": (lambda m, a: m.act(m.conv2(a).subtract(0.5)), False),
    # R20: in-place methods adding and subtracting constants on a map
    "in_place_constants": (lambda m, a: m.act(m.conv2(a).add_(0.5).sub_(0.25)), False),
    # R33 R34: an in-place activation, as a function and as a method, must leave the pre-activation z as it was
    "relu_in_place_function": (lambda m, a: torch.relu_(m.conv2(a)), False),
    "relu_in_place_method": (lambda m, a: m.conv2(a).relu_(), False),
    # R28 R29 R31 R35 R36 R37 R38 R39 R40 R41: a max pool whose kernel, stride, padding and dilation differ per axis
    "max_pool_asymmetric": (lambda m, a: m.act(m.conv1(F.max_pool2d(a, (3, 2), (2, 1), (1, 0), (1, 2)))), False),
    # the same through torch.max_pool2d, whose arguments torch.fx records positionally, in ceil mode
    "max_pool_asymmetric_aten": (
        lambda m, a: m.act(m.conv1(torch.max_pool2d(a, (2, 3), (1, 2), (0, 1), (2, 1), True))),
        False,
    ),
    # torch reads an empty stride, [] or (), as the kernel; the rules knew only [] and raised a bare IndexError on ()
    # until round 36 (the reference, R27, knew both)
    "max_pool_empty_tuple_stride": (lambda m, a: m.act(m.conv1(torch.max_pool2d(a, 2, ()))), False),
    "avg_pool_empty_tuple_stride": (lambda m, a: m.act(m.conv1(F.avg_pool2d(a, 2, ()))), False),
    # R65: a constant expanded as a map (``bias.view(1, -1, 1, 1).expand_as(a)``) stays a constant: a bias
    "constant_expanded_as_map": (
        lambda m, a: m.act(m.conv2(a) + m.conv1.bias.view(1, -1, 1, 1).expand_as(a)),
        False,
    ),
    # R64: a tensor the forward creates (``torch.tensor(...)``), kept by the program, not by the model
    "tensor_made_in_forward": (
        lambda m, a: m.act(m.conv2(a) + torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float64).view(1, -1, 1, 1)),
        False,
    ),
    # R54: a global max pool whose kernel is the map's size, read in forward
    "global_max_pool_from_shape": (lambda m, a: m.act(m.conv1(F.max_pool2d(a, a.shape[2:]))), False),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_the_reference_reaches_each_spelling_and_agrees_with_the_engine(name: str) -> None:
    """R01 R05 R06 R07 R09 R10 R18 R19 R20 R22 R23 R27 R28 R29 R31 R33 R34 R35 R36 R37 R38 R39 R40 R41 R54 R64
    R65 R68 R69: spellings the rules
    accept but no earlier comparison gave the reference; a slip there (a bias that rides on every path, a pool
    offset on the wrong axis, a stride read as ()) changes the reference's maps, which then differ from the
    engine's. Also the round-36 defects: torch.subtract and ``.subtract`` (reference) and a stride of ()
    (rules)."""
    op, flat = SPELLINGS[name]
    _assert_reference_is_the_engine(_model(op, flat), _x((1, 3, 7, 9), 1))


class _InputBatchView(nn.Module):
    """A head that flattens by the model input's batch size, ``h.view(x.size(0), -1)`` or
    ``h.view(x.shape[0], -1)``, two stages above x."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 3 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(self.act(self.conv(x))))
        return self.fc(h.view(x.size(0) if self.spelling == "size" else x.shape[0], -1))


@pytest.mark.parametrize("spelling", ["size", "shape"])
def test_a_size_read_off_the_model_input_is_the_batch_of_each_run(spelling: str) -> None:
    """R67 R71: the reference runs a stage on a batch of one-hot inputs; a size read off the model's input further
    down (``x.size(0)``) must be that batch's, or the head's view folds the batch into the features."""
    torch.manual_seed(0)
    _assert_reference_is_the_engine(_InputBatchView(spelling).double().eval(), _x((1, 3, 7, 9), 6))


class _SharedGate(nn.Module):
    """A squeeze-excitation gate that also feeds the head: its branch is no gate-only branch, so the gate is a
    PFV map of the decomposition, frozen on every path through the product (the reference finds it itself)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.squeeze = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        if self.spelling == "biased_operand":  # a constant added before the product: a bias scaled by the gate
            a = a + 0.5
        g = torch.sigmoid(self.squeeze(a.mean((2, 3), keepdim=True)))
        if self.spelling == "biased_operand":
            h = a * g
        else:
            h = torch.mul(a, g) if self.spelling == "torch_mul" else a.multiply(g)
        return self.fc(self.act(self.conv2(h)).mean((2, 3)) + g.flatten(1))


@pytest.mark.parametrize("spelling", ["torch_mul", "multiply_method", "biased_operand"])
def test_a_gate_that_also_feeds_the_head_is_frozen_in_the_reference(spelling: str) -> None:
    """R44 R45 R50: the reference's own gate test (for gates outside a gate-only branch) must know every product
    spelling the rules take, torch.mul and ``.multiply`` too, or it runs a path through the gate; and a bias
    measured before the product is scaled by the gate as it is, not by a zeroed one."""
    torch.manual_seed(0)
    _assert_reference_is_the_engine(_SharedGate(spelling).double().eval(), _x((1, 3, 6, 7), 2))


def test_a_head_with_two_biases_gives_the_reference_both() -> None:
    """R60 R63: a 1x1 convolution's bias and the classifier's bias both reach the logits in the head's stage (no
    activation between them): the reference's head bias is their sum, and its map conserves the logit."""
    model = _model(lambda m, a: m.conv1(a))
    x = _x((1, 3, 7, 9), 2)
    dec_ref = _assert_reference_is_the_engine(model, x)
    ref = ReferenceSRD(model)
    with torch.no_grad():
        logits = model(x)[0]
    for target in (0, 2):
        torch.testing.assert_close(ref.saliency(x, target).sum(), logits[target], atol=1e-9, rtol=1e-9)
    assert dec_ref["head_bias"].shape == (3,)


def test_an_all_zero_pre_activation_has_no_sharing_ratios() -> None:
    """R58: a PFV whose pre-activation is exactly zero (a bias-free convolution over a zero patch) owns no
    contribution, so its ratios are 0 (spec §9.2) and its iERF is empty, in the reference as in the engine;
    a ratio of 1 there hands every upstream PFV the whole seed."""
    model = _model(lambda m, a: m.act(m.conv2(a)))
    with torch.no_grad():
        model.conv.bias.zero_()
    x = _x((1, 3, 7, 9), 3)
    x[:, :, 1:6, 2:7] = 0  # the first pre-activation is zero at rows 2..4, columns 3..5
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    zero = (dec_ref["stages"][0].z == 0).all(0)
    assert bool(zero.view(7, 9)[3, 4])
    slow = ref.ierf(x, "act:0", (3, 4))
    assert bool((slow == 0).all())
    fast = ierf.SRD(model, head="exact").decompose(x).ierf("act:0", torch.tensor([[3, 4]])).double()[0, 0]
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    _assert_reference_is_the_engine(model, x)


@pytest.mark.parametrize("normalize", [Normalize, NormalizeV2])
def test_an_input_normalisation_in_front_is_a_bias_of_the_first_stage(normalize: type[nn.Module]) -> None:
    """nn.Sequential(Normalize(mean, std), model), the README's way to explain a model that expects normalised
    input: the rules fold ``(x - mean) / std`` into the first stage, its ``-mean / std`` a bias shared by norm.
    The reference ran Normalize on every path with its mean until round 36, so each one-hot input PFV carried
    the whole shift at every position: its first-stage ratios did not sum to one and its maps were off by 50x."""
    torch.manual_seed(0)
    inner = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    model = nn.Sequential(normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), randomise_bn(inner)).double().eval()
    _assert_reference_is_the_engine(model, _x((1, 3, 7, 9), 5))
