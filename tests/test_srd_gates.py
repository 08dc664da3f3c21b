"""Gates on a convolution's own output and squeeze-excitations written with Linear layers.

SE-ResNet blocks gate a convolution's batch-normed output before the residual add, so the gate scales each
kernel tap's contribution inside the stage; senet.pytorch's ``SELayer`` computes its gate with ``nn.Linear``
on the (B, C) mean and reshapes it (``view``, ``unsqueeze``, ``[:, :, None, None]``, ``expand_as``). Both are
checked against the float64 brute-force reference, which holds the gate at this image's value and runs
every upstream PFV through the stage on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf import UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import ConvHead, randomise_bn
from torch import nn


class _ConvSE(nn.Module):
    """torchvision's form: 1x1 convolutions on the pooled map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))


class _LinearSE(nn.Module):
    """senet.pytorch's SELayer: Linear layers on the (B, C) mean, the gate viewed back and expanded."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // 2, bias=False), nn.ReLU(), nn.Linear(c // 2, c), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y.expand_as(x)


class _SpatialGate(nn.Module):
    """A spatial attention in CBAM's place: one gate per position from two learnt channel statistics through
    a 3x3 conv (CBAM's channel mean and max have no rule: a mean over channels alone, a max over channels)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, 2, 1)
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = F.relu(self.reduce(x))
        return x * torch.sigmoid(self.conv(stats))


class _Bottleneck(nn.Module):
    """SE-ResNet50's block: the gate on conv3's (1x1) batch-normed output, before the residual add."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.gate = gate(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.gate(self.bn3(self.conv3(out))) + self.down(x))


class _Basic(nn.Module):
    """SE-ResNet18's block: the gate on conv2's (3x3) batch-normed output, so every kernel tap is gated."""

    def __init__(self, cin: int, cout: int, stride: int, gate: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
        self.gate = gate(cout)
        self.down = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gate(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu(out + (x if self.down is None else self.down(x)))


class _SENet(nn.Module):
    def __init__(self, block: str, gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        if block == "bottleneck":
            self.layer1 = _Bottleneck(8, 4, 8, 1, gate)
            self.layer2 = _Bottleneck(8, 4, 8, 2, gate)
        else:
            self.layer1 = _Basic(8, 8, 1, gate)
            self.layer2 = _Basic(8, 8, 2, gate)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _x(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _assert_saliency_matches_reference(
    model: nn.Module, x: torch.Tensor, target: int = 1, conserves: bool = True
) -> None:
    fast = ierf.SRD(model, head="exact").saliency(x, target).double()
    for i in range(x.shape[0]):
        slow = ReferenceSRD(model).saliency(x[i : i + 1], target)
        torch.testing.assert_close(fast[i], slow.view(fast[i].shape), atol=1e-5 * slow.abs().max(), rtol=0)
    if conserves:
        torch.testing.assert_close(fast.sum((1, 2)), model(x)[:, target].detach(), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
@pytest.mark.parametrize("gate", [_ConvSE, _LinearSE, _SpatialGate], ids=["conv_se", "linear_se", "spatial"])
def test_a_gate_on_a_convolutions_output_matches_the_reference(block: str, gate: type[nn.Module]) -> None:
    """The gate was refused there ("SRD keeps that convolution's taps apart ... cannot gate them"); each tap
    is now a path of its own, scaled by the gate, in a non-square batch of two."""
    torch.manual_seed(0)
    model = randomise_bn(_SENet(block, gate)).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 9, 10)))


def test_ierf_through_a_gated_three_by_three_convolution_matches_the_reference() -> None:
    """A PFV after SE-ResNet18's gated block: its iERF equals the reference's, sums to one and stays inside
    the receptive field of the two 3x3 convolutions and the stem (radius 3 around the position)."""
    torch.manual_seed(0)
    model = randomise_bn(_SENet("basic", _ConvSE)).double().eval()
    x = _x((1, 3, 11, 12), seed=3)
    erf = ierf.SRD(model).ierf(x, "layer1", torch.tensor([[5, 4]]))[0, 0].double()
    slow = ReferenceSRD(model).ierf(x, "layer1", (5, 4)).view(erf.shape)
    torch.testing.assert_close(erf, slow, atol=1e-5 * slow.abs().max(), rtol=0)
    assert abs(erf.sum().item() - 1) < 1e-6  # float32
    outside = torch.ones_like(erf, dtype=torch.bool)
    outside[2:9, 1:8] = False
    assert erf[outside].abs().max() == 0


class _GatedDepthwise(nn.Module):
    """A squeeze-excitation between a strided, dilated depthwise convolution's batch norm and its activation
    (some MobileNetV3 ports place it there)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.se = _LinearSE(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.expand(x))
        return self.fc(F.hardswish(self.se(self.bn(self.dw(h)))).mean((2, 3)))


def test_a_gate_on_a_strided_dilated_depthwise_convolution_matches_the_reference() -> None:
    torch.manual_seed(0)
    model = randomise_bn(_GatedDepthwise()).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 11, 9), seed=2), target=2)


_RESHAPES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "view": lambda y, h: y.view(y.shape[0], y.shape[1], 1, 1),
    "reshape_minus_one": lambda y, h: y.reshape(-1, y.shape[1], 1, 1),
    "unsqueeze_twice": lambda y, h: y.unsqueeze(-1).unsqueeze(-1),
    "torch_unsqueeze": lambda y, h: torch.unsqueeze(torch.unsqueeze(y, 2), 3),
    "getitem": lambda y, h: y[:, :, None, None],
    "ellipsis": lambda y, h: y[..., None, None],
    "expand_as": lambda y, h: y.view(y.shape[0], y.shape[1], 1, 1).expand_as(h),
    "expand": lambda y, h: y[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3]),
    "gate_first": lambda y, h: y.view(y.shape[0], y.shape[1], 1, 1),
}


class _ReshapedGate(nn.Module):
    """A squeeze-excitation after an activation whose gate is a Linear's (B, C) output, reshaped as named."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.lin1, self.lin2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        y = torch.sigmoid(self.lin2(F.relu(self.lin1(h.mean((2, 3))))))
        gate = _RESHAPES[self.how](y, h)
        gated = gate * h if self.how == "gate_first" else h * gate
        return self.fc(F.relu(gated).mean((2, 3)))


@pytest.mark.parametrize("how", list(_RESHAPES))
def test_a_reshaped_linear_gate_matches_the_reference(how: str) -> None:
    torch.manual_seed(0)
    model = _ReshapedGate(how).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 7, 8)), target=0)


class _Misused(nn.Module):
    """Reshapes SRD reads only on a gate's way to its product, used otherwise."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        y = torch.sigmoid(self.lin(h.mean((2, 3))))
        if self.how == "expanded_added":  # an expanded 1x1 map is added, not a gate's factor
            out = h + y[:, :, None, None].expand_as(h)
        elif self.how == "full_map_expanded":  # expand of a map that is not 1x1
            out = h * h[:, :, :1].expand_as(h)
        elif self.how == "unrelated_gate":  # the factor is not computed from the map it multiplies
            g = torch.sigmoid(self.lin(F.relu(self.other(x)).mean((2, 3))))
            out = h * g.view(g.shape[0], g.shape[1], 1, 1).expand_as(h)
        elif self.how == "left_three_d":  # (B, C, 1) used as it is
            out = h + y.unsqueeze(-1)
        else:  # a flattened spatial map viewed as a 1x1 map
            out = h + h.flatten(1).view(h.shape[0], -1, 1, 1)[:, :8]
        return self.fc(F.relu(out).mean((2, 3)))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("expanded_added", r"expanded to \(B, C, 7, 8\) is only the gate of a product"),
        ("full_map_expanded", r"indexing a feature map"),
        ("unrelated_gate", r"not a gate"),
        ("left_three_d", r"unsqueezed to \(B, C, 1\) is only unsqueezed again"),
        ("flattened_map", r"view\(2, -1, 1, 1\) of a feature map"),
    ],
)
def test_reshapes_outside_a_gate_are_refused_by_name(how: str, message: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match=message):
        ierf.SRD(_Misused(how).eval()).saliency(torch.randn(2, 3, 7, 8), 0)


def test_expand_of_a_spatial_map_is_refused_by_name() -> None:
    class Expanded(ConvHead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.conv(x))
            return self.fc(self.act(h.expand(2, 4, 5, 6) * h).mean((2, 3)))

    with pytest.raises(UnsupportedModelError, match=r"expand to \(2, 4, 5, 6\) of a feature map"):
        ierf.SRD(Expanded().eval()).saliency(torch.randn(2, 3, 7, 8), 0)


# Gates whose branch SRD runs as the model does (GateBranches): any op may sit between the map and its gate.


class _CBAM(nn.Module):
    """CBAM (Woo et al. 2018) as its reference code writes it: a channel gate from a shared MLP on the
    average- and max-pooled map, then a spatial gate from the channel max and mean through a 7x7 conv + BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, c // 2), nn.ReLU(), nn.Linear(c // 2, c))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.size(2), x.size(3))
        att = self.mlp(F.avg_pool2d(x, size, stride=size)) + self.mlp(F.max_pool2d(x, size, stride=size))
        x = x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class _ECA(nn.Module):
    """ECA-Net's gate: a 1-D convolution across the pooled channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y).expand_as(x)


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
@pytest.mark.parametrize("gate", [_CBAM, _ECA], ids=["cbam", "eca"])
def test_gates_computed_through_ops_without_rules_match_the_reference(block: str, gate: type[nn.Module]) -> None:
    """CBAM's channel max and mean, its max-pooled MLP input and ECA's conv1d have no SRD rule; in a gate's
    branch they need none, and the map equals the reference's."""
    torch.manual_seed(0)
    model = randomise_bn(_SENet(block, gate)).double().eval()
    # With CBAM's weights drawn here, layer2's conv2 leaves a row of all-zero PFVs: the batch-norm bias after
    # conv3 has no path to be shared with there and is dropped (published rule), in both maps alike.
    _assert_saliency_matches_reference(model, _x((2, 3, 9, 10)), conserves=(block, gate) != ("bottleneck", _CBAM))


class _SplitAttention(nn.Module):
    """ResNeSt's split attention (radix 2): two branches weighted per channel by a softmax over the branches,
    computed from their pooled sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc1, self.fc2 = nn.Conv2d(c, c, 1), nn.Conv2d(c, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = F.relu(self.bn(self.conv(x)))
        first, second = torch.split(x, c, dim=1)
        gap = F.relu(self.fc1(F.adaptive_avg_pool2d(first + second, 1)))
        att = F.softmax(self.fc2(gap).view(b, 2, c), dim=1).view(b, 2 * c, 1, 1)
        a1, a2 = torch.split(att, c, dim=1)
        return first * a1 + second * a2


class _ResNeStBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.split = _SplitAttention(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.split(F.relu(self.stem(x)))).mean((2, 3)))


def test_split_attention_gates_sharing_one_softmax_match_the_reference() -> None:
    """One softmax over the splits gates both (its branch feeds two products); softmax has no SRD rule."""
    torch.manual_seed(0)
    model = randomise_bn(_ResNeStBlock()).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 7, 9)), target=2)


def test_a_layer_inside_a_gates_branch_is_not_listed_and_is_refused_for_what_it_is() -> None:
    """torchvision's MobileNetV3 squeeze-excitations: their inner ReLU and hard sigmoid are no PFV maps
    (the gate is held at its value), so `layers` leaves them out and naming one says why."""
    import torchvision

    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=5).eval()
    explainer = ierf.SRD(model)
    assert explainer.layers and not [name for name in explainer.layers if ".fc" in name or "scale" in name]
    with pytest.raises(ValueError, match=r"'features\.1\.block\.1\.fc1' lies in a gate's branch"):
        explainer.ierf(torch.randn(1, 3, 64, 64), "features.1.block.1.fc1", torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"'features\.1\.block\.1' lies in a gate's branch"):
        explainer.ierf(torch.randn(1, 3, 64, 64), "features.1.block.1", torch.tensor([[0, 0]]))


class _HardSigmoidSE(nn.Module):
    """A MobileNetV3 port's squeeze-excitation (d-li14/mobilenetv3.pytorch): Linear layers and a hard sigmoid
    written as ReLU6(x + 3) / 6, between the depthwise convolution's batch norm and its activation."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Sequential(nn.Linear(8, 4), nn.ReLU(inplace=True), nn.Linear(4, 8))
        self.relu6 = nn.ReLU6(inplace=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.dw(F.hardswish(self.expand(x))))
        b, c, _, _ = h.size()
        y = self.relu6(self.fc(F.adaptive_avg_pool2d(h, 1).view(b, c)) + 3) / 6
        return self.head(F.hardswish(h * y.view(b, c, 1, 1)).mean((2, 3)))


def test_a_hard_sigmoid_written_as_relu6_gates_like_any_activation() -> None:
    torch.manual_seed(0)
    model = randomise_bn(_HardSigmoidSE()).double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 8, 7)), target=2)


class _PooledTwice(nn.Module):
    """A squeeze-excitation whose pooled vector also feeds the classifier: its branch feeds more than the
    gate, so it is decomposed by the rules (the pooled PFVs carry relevance into the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        pooled = F.adaptive_avg_pool2d(h, 1)
        g = torch.sigmoid(self.excite(F.relu(self.squeeze(pooled))))
        gated = F.relu(h * g).mean((2, 3))
        return self.fc(torch.cat([gated, pooled.flatten(1)], 1))


def test_a_gate_branch_that_feeds_more_than_its_gate_is_decomposed_by_the_rules() -> None:
    torch.manual_seed(0)
    model = _PooledTwice().double().eval()
    assert not ierf.SRD(model).program.gate_branches.gates
    # Image 1 has one all-zero PFV, whose share of the head's bias stops there (spec: ratio 0 onto an all-zero
    # pre-activation), in both maps alike; image 0 has none and conserves.
    _assert_saliency_matches_reference(model, _x((2, 3, 6, 7))[:1], target=1)
    _assert_saliency_matches_reference(model, _x((2, 3, 6, 7)), target=1, conserves=False)


class _SelfScaled(ConvHead):
    """Products of a map with a factor that is no PFV map of gates: its own channel means (no activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        return self.fc(self.act(h * h.mean((2, 3), keepdim=True)).mean((2, 3)))


def test_a_factor_that_is_not_an_activations_output_is_no_gate() -> None:
    with pytest.raises(UnsupportedModelError, match="not a gate"):
        ierf.SRD(_SelfScaled().eval()).saliency(torch.randn(1, 3, 6, 7), 0)


class _ExpandedSpatialGate(nn.Module):
    """A spatial gate (B, 1, H, W) expanded over the channels before its product (a stride-0 view)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)  # wide enough that no PFV of this input is all zero
        self.reduce = nn.Conv2d(16, 1, 3, padding=1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        g = torch.sigmoid(self.reduce(h)).expand_as(h)
        return self.fc(F.relu(h * g).mean((2, 3)))


def test_a_spatial_gate_expanded_over_the_channels_is_one_gate_per_position() -> None:
    torch.manual_seed(0)
    model = _ExpandedSpatialGate().double().eval()
    _assert_saliency_matches_reference(model, _x((2, 3, 6, 5)), target=0)


class _ShrinkingGate(ConvHead):
    """A gate whose branch convolves a 4x-pooled map without padding: inputs under 12 pixels leave the
    branch's kernel larger than its map, so the model's own forward fails there."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        g = torch.sigmoid(F.adaptive_avg_pool2d(self.branch(F.avg_pool2d(h, 4)), 1))
        return self.fc(self.act(h * g).mean((2, 3)))


def test_an_input_too_small_for_a_gates_branch_is_refused_as_the_input_size() -> None:
    """The branch runs as the model runs it, so the model's own failure there (torch's RuntimeError about the
    kernel size) is the input's fault, raised as InputSizeError naming the node; larger inputs work."""
    model = _ShrinkingGate().eval()
    ierf.SRD(model).saliency(torch.randn(1, 3, 16, 16), 0)
    with pytest.raises(ierf.InputSizeError, match=r"the model's own forward fails here on this input.*[Kk]ernel"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 10, 10), 0)
