"""Models the SRD engine accepts must not get silently wrong maps (exploration wrongmap18).

Each test builds a tiny random-weight model that ``ierf.SRD`` accepts without error and checks the map
against the spec's definition (per-tap sharing ratios) or the float64 brute-force reference.
"""

from __future__ import annotations

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.srd.reference import ReferenceSRD
from torch import nn


class _ConvPadReLU(nn.Module):
    """A strided 3x3 convolution whose pre-activation output is zero-padded (TF-style 'same' padding
    written after the convolution) before its activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.relu(F.pad(self.conv(x), (0, 1, 0, 1))).mean((2, 3)))


class _ConvPadConv(nn.Module):
    """conv3x3 -> ZeroPad2d -> unpadded conv3x3 -> ReLU: the pad between two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 3)
        self.pad = nn.ZeroPad2d(1)
        self.c2 = nn.Conv2d(16, 16, 3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.c2(self.pad(self.c1(F.relu(self.c0(x)))))).mean((2, 3)))


def test_ierf_of_zero_padded_convolution_spreads_over_the_kernel_taps():
    """The iERF of a first-stage PFV z_q = sum_t W_t x_{p(t)} is, by the spec (§2.2), the per-tap ratios
    <W_t x_{p(t)}, z_q> / ||z_q||^2 on the 3x3 window; zero-padding the convolution's output must not change
    that. The engine materialises the multi-tap convolution in Affine.zero_pad as if it were one tap and
    puts the whole PFV (iERF = 1) on the window's top-left pixel: a silently wrong map."""
    torch.manual_seed(0)
    model = _ConvPadReLU().double().eval()
    x = torch.randn(1, 3, 11, 11, dtype=torch.float64)
    try:
        erf = ierf.SRD(model).ierf(x, "relu", torch.tensor([[2, 2]]))[0, 0].double()
    except ierf.UnsupportedModelError as e:  # a loud refusal naming the pad is an acceptable fix too
        assert "pad" in str(e)
        return
    w = model.conv.weight.detach()
    contrib = torch.stack([w[:, :, i, j] @ x[0, :, 4 + i, 4 + j] for i in range(3) for j in range(3)])
    z = contrib.sum(0)
    expected = torch.zeros(11, 11, dtype=torch.float64)
    expected[4:7, 4:7] = ((contrib @ z) / (z @ z)).view(3, 3)
    torch.testing.assert_close(erf, expected, atol=1e-5, rtol=0)


def test_pad_between_two_convolutions_matches_reference():
    """conv -> ZeroPad2d -> conv before one activation is accepted; its saliency must equal the float64
    reference's (it differs by about 30 % of the map's maximum while both sum to the logit)."""
    torch.manual_seed(0)
    model = _ConvPadConv().double().eval()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    except ierf.UnsupportedModelError as e:  # a loud refusal naming the pad is an acceptable fix too
        assert "pad" in str(e)
        return
    slow = ReferenceSRD(model).saliency(x, 0)
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max().item(), rtol=0)


class _StridedFlattenHead(nn.Module):
    """conv -> ReLU -> 3x3 stride-2 conv -> flatten -> Linear: the head's convolution never reads the last
    row and column of the 20x20 PFV map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 9 * 9, 4)

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.c1(x))).flatten(1))


def _without_head_biases(model: nn.Module, *names: str) -> nn.Module:
    for name in names:
        getattr(model, name).bias.data.zero_()
    return model


@pytest.mark.parametrize(
    ("build", "size", "head_biases"),
    [
        (lambda: _StridedFlattenHead(), 20, ("c2", "fc")),  # the last row and column are never read
        (lambda: _MaxPoolThenGAP(), 16, ("fc",)),  # overlapping windows: PFVs read 1, 2 or 4 times
    ],
    ids=["unread-positions", "overlapping-max-pool"],
)
def test_exact_heads_that_read_positions_unevenly_match_the_reference_but_for_the_bias_rule(
    build, size, head_biases
) -> None:
    """Where a head reads its PFVs unevenly (an overlapping pooling before the average, a strided head
    convolution that never reads the last row), the engine shares the head's bias equally among the head's
    paths (so by how often each PFV is read, and none to an unread one) while the float64 reference gives
    every position of the map the same share (README, Limits). Everything else must agree: with the head's
    biases zeroed the two maps are equal, and with them both sum to the logit."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    model = build().double().eval()
    fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    slow = ReferenceSRD(model).saliency(x, 0)
    logit = model(x)[0, 0]
    torch.testing.assert_close(fast.sum(), logit, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(slow.sum(), logit, atol=1e-9, rtol=1e-9)
    model = _without_head_biases(model, *head_biases)
    fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    slow = ReferenceSRD(model).saliency(x, 0)
    torch.testing.assert_close(fast, slow, atol=1e-6 * slow.abs().max().item(), rtol=0)


class _MaxPoolThenGAP(nn.Module):
    """conv -> ReLU -> overlapping 3x3/2 max-pool (padding 1) -> global average pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.c1(x))).mean((2, 3)))


class _SameMapTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x)))
        return self.fc(F.relu(y + y).mean((2, 3)))


def test_adding_a_biased_map_to_itself_is_not_called_channel_slices():
    """``y + y`` (y a biased convolution's output) is the same function as ``y * 2``, which is accepted. It
    is refused with "add of channel slices of one convolution's output", which names a construct the
    model does not have. Either decompose it as 2 * y (matching the reference) or refuse it with a message
    about adding one map to itself."""
    torch.manual_seed(0)
    model = _SameMapTwice().double().eval()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    try:
        fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    except ierf.UnsupportedModelError as e:
        assert "channel slices" not in str(e), str(e)
        return
    slow = ReferenceSRD(model).saliency(x, 0)
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max().item(), rtol=0)


class _GroupMean(nn.Module):
    """Maxout-style channel-group pooling: the map viewed as (B, groups, C/groups, H, W), averaged over
    each group's channels (dim 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.fc(h.view(h.shape[0], 4, 4, h.shape[2], h.shape[3]).mean(2).mean((2, 3)))


def test_refusal_of_a_channel_group_mean_does_not_call_it_a_spatial_mean():
    """The refusal must name what the model does. Dim 2 of the 5-D grouped view is the channels within a
    group, but the message (dims taken modulo 4 as if the value were a 4-D map) says "mean over one spatial
    dim" and suggests x.mean((2, 3))."""
    model = _GroupMean().eval()
    with pytest.raises(ierf.UnsupportedModelError) as info:
        ierf.SRD(model).saliency(torch.randn(1, 3, 8, 8), 0)
    assert "spatial" not in str(info.value), str(info.value)


class _SplitAttentionLike(nn.Module):
    """ResNeSt-style attention: global average pool, then grouped 1x1 convolutions (cardinality 2), then a
    sigmoid gate on the map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1, groups=2)
        self.fc2 = nn.Conv2d(4, 8, 1, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        return self.fc((h * g).mean((2, 3)))


class _AvgPoolDepthwise1x1(nn.Module):
    """avg_pool2d(2) followed directly by a depthwise 1x1 convolution (a per-channel scale and bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 1, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.dw(F.avg_pool2d(F.relu(self.c1(x)), 2))).mean((2, 3)))


@pytest.mark.parametrize("net", [_SplitAttentionLike, _AvgPoolDepthwise1x1])
def test_average_pool_then_grouped_1x1_convolution_is_decomposed(net):
    """An average pooling (or a keepdim spatial mean) read directly by a grouped 1x1 convolution crashes
    with a bare RuntimeError ("shape '[4, 8]' is invalid for input of size 16"). The shortcut in
    terms._conv_term that mixes channels before averaging (``one_by_one and t.uniform``) reshapes the
    grouped weight as if it were dense. That is neither a map nor the documented UnsupportedModelError.
    With the dense weight the map equals the float64 reference to 4e-8."""
    torch.manual_seed(0)
    model = net().double().eval()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    try:
        fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    except ierf.UnsupportedModelError:  # a refusal that names the op is within the contract
        return
    slow = ReferenceSRD(model).saliency(x, 0)
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max().item(), rtol=0)


class _Lazy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.LazyConv2d(8, 3, padding=1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        return self.fc(F.relu(self.c1(x)).mean((2, 3)))


def test_uninitialised_lazy_modules_are_refused_for_what_they_are():
    """A model with uninitialised nn.Lazy* modules is refused with "the model has forward hooks (on 'c1',
    'fc') ... remove them". The user added no hooks: those are the lazy modules' own initialisation
    pre-hooks. The message should say the modules are uninitialised (run one forward pass first)."""
    with pytest.raises(ValueError) as info:
        ierf.SRD(_Lazy().eval()).saliency(torch.randn(1, 3, 8, 8), 0)
    message = str(info.value).lower()
    assert "lazy" in message or "uninitiali" in message, str(info.value)


class _SqueezeExcitation(nn.Module):
    """A squeeze-excitation gate, written as torchvision's (1x1 convolutions on a keepdim mean) or as the
    original SENet's (Linear layers on the (B, C) mean, reshaped into a gate)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.lin1, self.lin2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.c(x))
        if self.form == "conv":
            gate = torch.sigmoid(self.conv2(F.relu(self.conv1(h.mean((2, 3), keepdim=True)))))
        else:
            y = torch.sigmoid(self.lin2(F.relu(self.lin1(h.mean((2, 3))))))
            b, c = y.shape
            gate = {
                "view": lambda: y.view(b, c, 1, 1),
                "unsqueeze": lambda: y.unsqueeze(-1).unsqueeze(-1),
                "expand_as": lambda: y.view(b, c, 1, 1).expand_as(h),
                "getitem": lambda: y[:, :, None, None],
            }[self.form]()
        return self.fc(F.relu(h * gate).mean((2, 3)))


@pytest.mark.parametrize("form", ["view", "unsqueeze", "expand_as", "getitem"])
def test_a_linear_squeeze_excitation_gate_matches_the_reference(form) -> None:
    """A gate reshaped from a Linear's (B, C) output was refused naming the reshape; it is now read as the
    1x1 map it is and must give the reference's map (tests/test_srd_gates.py has the other spellings)."""
    torch.manual_seed(0)
    model = _SqueezeExcitation(form).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    fast = ierf.SRD(model, head="exact").saliency(x, 0)[0].double()
    slow = ReferenceSRD(model).saliency(x, 0).view(fast.shape)
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max(), rtol=0)


def test_a_convolutional_squeeze_excitation_gate_conserves() -> None:
    torch.manual_seed(0)
    model = _SqueezeExcitation("conv").double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    maps = ierf.SRD(model).saliency(x, 0)
    torch.testing.assert_close(maps.double().sum((1, 2)), model(x)[:, 0].detach(), atol=1e-5, rtol=1e-5)
