"""Mutation round 21 on the gate code (GateBranches, reshaped gates, gated convolution taps).

Each model here is one that a plausible slip in ``ierf.srd.rules``/``terms`` would mis-explain or refuse:
gates whose only mixing is a Conv1d or a Linear, a softmax module, shapes read off the gated map inside the
branch, a map scaled by its own channel count, a quadratic factor that only looks like a gate, a gate pooled
over the batch, a gate on a concatenation, and a gated convolution with unequal dilations.
"""

from __future__ import annotations

from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf import UnsupportedModelError
from srd_nets import randomise_bn
from test_srd_gates import _assert_saliency_matches_reference, _x
from torch import nn


class _Conv1dSpatialGate(nn.Module):
    """A spatial gate whose only channel mixing is a Conv1d over the flattened positions: no pooling and no
    Conv2d in the branch, so the Conv1d alone shows the factor is a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)  # wide enough that no PFV of this input is all zero
        self.mix = nn.Conv1d(16, 1, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        b, _, hh, ww = h.shape
        g = torch.sigmoid(self.mix(h.flatten(2)).view(b, 1, hh, ww))
        return self.fc(F.relu(h * g).mean((2, 3)))


class _LinearSpatialGate(nn.Module):
    """A spatial gate from a Linear across the channels of each position (channels last and back)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = nn.Linear(16, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        last = h.permute(0, 2, 3, 1)
        z = F.linear(last, self.mix.weight, self.mix.bias) if self.functional else self.mix(last)
        g = torch.sigmoid(z.permute(0, 3, 1, 2))
        return self.fc(F.relu(h * g).mean((2, 3)))


@pytest.mark.parametrize(
    "model",
    [_Conv1dSpatialGate, lambda: _LinearSpatialGate(False), lambda: _LinearSpatialGate(True)],
    ids=["conv1d", "linear_module", "linear_function"],
)
def test_a_gate_mixed_only_by_a_conv1d_or_a_linear_matches_the_reference(model: Callable[[], nn.Module]) -> None:
    """flatten(2) and permute have no SRD rule on a map: only the gate's native branch may run them."""
    torch.manual_seed(0)
    _assert_saliency_matches_reference(model().double().eval(), _x((2, 3, 5, 6)), target=0)


class _SplitAttentionModule(nn.Module):
    """ResNeSt's split attention with its softmax as an ``nn.Softmax`` module, the branch sizes read off the
    first split (size and shape) and the gates picked by slicing with them; the channel count read there is
    also used after the gates (the head's view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 1)
        self.softmax = nn.Softmax(dim=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(F.relu(self.stem(x)))))
        first, second = torch.split(x, 4, dim=1)
        b, c = first.size(0), first.shape[1]
        gap = F.relu(self.fc1(F.adaptive_avg_pool2d(first + second, 1)))
        att = self.softmax(self.fc2(gap).view(b, 2, c)).view(b, 2 * c, 1, 1)
        out = F.relu(first * att[:, :c] + second * att[:, c:])
        return self.head(F.adaptive_avg_pool2d(out, 1).view(-1, c))


def test_split_attention_with_a_softmax_module_and_sizes_read_in_its_branch_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = randomise_bn(_SplitAttentionModule()).double().eval()
    assert len(ierf.SRD(model).program.gate_branches.gates) == 2
    _assert_saliency_matches_reference(model, _x((2, 3, 6, 7)), target=2)


class _ScaledByWidth(nn.Module):
    """A map scaled by a number computed from its own shape (half its channel count): a size, no gate, though
    the map itself is computed from it (it reads the first half of the channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        half = h.shape[1] // 2
        g = torch.sigmoid(self.c2(h[:, :half]))
        return self.fc(F.relu(g * half).mean((2, 3)))


def test_a_map_times_a_size_it_is_computed_from_is_a_scaling_not_a_gate() -> None:
    torch.manual_seed(0)
    model = _ScaledByWidth().double().eval()
    explainer = ierf.SRD(model, head="exact")
    assert not explainer.program.gate_branches.gates
    x = _x((2, 3, 5, 6))
    torch.testing.assert_close(explainer.saliency(x, 0).double().sum((1, 2)), model(x)[:, 0], atol=1e-5, rtol=1e-5)


class _QuadraticFactor(nn.Module):
    """``h * (gate * mean(h))``: the factor has a gate's shape but is a product with the map's own channel means
    (no activation's output, nor one scaled by a number): no gate, though a gate sits inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        g = torch.sigmoid(self.lin(h.mean((2, 3))))[:, :, None, None]
        return self.fc(F.relu(h * (g * h.mean((2, 3), keepdim=True))).mean((2, 3)))


def test_a_factor_that_is_a_gate_times_the_maps_means_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="not a gate"):
        ierf.SRD(_QuadraticFactor().eval()).saliency(torch.randn(2, 3, 5, 6), 0)


class _BatchPooledGate(nn.Module):
    """A gate pooled over the batch as well as the positions, (1, C, 1, 1): no gate of one image's map."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.excite = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        g = torch.sigmoid(self.excite(h.mean((0, 2, 3), keepdim=True)))
        return self.fc(F.relu(h * g).mean((2, 3)))


def test_a_gate_pooled_over_the_batch_is_refused_with_its_shape() -> None:
    with pytest.raises(UnsupportedModelError, match=r"shape \(1, 4, 1, 1\), neither one gate per channel"):
        ierf.SRD(_BatchPooledGate().eval()).saliency(torch.randn(2, 3, 5, 6), 0)


class _GatedConcat(nn.Module):
    """A squeeze-excitation on the batch-normed concatenation of two convolutions (an Inception branch pair):
    the second convolution's terms start at channel 4, so each must be scaled by its own channels' gates."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        y = self.bn(torch.cat([self.a(h), self.b(h)], 1))
        g = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.fc(F.relu(y * g).mean((2, 3)))


def test_a_gate_on_a_concatenation_of_convolutions_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = randomise_bn(_GatedConcat()).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 6, 5)), target=1)


class _GatedUnevenConv(nn.Module):
    """A squeeze-excitation on a convolution with unequal strides and dilations ((2, 1) and (1, 2)): each
    gated tap's window steps by its own axis's stride and dilation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.bn = nn.BatchNorm2d(4)
        self.squeeze, self.excite = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(F.relu(self.stem(x))))
        g = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.fc(F.relu(y * g).mean((2, 3)))


def test_a_gate_on_a_convolution_with_uneven_stride_and_dilation_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = randomise_bn(_GatedUnevenConv()).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 7, 8)), target=1)


class _VectorGate(nn.Module):
    """A gate on the pooled (B, C) vector, ``v * sigmoid(lin(v))``: its branch reads the vector as (B, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.lin, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.relu(self.c(x)).mean((2, 3))
        return self.fc(v * torch.sigmoid(self.lin(v)))


def test_a_gate_on_a_pooled_vector_is_refused_with_its_shape() -> None:
    with pytest.raises(UnsupportedModelError, match=r"has shape \(2, 8\), neither one gate per channel"):
        ierf.SRD(_VectorGate().eval()).saliency(torch.randn(2, 3, 5, 6), 0)


class _SEBlock(nn.Module):
    """A convolution, its batch norm and a squeeze-excitation in one module whose output is no activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.squeeze, self.excite = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))


class _SEBlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3, padding=1), _SEBlock(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.block(F.relu(self.stem(x)))).mean((2, 3)))


def test_a_module_holding_a_gate_and_its_map_is_refused_as_no_stage_boundary() -> None:
    """Only some of its modules compute the gate: naming it is a wrong boundary, not a gate's branch."""
    explainer = ierf.SRD(_SEBlockNet().eval())
    with pytest.raises(ValueError, match=r"'block' \(_SEBlock\) is not a stage boundary"):
        explainer.ierf(torch.randn(1, 3, 6, 6), "block", torch.tensor([[0, 0]]))


class _PooledTwiceIndexed(nn.Module):
    """A Linear squeeze-excitation whose pooled vector also feeds the head (so the rules, not the native
    branch, carry the gate) and whose gate is reshaped with ``[:, :, None, None]``, then expanded as named."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.lin = nn.Linear(16, 16)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        pooled = h.mean((2, 3))
        g = torch.sigmoid(self.lin(pooled))[:, :, None, None]
        if self.how == "expand_shape":
            g = g.expand(h.shape)
        elif self.how == "expand_as":
            g = g.expand_as(h)
        return self.fc(torch.cat([F.relu(h * g).mean((2, 3)), pooled], 1))


@pytest.mark.parametrize("how", ["index", "expand_shape", "expand_as"])
def test_a_gate_reshaped_outside_a_native_branch_matches_the_reference(how: str) -> None:
    torch.manual_seed(0)
    model = _PooledTwiceIndexed(how).double().eval()
    assert not ierf.SRD(model).program.gate_branches.gates
    _assert_saliency_matches_reference(model, _x((2, 3, 5, 6)), target=1, conserves=False)


class _ExpandedParameter(nn.Module):
    """A parameter expanded as the map it scales (``h * scale.expand_as(h)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        return self.fc(F.relu(h * self.scale.expand_as(h)).mean((2, 3)))


def test_a_constant_expanded_as_a_map_is_its_per_channel_scale() -> None:
    """expand_as reads the map's shape: the constant becomes a full-size view, stride 0 along the batch and the
    positions, which is the (1, C, 1, 1) scale it was expanded from (it was refused as a full-size factor)."""
    torch.manual_seed(0)
    _assert_saliency_matches_reference(_ExpandedParameter().double().eval(), _x((2, 3, 5, 6)), target=0)


class _ReshapedPooled(nn.Module):
    """A pooled map reshaped in a way SRD does not track: a pooled vector sliced, or a pooled 1x1 activation
    map viewed again as (B, C, 1, 1)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(4 if how == "sliced" else 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        if self.how == "sliced":
            return self.fc(h.mean((2, 3))[:, :4])
        p = F.relu(self.mix(F.adaptive_avg_pool2d(h, 1)))
        return self.fc(p.view(p.size(0), p.size(1), 1, 1).flatten(1))


@pytest.mark.parametrize(
    ("how", "message"),
    [("sliced", r"indexing a feature map"), ("viewed_again", r"view\(2, 8, 1, 1\) of a feature map")],
)
def test_reshapes_of_a_pooled_map_that_are_no_gates_are_refused_by_name(how: str, message: str) -> None:
    """Only a (B, C) vector becomes a 1x1 map, and only by adding two trailing axes."""
    with pytest.raises(UnsupportedModelError, match=message):
        ierf.SRD(_ReshapedPooled(how).eval()).saliency(torch.randn(2, 3, 5, 6), 0)
