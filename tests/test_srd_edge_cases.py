"""Calls a demanding user makes that the main contract tests do not: inference mode, broadcast constants,
models with side effects in forward, unusual first layers, fully connected models, ill-fitting inputs,
float16 range, pooled concatenations."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable

import ierf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ierf.errors import InputSizeError, UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import (
    ConvHead,
    FCHead,
    TinyResNet,
    TinyVGG,
    assert_matches_reference,
    channel_shuffle,
    directional_derivatives,
    randomise_bn,
    reference_relevance,
)
from torch import nn


def _conserves(dec, target: int, rtol: float = 1e-4) -> None:
    total = dec.saliency(target).sum((1, 2)).double()
    logit = dec.logits[:, target].double()
    assert torch.allclose(total, logit, rtol=rtol, atol=1e-5), (total, logit)


# -- torch.inference_mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("net", [TinyResNet, FCHead], ids=["exact-head", "gradcam-head"])
def test_inference_mode_gives_the_same_maps_and_leaves_later_calls_working(net) -> None:
    """Parameter-derived tensors built under inference mode used to be cached as inference tensors, which
    have no version counter: every later call outside inference mode then failed."""
    torch.manual_seed(0)
    model = randomise_bn(net()).eval()
    explainer = ierf.SRD(model)
    x = torch.randn(2, 3, 8, 10)
    with torch.inference_mode():
        inside = explainer.saliency(x, 1)
    after = explainer.saliency(x, 1)
    torch.testing.assert_close(inside, after)
    differentiable = explainer.saliency(x.clone().requires_grad_(True), 1)
    assert differentiable.requires_grad
    torch.testing.assert_close(differentiable.detach(), after)


# -- constants added with broadcasting ----------------------------------------------------------------------
class _Shifted(nn.Module):
    def __init__(self, shift_shape: tuple[int, ...], logit_bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("shift", torch.randn(shift_shape))
        self.logit_bias = nn.Parameter(torch.randn(4)) if logit_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(torch.relu(self.conv(x) + self.shift).mean((2, 3)))
        return y + self.logit_bias if self.logit_bias is not None else y


@pytest.mark.parametrize(
    "shape, logit_bias",
    [((1,), False), ((10, 12), False), ((1, 1, 10, 12), False), ((8, 1, 1), False), ((), True)],
    ids=["one-value", "per-position", "per-position-4d", "per-channel", "logit-bias"],
)
def test_a_broadcast_constant_reaches_every_channel(shape, logit_bias) -> None:
    """A (1,)-shaped constant used to be added to channel 0 only: wrong logits, wrong maps."""
    torch.manual_seed(0)
    model = _Shifted(shape, logit_bias).eval()
    x = torch.randn(2, 3, 10, 12)
    dec = ierf.SRD(model).decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-5, atol=1e-5)
    _conserves(dec, 2)


def test_a_constant_that_would_enlarge_the_map_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"constant of shape \(3, 10, 12\)"):
        ierf.SRD(_Shifted((3, 10, 12)).eval()).saliency(torch.randn(2, 3, 10, 12), 1)


# -- contrast ----------------------------------------------------------------------------------------------
class _PaddedHead(nn.Module):
    """A convolution after the last activation: head paths that land on padding carry nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))


def test_mean_contrast_sums_to_zero_when_head_paths_reach_padding() -> None:
    torch.manual_seed(0)
    dec = ierf.SRD(_PaddedHead().eval()).decompose(torch.randn(2, 3, 8, 8))
    total = dec.saliency(1, contrast="mean").sum((1, 2))
    assert total.abs().max() < 1e-5, total
    # numpy integers are class indices, as for targets
    pair = dec.saliency(1, contrast=np.int64(2)).sum((1, 2))
    torch.testing.assert_close(pair, dec.logits[:, 1] - dec.logits[:, 2], rtol=1e-4, atol=1e-5)


# -- the caller's model ---------------------------------------------------------------------------------------
class _Recording(nn.Module):
    """Writes on itself in forward, as feature-extraction code often does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.features = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        self.features = h
        self.calls += 1
        self.last_shape = h.shape
        return self.fc(h.mean((2, 3)))


def test_building_an_explainer_leaves_what_forward_writes_untouched() -> None:
    """Tracing runs forward on proxies: it used to leave an fx Proxy in ``model.features`` (so the model
    could no longer be saved) and count a call."""
    model = _Recording().eval()
    explainer = ierf.SRD(model)
    assert model.features is None and model.calls == 0 and not hasattr(model, "last_shape")
    torch.save(model, io.BytesIO())
    x = torch.randn(1, 3, 8, 8)
    _conserves(explainer.decompose(x), 1)


class _Collecting(nn.Module):
    """Mutates what it already holds in forward: a feature list, a cache dict, a nested counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.feats: list = []
        self.cache: dict = {}
        self.stats = {"calls": 0, "shapes": []}
        self.seen: set = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x) + torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1))
        self.feats.append(h)
        self.cache["last"] = h
        self.stats["calls"] += 1
        self.stats["shapes"].append(h.shape)
        self.seen.add("forward")
        return self.fc(h.mean((2, 3)))


def test_building_an_explainer_leaves_the_models_containers_and_namespace_as_they_were() -> None:
    """Tracing left fx Proxies in lists and dicts the model already held (``self.feats.append(h)``), a
    changed counter in ``self.stats``, and one ``_tensor_constant<k>`` attribute per build on the model
    for each tensor its forward creates."""
    model = _Collecting().eval()
    before = set(vars(model))
    for _ in range(3):
        explainer = ierf.SRD(model)
    assert set(vars(model)) == before
    assert model.feats == [] and model.cache == {} and model.stats == {"calls": 0, "shapes": []}
    assert model.seen == set()
    x = torch.randn(2, 3, 8, 8)
    dec = explainer.decompose(x)
    # the explainer's first decomposition runs the model once, to check the trace reproduces it
    assert len(model.feats) == 1 and model.stats["calls"] == 1
    torch.testing.assert_close(dec.logits, model(x).detach())  # the constant is still read, off the model
    _conserves(dec, 1)
    explainer.decompose(x)
    assert len(model.feats) == 2 and model.stats["calls"] == 2  # the caller's call; no further check


def test_a_tensor_made_in_the_head_reaches_the_gradient_start() -> None:
    """The head of a gradient start map reads its constants from the program, not from the model."""

    class ScaledHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x)).flatten(1)
            return self.fc(h) + torch.tensor([0.0, 1.0, -1.0])

    torch.manual_seed(0)
    model = ScaledHead().eval()
    x = torch.randn(1, 3, 4, 4)
    explainer = ierf.SRD(model, head="grad_x_act")
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]
    a = explainer.decompose(x).activations
    start = next(iter(a.values())).detach().requires_grad_(True)
    logit = model.fc(start.flatten(1))[0, 1]
    (grad,) = torch.autograd.grad(logit, start)
    expected = (grad * start).sum(1)[0].detach()
    got = explainer.decompose(x).layer_relevance(explainer.layers[-1], 1)[0]
    torch.testing.assert_close(got, expected)


# -- the first layer ------------------------------------------------------------------------------------------
class _StemRegisteredLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 5, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.stem(x))).mean((2, 3))


def test_input_channels_come_from_the_first_convolution_run_not_registered() -> None:
    explainer = ierf.SRD(_StemRegisteredLast().eval())
    _conserves(explainer.decompose(torch.randn(1, 3, 16, 16)), 1)
    assert explainer.layer_shape("relu", (16, 16)) == (8, 16, 16)
    with pytest.raises(ValueError, match="3 channels, got 4"):
        explainer.saliency(torch.randn(1, 4, 16, 16), 1)


def test_a_fully_connected_model_is_decomposed_exactly_by_default() -> None:
    """No spatial map before the head: the default head used to pick a gradient start at the input and
    fail with KeyError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    dec = ierf.SRD(model).decompose(torch.randn(2, 1, 8, 8))
    _conserves(dec, 3)
    assert dec.saliency(3).shape == (2, 8, 8)


# -- inputs that do not fit ----------------------------------------------------------------------------------
def test_an_input_size_the_classifier_does_not_take_is_a_value_error() -> None:
    explainer = ierf.SRD(FCHead().eval())  # its first Linear reads a pooled 4x4x5 map (8x10 input)
    with pytest.raises(ValueError, match=r"input 16x16 does not fit this model: .*expects 80 input features"):
        explainer.saliency(torch.randn(1, 3, 16, 16), 1)


def test_an_input_smaller_than_a_window_is_a_value_error() -> None:
    vgg = ierf.SRD(torchvision.models.vgg11().eval())  # five 2x2 max-pools
    with pytest.raises(ValueError, match="is too small for this model"):
        vgg.saliency(torch.randn(1, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="is too small for this model"):
        vgg.layer_shape("features.1", (8, 8))
    with pytest.raises(ValueError, match="two positive ints"):
        vgg.layer_shape("features.1", (0, 8))
    assert vgg.layer_shape("features.1", [32, 32]) == (64, 32, 32)  # any sequence of two ints


class _BroadcastAdd(nn.Module):
    """A map plus its own global average: a broadcasting add of two maps, refused by the term algebra."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return self.fc(self.pool(self.act(y + self.pool(y))).flatten(1))


def test_refusals_from_shared_term_code_name_the_operation() -> None:
    """Adds, concatenations and windows are shared code that cannot know where it was called from: the
    interpreter names the node, so a user knows which line of the model to change."""
    with pytest.raises(UnsupportedModelError, match=r"^'add' in the model's top-level forward: add of shapes"):
        ierf.SRD(_BroadcastAdd().eval()).saliency(torch.randn(1, 3, 6, 6), 0)
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(7), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match=r"too small for this model: module '2' \(AvgPool2d\): a 7x7 window"):
        ierf.SRD(small).saliency(torch.randn(1, 3, 6, 6), 0)


def test_layer_relevance_above_a_gradient_start_is_refused() -> None:
    """Relevance starts at the gradient head's start map: layers after it never receive any, and used to
    come back as silent zeros."""
    explainer = ierf.SRD(FCHead().eval())
    dec = explainer.decompose(torch.randn(2, 3, 8, 10))
    above = explainer.layers[-1]
    assert dec.start_layer() < explainer.program.source_id(above)
    with pytest.raises(ValueError, match="lies above the start map"):
        dec.layer_relevance(above, 1)
    start = explainer.program.names[dec.start_layer()]
    torch.testing.assert_close(dec.layer_relevance(start, 1).sum((1, 2)), dec.saliency(1).sum((1, 2)))


# -- float16 range -----------------------------------------------------------------------------------------
def test_float16_statistics_do_not_overflow() -> None:
    """||z||^2 passes float16's 65504 once a PFV's norm passes 256: ratios used to become inf/inf = NaN."""
    torch.manual_seed(0)
    model = randomise_bn(TinyVGG(), 1).eval()
    x = torch.randn(1, 3, 16, 16) * 2000
    half = ierf.SRD(copy.deepcopy(model).half()).saliency(x.half(), 1)
    assert torch.isfinite(half).all()
    full = ierf.SRD(model).saliency(x, 1)
    torch.testing.assert_close(half.sum(), full.sum(), rtol=5e-3, atol=1e-2)


# -- pooling ---------------------------------------------------------------------------------------------------
def test_max_pooling_a_channel_concatenation_is_decomposed() -> None:
    """SqueezeNet pools the concatenation of its Fire modules' two expand activations."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1().eval()
    x = torch.randn(1, 3, 64, 64)
    explainer = ierf.SRD(model)
    dec = explainer.decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-4, atol=1e-5)
    _conserves(dec, 7)
    erf = dec.ierf("features.9.squeeze_activation", torch.tensor([[1, 1]]))
    torch.testing.assert_close(erf.sum((2, 3)), torch.ones(1, 1), rtol=1e-4, atol=1e-5)


def test_googlenet_max_pools_a_max_pool() -> None:
    """torchvision's GoogLeNet as its ImageNet weights build it: each inception block's fourth branch
    max-pools its input, which after maxpool2/3/4 is itself a max-pool's output (paths become pairs of
    window offsets), and ``transform_input`` re-normalises the input one channel at a time."""
    torch.manual_seed(0)
    net = torchvision.models.googlenet(aux_logits=False, init_weights=True, transform_input=True)
    model = randomise_bn(net).eval()
    x = torch.randn(1, 3, 96, 96)
    explainer = ierf.SRD(model)
    dec = explainer.decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-4, atol=1e-5)
    _conserves(dec, 7)
    erf = dec.ierf("inception4a.branch4.1", torch.tensor([[1, 1], [2, 3]]))
    torch.testing.assert_close(erf.sum((2, 3)), torch.ones(1, 2), rtol=1e-4, atol=1e-5)


def test_shufflenet_chunks_and_shuffles_channels() -> None:
    """torchvision's ShuffleNetV2: x.chunk(2, dim=1), concatenation, then a channel shuffle written as
    view(B, g, C/g, H, W), transpose(1, 2), view(B, C, H, W)."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.shufflenet_v2_x0_5()).eval()
    x = torch.randn(2, 3, 96, 96)
    dec = ierf.SRD(model).decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-4, atol=1e-5)
    _conserves(dec, 7)
    erf = dec.ierf("stage3.2.branch2.7", torch.tensor([[1, 1]]))
    torch.testing.assert_close(erf.sum((2, 3)), torch.ones(2, 1), rtol=1e-4, atol=1e-5)


def test_a_shuffled_average_pooling_matches_the_reference() -> None:
    """A one-channel average pooling is a channel-uniform kernel; moved by a shuffle it gets zero filters
    and is an ordinary convolution (it used to keep the uniform mark and fail in the next 1x1)."""
    from ierf.srd.reference import ReferenceSRD

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 1, 3, padding=1)
            self.b = nn.Conv2d(3, 1, 3, padding=1)
            self.p = nn.Conv2d(2, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = torch.cat([F.avg_pool2d(torch.relu(self.a(x)), 3, 1, 1), torch.relu(self.b(x))], 1)
            return self.fc(torch.relu(self.p(channel_shuffle(y, 2))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    fast = ierf.SRD(model, head="exact").decompose(x).relevance(1)[0]
    ref = ReferenceSRD(model)
    slow = reference_relevance(ref, ref.decompose(x), 1).view(fast.shape)
    torch.testing.assert_close(fast, slow, atol=1e-9 * slow.abs().max(), rtol=0)


def test_a_model_that_reads_some_input_channels_takes_the_full_input() -> None:
    """The first convolution's in_channels is not the input's channel count once the input is indexed."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x[:, 1:2])).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = ierf.SRD(model)
    _conserves(explainer.decompose(x), 2)
    assert tuple(explainer.layer_shape("relu" if "relu" in explainer.layers else explainer.layers[0], (8, 8))) == (
        4,
        8,
        8,
    )


def test_uneven_adaptive_pooling_read_through_dropout_then_linear() -> None:
    """AlexNet at 256x256: 7x7 -> 6x6 pooling, then flatten, eval-mode Dropout, Linear."""
    torch.manual_seed(0)
    model = torchvision.models.alexnet().eval()
    x = torch.randn(1, 3, 256, 256)
    dec = ierf.SRD(model, head="exact").decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-4, atol=1e-5)
    _conserves(dec, 3)


def test_stochastic_depth_is_the_identity_in_eval_mode() -> None:
    """torchvision's StochasticDepth (EfficientNet, ConvNeXt residual branches) passes its input through
    in eval mode."""
    from torchvision.ops import StochasticDepth

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Conv2d(8, 8, 3, padding=1)
            self.drop = StochasticDepth(0.2, "row")
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            return self.fc(torch.relu(h + self.drop(self.branch(h))).mean((2, 3)))

    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(2, 3, 12, 12)
    dec = ierf.SRD(model).decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-5, atol=1e-6)
    _conserves(dec, 2)


@pytest.mark.parametrize("size", [64, 32], ids=["64", "32-last-maps-1x1"])
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_squeeze_excitation_networks_decompose(name, size) -> None:
    """At 32x32 (CIFAR-sized inputs) the last blocks' maps are 1x1, where a gate has the map's own shape."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    dec = ierf.SRD(model, head="exact").decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach(), rtol=1e-4, atol=1e-12)
    total = dec.saliency(5).sum().double()
    assert abs(total - dec.logits[0, 5].double()) <= 1e-4 * dec.logits.abs().max() + 1e-12


class _GatedOneByOne(nn.Module):
    """A stem whose kernel covers the input, so every later map is 1x1, then a squeeze-excitation and a
    spatial gate in a residual block (as the last blocks of MobileNetV3 or EfficientNet at 32x32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, (3, 4), bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.act0 = nn.SiLU()
        self.expand = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_e = nn.BatchNorm2d(6)
        self.act_e = nn.Hardswish()
        self.squeeze = nn.Conv2d(6, 3, 1)
        self.act_s = nn.ReLU()
        self.excite = nn.Conv2d(3, 6, 1)
        self.gate = nn.Sigmoid()
        self.spatial = nn.Conv2d(6, 1, 1)
        self.gate_s = nn.Hardsigmoid()
        self.proj = nn.Conv2d(6, 6, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act0(self.bn0(self.stem(x)))
        e = self.act_e(self.bn_e(self.expand(a)))
        h = e * self.gate(self.excite(self.act_s(self.squeeze(F.adaptive_avg_pool2d(e, 1)))))
        h = self.gate_s(self.spatial(h)) * h
        return self.fc(self.act1(a + self.bn1(self.proj(h))).flatten(1))


def test_gates_on_a_one_by_one_map_match_the_reference() -> None:
    """On a 1x1 map a per-channel gate has the map's own shape, as the factor of x * sigmoid(x) has: the
    squeeze (a pooling between map and gate) tells them apart. They used to be refused there."""
    torch.manual_seed(0)
    model = randomise_bn(_GatedOneByOne()).double().eval()
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    for i in range(2):
        assert_matches_reference(dec, ref, ref.decompose(x[i : i + 1]), (0, 3), 1e-6, image=i)
    _conserves(dec, 3)


def test_an_element_wise_product_on_a_one_by_one_map_is_not_taken_for_a_gate() -> None:
    class SiLUAsProduct(ConvHead):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.act(self.conv(x))
            return self.fc((a * torch.sigmoid(a)).mean((2, 3)))

    model = SiLUAsProduct().eval()
    with pytest.raises(UnsupportedModelError, match="not a gate"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 3, 3), 1)  # the map is 1x1


# -- review follow-ups ------------------------------------------------------------------------------------
def test_tensors_forward_creates_stay_readable_after_tracing() -> None:
    """fx keeps a tensor made in forward as ``_tensor_constant<k>`` on the model, and the graph reads it:
    putting the model's attributes back must leave those (and buffers forward registers) in place."""

    class MadeInForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "offset"):
                self.register_buffer("offset", torch.full((4, 1, 1), 0.5))
            return self.fc(torch.relu(self.conv(x) + torch.ones(4, 1, 1) + self.offset).mean((2, 3)))

    torch.manual_seed(0)
    model = MadeInForward().eval()
    x = torch.randn(2, 3, 8, 8)
    dec = ierf.SRD(model).decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach())
    _conserves(dec, 1)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "offset"):
                self.register_buffer("offset", torch.full((4, 1, 1), 0.25))
            self.seen = True
            return torch.relu(self.conv(x) + self.offset)

    class Shared(nn.Module):  # one module under two names: what one path keeps, the other keeps too
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = Inner()
            self.b = self.a
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.b(self.a(torch.relu(self.stem(x)))).mean((2, 3)))

    model = Shared().eval()
    explainer = ierf.SRD(model)
    assert not hasattr(model.a, "seen") and "offset" in model.a._buffers  # tracing left nothing behind
    dec = explainer.decompose(x)  # (its check of the trace runs the model's own forward once)
    torch.testing.assert_close(dec.logits, model(x).detach())
    _conserves(dec, 1)


class _TwoBranchGate(nn.Module):
    """GLU-style gating of two full maps: neither factor is computed from the other."""

    def __init__(self, gate_first: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.gate_first = gate_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_first:
            g = torch.sigmoid(self.b(x))
            h = torch.relu(self.a(x))
        else:
            h = torch.relu(self.a(x))
            g = torch.sigmoid(self.b(x))
        return self.fc((h * g).mean((2, 3)))


@pytest.mark.parametrize("gate_first", [True, False])
def test_products_whose_factors_have_no_gate_role_are_refused(gate_first: bool) -> None:
    """Taking the later map as the gate made the map depend on statement order alone."""
    with pytest.raises(UnsupportedModelError, match="not a gate"):
        ierf.SRD(_TwoBranchGate(gate_first).eval()).saliency(torch.randn(1, 3, 8, 8), 1)


def test_an_activation_written_as_a_product_points_to_register_activation() -> None:
    class ManualSiLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc((h * torch.sigmoid(h)).mean((2, 3)))

    with pytest.raises(UnsupportedModelError, match="register_activation"):
        ierf.SRD(ManualSiLU().eval()).saliency(torch.randn(1, 3, 8, 8), 1)


def test_input_channels_of_a_convolution_called_as_a_function() -> None:
    class SameConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, self.weight, self.bias, 1, 1)

    model = nn.Sequential(SameConv(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    explainer = ierf.SRD(model)
    _conserves(explainer.decompose(torch.randn(1, 3, 8, 8)), 1)
    with pytest.raises(ValueError, match="3 channels, got 4"):
        explainer.saliency(torch.randn(1, 4, 8, 8), 1)


def test_mean_contrast_of_a_one_position_start_map_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    dec = ierf.SRD(model).decompose(torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="one position"):
        dec.saliency(1, contrast="mean")


def test_calls_outside_the_contract_get_value_or_type_errors_that_say_what_to_do() -> None:
    """Found by review: a mean over every dimension escaped as a raw TypeError, an unchecked state without
    its keys as KeyError, and a gradient head asked of a default decomposition did not say how to get it."""

    class MeanAll(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)).mean().reshape(1, 1) * torch.ones(1, 2)

    with pytest.raises(UnsupportedModelError, match="mean over every dimension"):
        ierf.SRD(MeanAll().eval()).saliency(torch.randn(1, 3, 6, 6), 0)

    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).eval()
    srd = ierf.SRD(model)
    with pytest.raises(ValueError, match=r"not a decomposition state: missing \['head.bias'"):
        srd.load_decomposition({"schema": torch.tensor([1]), "shapes": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(TypeError, match="dict of tensors"):
        srd.load_decomposition([torch.zeros(1)])  # type: ignore[arg-type]
    dec = srd.decompose(torch.randn(1, 3, 8, 10))
    with pytest.raises(ValueError, match=r"decompose\(x, keep=\['"):
        dec.saliency(1, head="gradcam")


def test_a_map_that_overflows_float32_is_refused_not_returned_as_nan() -> None:
    """A PFV norm above ~1.8e19 squares past float32's range: the ratios became NaN and so did the map,
    with a finite logit (found by review). The float64 copy the message suggests gives the map."""
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).eval()
    x = torch.randn(1, 3, 8, 10) * 1e20
    assert bool(torch.isfinite(model(x)).all())
    with pytest.raises(ValueError, match=r"largest magnitude.*float64 copy"):
        ierf.SRD(model).saliency(x, 1)
    dec = ierf.SRD(model.double()).decompose(x.double())
    _conserves(dec, 1, rtol=1e-6)


# -- engine review follow-ups (autocast, unchecked states, tensors without values, argument forms) -------------
@pytest.fixture(scope="module")
def resnet18_64():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    return model, ierf.SRD(model), torch.randn(2, 3, 64, 64)


def test_autocast_around_a_call_changes_nothing(resnet18_64) -> None:
    """Under a caller's ``torch.autocast`` the ratio products mixed bfloat16 and float32 and failed with
    torch's "expected m1 and m2 to have the same dtype"."""
    _, explainer, x = resnet18_64
    expected = explainer.saliency(x, 3)
    erf = explainer.ierf(x, "layer3", torch.tensor([[1, 2]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(explainer.saliency(x, 3), expected)
        torch.testing.assert_close(explainer.ierf(x, "layer3", torch.tensor([[1, 2]])), erf)
    assert not torch.is_autocast_enabled("cpu")


def test_a_state_that_is_not_this_models_is_refused_without_a_layout(resnet18_64) -> None:
    """Without ``like=`` a state with a stage missing gave a map 1e-3 off, another ResNet's state was
    accepted, and a route to a map that does not exist ended in a KeyError."""
    _, explainer, x = resnet18_64
    dec = explainer.decompose(x, keep=["layer3"])
    state = dec.state_dict()
    torch.testing.assert_close(explainer.load_decomposition(dict(state)).saliency(3), dec.saliency(3))
    missing = {k: v for k, v in state.items() if not k.startswith("stage.3.")}
    with pytest.raises(ValueError, match="17 stages"):
        explainer.load_decomposition(missing)
    other = ierf.SRD(torchvision.models.resnet34(weights=None).eval()).decompose(x[:1]).state_dict()
    with pytest.raises(ValueError, match="PFV maps"):
        explainer.load_decomposition(other)
    routes = {k: v.clone() for k, v in state.items()}
    routes["stage.2.routes"][0, 0] = 999
    with pytest.raises(ValueError, match="path from map 999"):
        explainer.load_decomposition(routes)
    with pytest.raises(ValueError, match=r"'stage.0.mu' is \(2, "):
        explainer.load_decomposition({**state, "logits": state["logits"][:1]})
    with pytest.raises(ValueError, match="several dtypes"):
        explainer.load_decomposition({**state, "stage.1.mu": state["stage.1.mu"].double()})
    with pytest.raises(ValueError, match="names no PFV map"):
        explainer.load_decomposition({**state, "activation.99": state["logits"]})


def test_a_state_is_checked_where_it_is_read_then_moved(resnet18_64, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device=``: checked where it was read (the CPU: numpy's fast path), then moved; with ``like=`` that
    exact check is the only one (the structural one cost a Redis hit another 1.4 ms)."""
    from ierf.srd import explainer as module
    from ierf.srd.explainer import StateLayout

    _, explainer, x = resnet18_64
    dec = explainer.decompose(x)
    layout = StateLayout.of(dec)
    monkeypatch.setattr(module, "_check_state_structure", lambda *args: pytest.fail("checked twice"))
    moved_to: list[object] = []
    real_to = torch.Tensor.to

    def to(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        moved_to.append(args[0] if args else kwargs.get("device"))
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    loaded = explainer.load_decomposition(dec.state_dict(), like=layout, device=x.device)
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert len(moved_to) == len(dec.state_dict()) and set(moved_to) == {x.device}  # every entry, after the check
    with pytest.raises(TypeError):  # device= on what is no state: from_state's own error, not an AttributeError
        explainer.load_decomposition([torch.zeros(1)], device=x.device)  # type: ignore[arg-type]
    torch.testing.assert_close(loaded.saliency(3), dec.saliency(3))
    with pytest.raises(ValueError, match="holds NaN"):
        bad = {**dec.state_dict(), "logits": torch.full_like(dec.logits, float("nan"))}
        explainer.load_decomposition(bad, like=layout, device=x.device)


def test_tensors_without_values_are_refused_by_name(resnet18_64) -> None:
    _, explainer, x = resnet18_64
    with pytest.raises(ValueError, match="meta device"):
        explainer.saliency(x.to("meta"), 3)
    with pytest.raises(TypeError, match="dense tensor"):
        explainer.saliency(x.to_sparse(), 3)
    with pytest.raises(ValueError, match="target is on the meta device"):
        explainer.saliency(x, torch.tensor([3, 4], device="meta"))
    with pytest.raises(ValueError, match="positions is on the meta device"):
        explainer.ierf(x, "layer2", torch.tensor([[1, 1]], device="meta"))


def test_argument_forms(resnet18_64) -> None:
    model, explainer, x = resnet18_64
    dec = explainer.decompose(x, keep="layer3")  # one name, not its letters ("unknown layer 'l'")
    assert list(dec.activations) == [explainer.program.source_id("layer3")]
    torch.testing.assert_close(dec.saliency(3, contrast=torch.tensor(7)), dec.saliency(3, contrast=7))
    with pytest.raises(ValueError, match="head must be one of"):
        dec.saliency(3, head="")  # was taken as the default head
    with pytest.raises(ValueError, match="contrast class 3 is the target of image 0"):
        dec.saliency(3, contrast=3)  # a map of zeros otherwise
    assert explainer.layer_shape("layer3", (np.int64(64), np.int64(64))) == (256, 4, 4)
    with pytest.raises(ValueError, match="two positive ints"):
        explainer.layer_shape("layer3", 64)
    with pytest.raises(ValueError, match="1x1 at this input size"):
        explainer.saliency(torch.randn(1, 3, 32, 32), 3, contrast="mean")
    with pytest.raises(UnsupportedModelError, match=r"\.module"):
        ierf.SRD(nn.DataParallel(model))

    class NoParameters(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x).mean((2, 3))

    assert ierf.SRD(NoParameters().eval()).layer_shape("relu", (8, 8)) == (3, 8, 8)  # was StopIteration


# -- review of the tracing restore: what it must leave alone -----------------------------------------------
def test_a_non_persistent_buffer_registered_on_the_first_call_stays_non_persistent() -> None:
    """Restoring every set put the module's own ``_non_persistent_buffers_set`` back: the buffer then
    showed up in state_dict and a fresh model could not load it."""

    class LazyScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not hasattr(self, "scale"):
                self.register_buffer("scale", torch.full((4, 1, 1), 2.0), persistent=False)
            return self.fc(torch.relu(self.conv(x) + self.scale).mean((2, 3)))

    model = LazyScale().eval()
    explainer = ierf.SRD(model)
    assert "scale" in model._non_persistent_buffers_set and "scale" not in model.state_dict()
    LazyScale().load_state_dict(model.state_dict())
    _conserves(explainer.decompose(torch.randn(1, 3, 8, 8)), 1)


@pytest.mark.parametrize("kind", ["attribute", "non-persistent buffer"])
def test_a_gradient_head_reading_a_tensor_under_a_submodule_leaves_that_submodule_alone(kind: str) -> None:
    """The head module, built from a dict of the names it reads, installed ``fc.offset`` on the caller's
    own ``fc``: a KeyError for a plain tensor attribute, a buffer in the caller's state_dict otherwise."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 5)
            if kind == "attribute":
                self.fc.offset = torch.linspace(0, 1, 5)
            else:
                self.fc.register_buffer("offset", torch.linspace(0, 1, 5), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1)) + self.fc.offset

    model = Net().eval()
    before = set(model.state_dict())
    maps = ierf.SRD(model, head="gradcam").saliency(torch.randn(1, 3, 4, 4), 2)
    assert maps.shape == (1, 4, 4) and set(model.state_dict()) == before
    assert set(vars(model.fc)) == set(vars(Net().fc))


def test_unusual_containers_on_the_model_trace_and_come_back_unchanged() -> None:
    """An OrderedDict subclass whose constructor takes arguments made ``.copy()`` fail; a dict keyed by
    tensors made the comparison raise ("Boolean value of Tensor ... is ambiguous")."""
    from collections import OrderedDict

    class Registry(OrderedDict):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    key = torch.zeros(2)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)
            self.registry = Registry("features")
            self.by_tensor = {key: "zero"}
            self.pair = ([], 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            self.registry["h"] = h
            self.pair[0].append(h)  # a list inside a tuple
            return self.fc(h.mean((2, 3)))

    model = Holder().eval()
    ierf.SRD(model)
    assert list(model.registry) == [] and model.registry.name == "features"
    assert list(model.by_tensor) == [key] and model.pair[0] == []


def _x(shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- geometry of rarely used spellings: logits of the decomposition = the model's own, maps = reference ----
class _SamePadEven(nn.Module):
    """padding='same' with an even kernel: PyTorch puts the extra row/column at the bottom/right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 4, padding="same")
        self.conv2 = nn.Conv2d(5, 4, (2, 3), padding="same", bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv1(x)))).mean((2, 3)))


class _AsymmetricFPad(nn.Module):
    """F.pad with four different sides: (left, right, top, bottom) in torch's order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3)
        self.conv2 = nn.Conv2d(5, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.act(self.conv1(F.pad(x, (1, 0, 2, 0))))
        return self.fc(self.act(self.conv2(F.pad(a, (0, 2, 1, 0)))).mean((2, 3)))


class _FunctionalAvgPool(nn.Module):
    """F.avg_pool2d(x, 2) without a stride: the stride is the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 3)  # unpadded: folded with the pooling into one kernel
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.act(self.conv1(x))
        return self.fc(self.act(self.conv2(F.avg_pool2d(a, 2))).mean((2, 3)))


GEOMETRY = {
    "same_even": (_SamePadEven, (7, 9)),
    "fpad": (_AsymmetricFPad, (7, 9)),
    "avgpool": (_FunctionalAvgPool, (8, 10)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("name", list(GEOMETRY))
def test_rare_padding_and_pooling_spellings_match_the_model_and_the_reference(name):
    """Spellings the torchvision zoo never uses still decompose the model's own function: the logits equal
    the model's and the maps the reference's (an extra padding row on the wrong side shifts every map)."""
    torch.manual_seed(0)
    net, hw = GEOMETRY[name]
    model = net().double().eval()
    x = _x((1, 3, *hw), seed=1)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)  # the decomposed value IS the model's
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


# ---- gradient start maps (head="gradcam" / contrast="mean"), computed independently from the model ----------
class _VGGish(nn.Module):
    """Fully connected head after a max-pool: head='auto' starts from Grad-CAM on features.1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(6 * 4 * 5, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _gradcam_by_hand(model: _VGGish, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, clamped) TorchRay Grad-CAM at the ReLU after features.0, from the model's own autograd."""
    a = model.features[1](model.features[0](x)).detach().requires_grad_(True)
    logits = model.classifier(torch.flatten(model.features[2](a), 1))
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), a)
    raw = (grad.mean((2, 3), keepdim=True) * a).sum(1).detach()
    return raw, raw.clamp_min(0)


def test_gradcam_start_map_is_the_clamped_grad_cam_and_its_mean_contrast_is_spatial():
    """The default start for fully connected heads is the published code's ReLU-clamped Grad-CAM: checked
    against Grad-CAM computed here from the model's own autograd, not against the engine's helpers."""
    torch.manual_seed(0)
    model = _VGGish().double().eval()
    x = _x((2, 3, 8, 10), seed=2)
    target = torch.tensor([1, 3])
    raw, expected = _gradcam_by_hand(model, x, target)
    assert bool((raw < 0).any()) and bool((raw > 0).any()), "the clamp must matter for this check to bite"
    dec = ierf.SRD(model).decompose(x)
    assert dec._resolve_head("auto") == "gradcam"
    start = dec.layer_relevance("features.1", target)
    torch.testing.assert_close(start, expected, atol=1e-12, rtol=1e-10)
    mean = dec.layer_relevance("features.1", target, contrast="mean")
    torch.testing.assert_close(mean, expected - expected.mean((1, 2), keepdim=True), atol=1e-12, rtol=1e-10)
    # the pixel map is the same start map pushed down: the mean contrast's pixel map sums to zero per image
    assert dec.relevance(target, contrast="mean").sum((1, 2)).abs().max() < 1e-10


# ---- all-zero pre-activations and paths that contribute nothing (spec §2.2, §9.2) ---------------------------
class _DeadPatch(nn.Module):
    """A strongly negative stem bias kills every channel around a zero input patch; the bias-free 1x1 and
    3x3 convolutions after it then have pre-activations that are exactly zero there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 1, bias=False)
        self.conv3 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a1 = self.act1(self.conv1(x))
        return self.fc(self.act3(self.conv3(self.act2(self.conv2(a1)))).mean((2, 3)))


class _DeadShortcut(nn.Module):
    """A residual block whose 1x1 shortcut (with its batch-norm shift) reads PFVs that are all zero where the
    3x3 main branch still sees live neighbours: the shortcut contributes nothing there and cannot carry its
    branch's bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.main = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn_main = nn.BatchNorm2d(6)
        self.short = nn.Conv2d(4, 6, 1, bias=False)
        self.bn_short = nn.BatchNorm2d(6)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a1 = self.act1(self.conv1(x))
        return self.fc(self.act2(self.bn_main(self.main(a1)) + self.bn_short(self.short(a1))).mean((2, 3)))


def _dead_input(net: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomise_bn(net()).double().eval()
    with torch.no_grad():
        model.conv1.bias.fill_(-1.0)
    x = 3 * _x((1, 3, 11, 12), seed=4)
    x[:, :, 2:9, 3:10] = 0
    return model, x


def test_all_zero_pre_activations_get_ratio_zero_in_maps_and_ierfs():
    """Spec §2.4: ratio 0 onto an all-zero pre-activation, in single-path and kernel stages alike; a ratio
    of 1 (or 1/n) would leak an iERF's mass into pixels that built nothing."""
    model, x = _dead_input(_DeadPatch)
    z2 = model.conv2(model.act1(model.conv1(x)))
    z3 = model.conv3(model.act2(z2))
    dead2, dead3 = (z2[0] == 0).all(0), (z3[0] == 0).all(0)
    assert int(dead2.sum()) >= 4 and int(dead3.sum()) >= 1  # exact zeros in a single-path and a k x k stage
    srd = ierf.SRD(model, head="exact")
    dec = srd.decompose(x)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    assert_matches_reference(dec, ref, dec_ref, (0, 2), 1e-9)  # finite, and equal to the reference
    positions = dead2.nonzero()
    maps = dec.ierf("act2", positions).double()[0]
    sid = srd.program.source_id("act2")
    w = dead2.shape[1]
    for i, (r, c) in enumerate(positions.tolist()):
        seed = torch.zeros(dead2.numel(), dtype=torch.float64)
        seed[r * w + c] = 1
        slow = ref.propagate(dec_ref, {sid: seed})[0].view(maps.shape[1:])
        torch.testing.assert_close(maps[i], slow, atol=1e-9, rtol=0)
    # a PFV that is its (absent) bias alone has no contributor: its iERF carries nothing (ratio 0 onto z = 0)
    assert bool((maps == 0).all())


def test_a_shortcut_that_contributes_nothing_carries_none_of_its_bias():
    """A branch's bias is shared by contribution norm, so a path with zero contribution gets none of it."""
    model, x = _dead_input(_DeadShortcut)
    a1 = model.act1(model.conv1(x))[0]
    dead = (a1 == 0).all(0)
    live_window = F.max_pool2d((~dead).double()[None, None], 3, 1, 1)[0, 0] > 0
    assert bool((dead & live_window).any()), "no position where only the shortcut contributes nothing"
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


# ---- argument validation --------------------------------------------------------------------------------------
def test_negative_ierf_positions_are_refused_not_wrapped():
    """Python indexing would read -1 as the last row: an iERF of another PFV, silently."""
    torch.manual_seed(0)
    dec = ierf.SRD(_VGGish().double().eval()).decompose(_x((1, 3, 8, 10)))
    for bad in ([-1, 0], [0, -1], [-8, 2]):
        with pytest.raises(ValueError, match=r"outside the 8x10 PFV grid"):
            dec.ierf("features.1", torch.tensor([bad]))


def test_a_failed_differentiable_cam_call_leaves_no_hook_on_the_model():
    """differentiable_saliency runs outside model_guard (the attack owns the model state), so the capture's own
    try/finally is all that removes its hook when the forward raises."""
    from ierf.baselines.cam import GradCAMExplainer

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    cam = GradCAMExplainer(model)
    with pytest.raises(RuntimeError):
        cam.differentiable_saliency(torch.randn(1, 2, 8, 8), 1)  # two channels: the first conv raises
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- the reference's own coverage: a dilated max-pool merged into the next convolution ----------------------
class _DilatedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1), dilation=(2, 1))
        self.conv2 = nn.Conv2d(5, 4, 3)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.pool(self.act1(self.conv1(x))))).mean((2, 3)))


def test_a_dilated_max_pool_matches_the_reference():
    """The reference's own coverage: a dilated, strided, padded max-pool merged into the next convolution."""
    torch.manual_seed(0)
    model = _DilatedPool().double().eval()
    x = _x((1, 3, 9, 11), seed=5)
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


class _TwoBranchStem(nn.Module):
    """Two branches from the pixels into one pre-activation: a 3x3 convolution and a 1x1 convolution, each
    with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(3, 4, 3, padding=1)
        self.narrow = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.wide(x) + self.narrow(x)).mean((2, 3)))


def _two_branch_map_by_hand(model: _TwoBranchStem, x: torch.Tensor, target: int) -> torch.Tensor:
    """Spec §2.2-2.4 written out tap by tap, sharing no code with the engine or ReferenceSRD: the CAM-plus-bias
    head start, each branch's bias shared among that branch's own contributors by contribution norm, ratios
    <C + b, z> / ||z||^2, padding contributing nothing."""
    _, _, height, width = x.shape
    z = (model.wide(x) + model.narrow(x))[0]
    start = (model.fc.weight[target] @ model.act(z).flatten(1) + model.fc.bias[target]) / (height * width)
    pixels = torch.zeros(height, width, dtype=x.dtype)
    for row in range(height):
        for col in range(width):
            z_q = z[:, row, col]
            if not z_q.any():
                continue
            taps = []  # (source pixel, contribution) of the 3x3 branch
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    r, c = row + dy, col + dx
                    if 0 <= r < height and 0 <= c < width:
                        taps.append(((r, c), model.wide.weight[:, :, dy + 1, dx + 1] @ x[0, :, r, c]))
            norms = [contribution.norm() for _, contribution in taps]
            shared = [
                (source, contribution + model.wide.bias * norm / sum(norms))
                for (source, contribution), norm in zip(taps, norms, strict=True)
            ]
            shared.append(((row, col), model.narrow.weight[:, :, 0, 0] @ x[0, :, row, col] + model.narrow.bias))
            relevance = start[row * width + col]
            for (r, c), contribution in shared:
                pixels[r, c] += relevance * (contribution @ z_q) / (z_q @ z_q)
    return pixels


def test_each_branch_shares_its_own_bias_by_contribution_norm_as_written_by_hand() -> None:
    """The bias rule changes maps by several per cent, and the reference could share a slip with the fast
    path: this map is computed from the spec's formulas alone."""
    torch.manual_seed(0)
    model = _TwoBranchStem().double().eval()
    with torch.no_grad():
        model.wide.bias.normal_(0, 2.0)  # biases large enough that their sharing moves the map
        model.narrow.bias.normal_(0, 2.0)
    x = _x((1, 3, 5, 6), seed=3)
    with torch.no_grad():
        expected = _two_branch_map_by_hand(model, x, 2)
        logit = float(model(x)[0, 2])
    got = ierf.SRD(model, head="exact").saliency(x, 2)[0].double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert float(expected.sum()) == pytest.approx(logit, rel=1e-9)  # conservation, by hand too


# ---- round-5 mutation gaps: rules that silently change the model's function if slipped -----------------------
class _WidthOnlyFPad(_AsymmetricFPad):
    """F.pad with a 2-tuple pads the last dimension (width) only."""

    def forward(self, x):
        a = self.act(self.conv1(F.pad(x, (1, 2))))
        return self.fc(self.act(self.conv2(a)).mean((2, 3)))


class _OddChunk(nn.Module):
    """x.chunk(2, dim=1) of 5 channels: torch gives 3 + 2 channels (equal pieces, the last one smaller)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv_p = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        p, q = self.act(self.conv1(x)).chunk(2, dim=1)
        y = torch.cat([self.act(self.conv_p(p)), q], 1)
        return self.fc(self.act(self.conv2(y)).mean((2, 3)))


class _AdaptiveNoneHeight(nn.Module):
    """AdaptiveAvgPool2d((None, 1)) keeps the height (6) and pools the width (4) on a non-square map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.conv2 = nn.Conv2d(5, 4, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.pool(self.act(self.conv1(x))))).mean((2, 3)))


class _GateOnBiasedMap(nn.Module):
    """A squeeze-excitation gate multiplying a batch-normalised PFV map (BN after the activation): the BN
    shift is a bias of the gated map, which the gate scales like the rest of the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.excite = nn.Conv2d(4, 4, 1)
        self.gate = nn.Sigmoid()
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        m = self.bn(self.act(self.conv1(x)))
        g = self.gate(self.excite(F.adaptive_avg_pool2d(m, 1)))
        return self.fc(self.act(m * g).mean((2, 3)))


class _DilatedAfterBiasedMap(nn.Module):
    """BN after the activation, then a dilated convolution: the BN shift is a bias the dilated kernel reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.bn(self.act(self.conv1(x))))).mean((2, 3)))


class _OneRowFlatten(nn.Module):
    """A one-row (C, 1, W) map flattened into a Linear: C*W features, not a (B, C) vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 7, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv1(x)), 1))


RULE_GAPS = {
    "dilated_after_biased_map": (_DilatedAfterBiasedMap, (6, 7)),
    "one_row_flatten": (_OneRowFlatten, (1, 7)),
    "fpad_width_only": (_WidthOnlyFPad, (6, 7)),
    "odd_chunk": (_OddChunk, (6, 7)),
    "adaptive_none_height": (_AdaptiveNoneHeight, (6, 4)),
    "gate_on_biased_map": (_GateOnBiasedMap, (6, 7)),
}


@pytest.mark.parametrize("name", list(RULE_GAPS))
def test_rarely_used_rule_arguments_decompose_the_models_own_function(name: str) -> None:
    """A 2-tuple F.pad (width only), an odd chunk (3 + 2 channels), AdaptiveAvgPool2d((None, 1)) (the height
    kept), a gate on a biased map (its bias gated too), a dilated kernel reading a bias and a flattened
    one-row map: a slip in any of these rules still runs or fails late on another function, so the logits
    must be the model's and the maps the reference's."""
    torch.manual_seed(0)
    net, hw = RULE_GAPS[name]
    model = randomise_bn(net()).double().eval()
    x = _x((1, 3, *hw), seed=2)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


class _Spelled(nn.Module):
    """conv -> ReLU -> ``op`` -> global mean -> linear, for spellings the rules must refuse."""

    def __init__(self, op, conv: nn.Conv2d | None = None) -> None:
        super().__init__()
        self.conv = conv if conv is not None else nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.op = op
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.act(self.conv(x))
        return self.fc(self.op(self, a))


REFUSED = {
    "avg_pool_excluding_row_padding": (
        lambda m, a: F.avg_pool2d(a, 3, 1, (1, 0), count_include_pad=False).mean((2, 3)),
        None,
        r"padding excluded from the count",
    ),
    "add_with_alpha": (lambda m, a: torch.add(a, m.conv2(a), alpha=0.5).mean((2, 3)), None, r"alpha=0.5"),
    "mean_over_the_width_only": (
        lambda m, a: a.mean(3).mean(2),
        None,
        r"mean over one spatial dim .*both spatial dims at once",
    ),
    "strided_channel_slices": (
        lambda m, a: torch.cat([a[:, ::2], a[:, 1::2]], 1).mean((2, 3)),
        None,
        r"indexing a feature map",
    ),
    "reflect_padding": (
        lambda m, a: a.mean((2, 3)),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        r"padding_mode='reflect'",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_spellings_that_change_the_arithmetic_are_refused(name: str) -> None:
    """Average pooling that leaves padding out of the count along one axis only, torch.add(..., alpha=),
    a mean over one spatial dimension, channel slices with a step and a reflect-padded convolution each
    compute something the rules do not model: decomposing them as the plain op would explain another
    function, so they are refused."""
    op, conv, message = REFUSED[name]
    torch.manual_seed(0)
    model = _Spelled(op, conv).double().eval()
    x = _x((1, 3, 6, 7), seed=3)
    with pytest.raises(UnsupportedModelError, match=message):
        ierf.SRD(model, head="exact").decompose(x)


@pytest.mark.parametrize("spelling", ["module", "function"])
def test_in_place_relus_keep_maps_differentiable(spelling: str) -> None:
    """ReLU(inplace=True) and F.relu(..., inplace=True) applied to a pre-activation that is part of the
    autograd graph (maps differentiated for a manipulation attack) must work on a copy: in place, they
    overwrite a tensor the backward pass of the stage's ratios still needs."""
    torch.manual_seed(0)
    if spelling == "module":
        model = _Spelled(lambda m, a: m.act(m.conv2(a)).mean((2, 3))).double().eval()
        model.act = nn.ReLU(inplace=True)
    else:
        model = _Spelled(lambda m, a: F.relu(m.conv2(a), inplace=True).mean((2, 3))).double().eval()
    x = _x((1, 3, 6, 7), seed=5).requires_grad_(True)
    saliency = ierf.SRD(model, head="exact").saliency(x, 1)
    (grad,) = torch.autograd.grad(saliency.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_one_explainer_folds_uneven_pooling_for_each_input_size() -> None:
    """The uneven adaptive pooling folded into the Linear weight depends on the map size: an explainer used
    at two input sizes (same pooled size, 3x3) must not reuse the first size's folded kernel."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(3)
            self.fc = nn.Linear(36, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))

    model = Head().double().eval()
    srd = ierf.SRD(model, head="exact")
    for hw in ((5, 5), (4, 4)):
        x = _x((1, 3, *hw), seed=6)
        with torch.no_grad():
            torch.testing.assert_close(srd.decompose(x).logits, model(x), atol=1e-12, rtol=1e-12)


def test_reference_ierf_seeds_the_row_major_position() -> None:
    """ReferenceSRD.ierf is the audit oracle for iERFs: at (row, col) off the diagonal of a non-square map
    it must agree with the fast path (a transposed seed index picks another position)."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: m.act(m.conv2(a)).mean((2, 3))).double().eval()
    x = _x((1, 3, 5, 7), seed=7)
    fast = ierf.SRD(model, head="exact").decompose(x).ierf("act:0", torch.tensor([[1, 4]])).double()[0, 0]
    slow = ReferenceSRD(model).ierf(x, "act:0", (1, 4))
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max() + 1e-7, rtol=0)


# ---- mutation round 6: the engine core (ratios, explainer) --------------------------------------------------
class _BiasedShortcut(nn.Module):
    """A residual block whose 1x1 shortcut has a conv bias and a batch norm: one single-tap path that owns two
    biases (the scaled conv bias and the BN shift) in a stage with a 3x3 main branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.main = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn_main = nn.BatchNorm2d(6)
        self.short = nn.Conv2d(4, 6, 1)
        self.bn_short = nn.BatchNorm2d(6)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.act1(self.conv1(x))
        return self.fc(self.act2(self.bn_main(self.main(a1)) + self.bn_short(self.short(a1))).mean((2, 3)))


def test_a_single_tap_path_that_owns_two_biases_carries_both() -> None:
    """Guards against keeping only the last of a one-tap path's biases (a 1x1 conv bias then its BN shift):
    the stage's ratios would no longer sum to 1 and the map would not conserve the logit."""
    torch.manual_seed(0)
    model = randomise_bn(_BiasedShortcut()).double().eval()
    with torch.no_grad():
        model.short.bias.uniform_(-1.0, 1.0)
        model.conv1.bias.fill_(3.0)  # every first-layer PFV stays live: each path contributes everywhere
    x = _x((1, 3, 7, 8), seed=1)
    dec = ierf.SRD(model, head="exact").decompose(x)
    total = dec.stages[1].mu.sum(1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-9, rtol=0)
    _conserves(dec, 2, rtol=1e-9)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


def test_a_float16_model_keeps_float16_ratios_and_reloads_its_own_state() -> None:
    """Guards against handing back the float32 working ratios of a float16 stage: the decomposition would mix
    dtypes and its own state_dict would be refused by load_decomposition ("several dtypes")."""
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).half().eval()
    x = torch.randn(1, 3, 16, 16).half()
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    assert {stage.mu.dtype for stage in dec.stages} == {torch.float16}
    again = srd.load_decomposition(dec.state_dict())
    torch.testing.assert_close(again.saliency(1), dec.saliency(1), atol=0, rtol=0)


class _SmoothFC(nn.Module):
    """A smooth VGG-style net (SiLU, fully connected head): its gradient start map is differentiable in x."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.fc1, self.act_fc, self.fc2 = nn.Linear(4 * 6 * 6, 7), nn.Softplus(), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fc(self.fc1(torch.flatten(self.act(self.conv(x)), 1))))


def test_a_gradient_head_start_map_is_differentiated_through_its_gradient() -> None:
    """Guards against taking the start map's gradient without create_graph: d(map)/dx would treat the head's
    gradient as a constant and manipulation attacks would follow a wrong derivative."""
    torch.manual_seed(0)
    model = _SmoothFC().double().eval()
    srd = ierf.SRD(model, head="grad_x_act")
    x = _x((1, 3, 6, 6), seed=3)
    direction = _x((1, 3, 6, 6), seed=4)

    def loss_at(inp: torch.Tensor) -> torch.Tensor:
        return srd.decompose(inp).relevance(1).square().sum()

    analytic, numeric = directional_derivatives(loss_at, x, direction, eps=1e-4)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_a_reloaded_decomposition_keeps_the_explainers_head() -> None:
    """Guards against from_state dropping the head mode: a state cached by SRD(model, head='grad_x_act') came
    back as an 'auto' decomposition and gave the clamped Grad-CAM map instead."""
    torch.manual_seed(0)
    model = _VGGish().double().eval()
    srd = ierf.SRD(model, head="grad_x_act")
    dec = srd.decompose(_x((1, 3, 8, 10), seed=2))
    again = srd.load_decomposition(dec.state_dict())
    assert again.head_mode == "grad_x_act"
    assert not torch.equal(dec.relevance(1), dec.relevance(1, head="gradcam")), "the heads must differ here"
    torch.testing.assert_close(again.relevance(1), dec.relevance(1), atol=0, rtol=0)


def test_a_state_whose_stage_reads_a_later_map_is_refused() -> None:
    """Guards against checking stage routes against every map instead of the maps before the stage: relevance
    sent to a later, already processed map is silently lost (the map stops conserving the logit)."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    state = srd.decompose(_x((1, 3, 16, 16))).state_dict()
    bad = {k: v.clone() for k, v in state.items()}
    bad["stage.1.routes"][0, 0] = 3  # stage 1 ends at map 2: map 3 comes after it
    with pytest.raises(ValueError, match="path from map 3"):
        srd.load_decomposition(bad)


def test_layer_shape_reads_the_input_size_as_height_then_width() -> None:
    """Guards against (height, width) read the wrong way round: a non-square input's layer grid came back
    transposed (the service sizes iERF position checks from it)."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    assert srd.layer_shape("features.4", (16, 32)) == (6, 8, 16)
    assert srd.decompose(_x((1, 3, 16, 32))).layer_shape("features.4") == (6, 8, 16)


class _GroupedFunctionalStem(nn.Module):
    """The first convolution is F.conv2d with groups=2: it reads 2 x weight.shape[1] = 4 input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(F.conv2d(x, self.w, None, 1, 1, 1, 2)).mean((2, 3)))


def test_the_input_channels_of_a_grouped_functional_stem_count_every_group() -> None:
    """Guards against reading a functional first convolution's in-channels from its weight alone: with
    groups=2 a valid 4-channel input was refused ("x must have 2 channels")."""
    torch.manual_seed(0)
    model = _GroupedFunctionalStem().double().eval()
    x = _x((1, 4, 6, 6))
    saliency = ierf.SRD(model).saliency(x, 1)
    assert saliency.shape == (1, 6, 6)
    torch.testing.assert_close(saliency.sum().double(), model(x)[0, 1], rtol=1e-5, atol=1e-6)


def test_a_class_contrast_on_a_gradient_head_is_target_minus_that_class() -> None:
    """Guards against the gradient start's class contrast taken the other way round (other minus target):
    every pixel's sign flips, silently."""
    torch.manual_seed(0)
    model = _VGGish().double().eval()
    dec = ierf.SRD(model, head="grad_x_act").decompose(_x((2, 3, 8, 10), seed=2))
    target, other = torch.tensor([1, 3]), 4
    contrast = dec.layer_relevance("features.1", target, contrast=other)
    plain = dec.layer_relevance("features.1", target) - dec.layer_relevance("features.1", torch.tensor([4, 4]))
    torch.testing.assert_close(contrast, plain, atol=1e-12, rtol=0)


class _ConcatHead(nn.Module):
    """Logits from two 1x1 convolution heads side by side (torch.cat, then the spatial mean): the second
    head's terms and bias start at class 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head_a, self.head_b = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.conv(x))
        return torch.cat([self.head_a(f), self.head_b(f)], 1).mean((2, 3))


def test_a_head_of_concatenated_layers_conserves_every_logit() -> None:
    """Guards against placing a head term's (or bias's) classes at 0 instead of its channel offset: the
    classes of the second head would get the first head's contributions."""
    torch.manual_seed(0)
    dec = ierf.SRD(_ConcatHead().double().eval()).decompose(_x((1, 3, 6, 7)))
    for target in range(5):
        _conserves(dec, target, rtol=1e-9)


class _ConcatLinearHeads(_ConcatHead):
    """The same two heads as nn.Linear layers on the pooled features, their (B, K) logits concatenated
    (along dim -1 here, which for vectors is the class dimension)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_a, self.head_b = nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.conv(x)).mean((2, 3))
        return torch.cat([self.head_a(f), self.head_b(f)], -1)


def test_logits_concatenated_from_linear_heads_are_explained_class_by_class() -> None:
    """Concatenated (B, K) logits were refused as "(1, 5, 1, 1)" although the model returns (B, 5): a cat of
    vectors is a vector. Each class's map must sum to its logit and match the reference."""
    torch.manual_seed(0)
    model = _ConcatLinearHeads().double().eval()
    x = _x((1, 3, 6, 7), seed=1)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)
    for target in range(5):
        _conserves(dec, target, rtol=1e-9)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 3), 1e-9)


class _ConcatFlattened(_ConcatHead):
    """Flattened maps concatenated: their features interleave channels and positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 7 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.conv(x))
        return self.fc(torch.cat([f.flatten(1), f.flatten(1)], 1))


def test_a_concatenation_of_flattened_maps_is_refused_by_name() -> None:
    """A cat of flattened maps was decomposed as a channel concatenation and then failed as "input 6x7 does
    not fit this model" (a Linear expecting more features), blaming an input the model accepts."""
    model = _ConcatFlattened().double().eval()
    x = _x((1, 3, 6, 7))
    with torch.no_grad():
        assert model(x).shape == (1, 3)  # the model itself runs at this size
    with pytest.raises(UnsupportedModelError, match=r"'cat'.*torch\.cat of flattened maps"):
        ierf.SRD(model, head="exact").decompose(x)


# ---- round-7 mutation gaps: rarer rules whose slips leave a plausible map ------------------------------------
class _AdaptivePoolUnevenInWidthOnly(nn.Module):
    """AdaptiveAvgPool2d(2) on a 4x5 map: even windows down the height, uneven ones ([0, 3), [2, 5)) across
    the width, read by flatten + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


class _TwoMaps(nn.Module):
    """Two PFV maps (3 and 4 channels) concatenated: the second one's paths sit at channel offset 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def both(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.act(self.conv_a(x)), self.act(self.conv_b(x))], 1)


class _GateOnConcatenation(_TwoMaps):
    """A squeeze-excitation gate on a concatenation: the second map's channels take gates 3..6, not 0..3."""

    def __init__(self) -> None:
        super().__init__()
        self.excite = nn.Conv2d(7, 7, 1)
        self.gate = nn.Sigmoid()
        self.conv = nn.Conv2d(7, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.both(x)
        g = self.gate(self.excite(h.mean((2, 3), keepdim=True)))
        return self.fc(self.act(self.conv(h * g)).mean((2, 3)))


class _GroupedConvThenPointwise(nn.Module):
    """A grouped (not depthwise) 3x3 convolution + BN read by a 1x1 convolution without an activation
    between: folded into one kernel, in which group g's filters read input channels 4g..4g+3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 4, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.point = nn.Conv2d(4, 6, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        return self.fc(self.act(self.point(self.bn(self.grouped(a)))).mean((2, 3)))


class _SliceAcrossBiasedConcatenation(nn.Module):
    """Channels 2..4 of a concatenation of two biased convolutions: the slice takes the second bias's
    channels 0..1 (its own numbering), not the concatenation's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a = nn.Conv2d(4, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 3, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.conv0(x))
        y = torch.cat([self.conv_a(s), self.conv_b(s)], 1)
        return self.fc(self.act(y[:, 2:5]).mean((2, 3)))


class _FlattenedByView(nn.Module):
    """x.view(batch, C*H*W) with the feature count spelled out (older torchvision heads), then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        return self.fc(a.view(a.size(0), 4 * 5 * 6))


class _FunctionalMaxPoolWithoutStride(nn.Module):
    """F.max_pool2d(x, 2) without a stride: the stride is the kernel (torch's default), merged into the next
    convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(self.act(self.conv1(x)), 2)
        return self.fc(self.act(self.conv2(a)).mean((2, 3)))


RARE_RULES = {
    "functional_max_pool_without_stride": (_FunctionalMaxPoolWithoutStride, (6, 8)),
    "adaptive_uneven_in_width_only": (_AdaptivePoolUnevenInWidthOnly, (4, 5)),
    "gate_on_concatenation": (_GateOnConcatenation, (5, 6)),
    "grouped_conv_then_pointwise": (_GroupedConvThenPointwise, (5, 6)),
    "slice_across_biased_concatenation": (_SliceAcrossBiasedConcatenation, (5, 6)),
    "flattened_by_view": (_FlattenedByView, (5, 6)),
}


@pytest.mark.parametrize("name", list(RARE_RULES))
def test_rarer_rule_paths_decompose_the_models_own_function(name: str) -> None:
    """F.max_pool2d without a stride, an adaptive pooling uneven along one axis only, a gate on a
    concatenation (the second map at its channel offset), a grouped kernel folded with a following 1x1,
    a channel slice across two biases and a flatten spelled as view(B, C*H*W): a slip in any of these
    gives a map that still conserves its (wrong) logit or refuses a valid model, so the logits must be
    the model's and the maps the reference's."""
    torch.manual_seed(0)
    net, hw = RARE_RULES[name]
    model = randomise_bn(net()).double().eval()
    x = _x((1, 3, *hw), seed=4)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)


class _OneByOneBeforeTheHead(nn.Module):
    """A 6x6 PFV map, then a convolution covering it whole: the last PFV map before the head is 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 6)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act2(self.conv2(self.act1(self.conv1(x)))), 1))


def test_a_gradient_head_starts_on_the_last_map_with_more_than_one_position() -> None:
    """A 1x1 map is no spatial start for Grad-CAM (its map would be one number): the gradient head starts on
    the last map with several positions, and its map there is the clamped Grad-CAM of that map. Counting 1x1
    maps as spatial moved the start to act2 and gave another, still conserving, map."""
    torch.manual_seed(0)
    model = _OneByOneBeforeTheHead().double().eval()
    x = _x((2, 3, 6, 6), seed=5)
    explainer = ierf.SRD(model, head="gradcam")
    dec = explainer.decompose(x)
    assert explainer.program.names[dec.start_layer()] == "act1"
    a = model.act1(model.conv1(x)).detach().requires_grad_(True)
    score = model.fc(torch.flatten(model.act2(model.conv2(a)), 1))[:, 2].sum()
    (grad,) = torch.autograd.grad(score, a)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    torch.testing.assert_close(dec.layer_relevance("act1", 2), expected, atol=1e-12, rtol=1e-12)


def test_a_state_with_a_zero_column_stride_or_an_activation_of_another_batch_is_refused(resnet18_64) -> None:
    """Without ``like=`` the structure check reads every route's two strides (a zero column stride would
    divide by zero in the scatter) and every kept activation's batch size."""
    _, explainer, x = resnet18_64
    state = explainer.decompose(x, keep=["layer3"]).state_dict()
    routes = {k: v.clone() for k, v in state.items()}
    routes["stage.2.routes"][0, 2] = 0
    with pytest.raises(ValueError, match=r"strides \(1, 0\)"):
        explainer.load_decomposition(routes)
    key = next(k for k in state if k.startswith("activation."))
    with pytest.raises(ValueError, match=rf"'{key}' is \(1, "):
        explainer.load_decomposition({**state, key: state[key][:1]})


def test_average_pooling_in_ceil_mode_is_refused() -> None:
    """ceil_mode adds a last, partial window that torch averages over the cells inside the map only: the
    rule's zero-padded windows of fixed size would explain another function, so it is refused by name."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: F.avg_pool2d(a, 2, ceil_mode=True).mean((2, 3))).double().eval()
    with pytest.raises(UnsupportedModelError, match=r"ceil_mode"):
        ierf.SRD(model, head="exact").decompose(_x((1, 3, 5, 7), seed=3))


_MEAN, _STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class _Normalise(nn.Module):
    """Input normalisation as users put it in front of a torchvision model: ``(x - mean) / std``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD, dtype=torch.float64).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@pytest.mark.parametrize(
    "front",
    [
        pytest.param(_Normalise, id="functional"),
        pytest.param(lambda: torchvision.transforms.Normalize(_MEAN, _STD), id="torchvision"),
        pytest.param(lambda: torchvision.transforms.v2.Normalize(_MEAN, _STD), id="torchvision-v2"),
    ],
)
def test_a_normalising_module_in_front_of_the_model_is_decomposed(front: Callable[[], nn.Module]) -> None:
    """``nn.Sequential(Normalise(), model)`` is the usual way to feed raw [0, 1] pixels, and the README counts
    "constants added with broadcasting (per channel, ...)" among the rules: ``x + c`` and ``x * 0.5`` were
    decomposed, but ``x - mean`` was refused ("sub on a feature map") and so was ``/ std``; torchvision's
    Normalize could not even be traced. The same function as a depthwise 1x1 convolution (weight 1/std,
    bias -mean/std) is decomposed, and gives the map to expect."""
    torch.manual_seed(0)
    inner = randomise_bn(TinyResNet()).double().eval()
    spelled = nn.Sequential(front(), inner).double().eval()
    mean, std = torch.tensor(_MEAN, dtype=torch.float64), torch.tensor(_STD, dtype=torch.float64)
    as_conv = nn.Conv2d(3, 3, 1, groups=3).double()
    with torch.no_grad():
        as_conv.weight.copy_((1 / std).view(3, 1, 1, 1))
        as_conv.bias.copy_(-mean / std)
    folded = nn.Sequential(as_conv, inner).eval()
    x = _x((2, 3, 12, 14), seed=5).abs()
    torch.testing.assert_close(spelled(x), folded(x))
    expected = ierf.SRD(folded, head="exact").decompose(x).relevance(1)
    got = ierf.SRD(spelled, head="exact").decompose(x).relevance(1)
    torch.testing.assert_close(got, expected, atol=1e-9 * float(expected.abs().max()), rtol=0)


class _Fronted(nn.Module):
    """A TinyResNet behind one line of arithmetic on its input and a constant tensor ``k`` (a buffer)."""

    def __init__(self, front: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: torch.Tensor) -> None:
        super().__init__()
        self.front = front
        self.register_buffer("k", k)
        self.inner = randomise_bn(TinyResNet())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.front(x, self.k))


@pytest.mark.parametrize(
    ("front", "k", "message"),
    [
        (lambda x, k: x * k, torch.ones(1, 1, 12, 14), r"by a tensor of shape \(1, 1, 12, 14\).*one factor per"),
        (lambda x, k: x / k, torch.ones(2, 1, 1, 1), r"division of a feature map .* by a tensor of shape"),
        (lambda x, k: k / (x + 3), torch.ones(1), r"division by a feature map"),
        (lambda x, k: torch.div(x, 2, rounding_mode="floor"), torch.ones(1), r"rounding_mode='floor'"),
        (lambda x, k: torch.sub(x, k, alpha=2), torch.ones(1), r"sub with alpha=2"),
    ],
)
def test_arithmetic_that_is_no_channel_affine_map_is_refused_by_name(
    front: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], k: torch.Tensor, message: str
) -> None:
    """Scales per position or per image, divisions by a map and rounding have no exact SRD term: each is
    refused naming what it saw, never decomposed as if it were a per-channel scale."""
    model = _Fronted(front, k).double().eval()
    with pytest.raises(UnsupportedModelError, match=message):
        ierf.SRD(model, head="exact").decompose(_x((2, 3, 12, 14), seed=4))


class _SizeChecked(nn.Module):
    """A network that checks its input size itself, as torchvision's ViT does (``torch._assert(h == ...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, _ = x.shape
        torch._assert(h == 12, "Wrong image height!")
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_model_that_checks_its_input_size_is_decomposed_and_its_check_kept() -> None:
    """The size comparison and ``torch._assert`` had no rule: such a model was refused whatever the input
    ("no SRD rule for function eq"). The check is the model's, so an input that fails it is refused as the
    input's fault, naming the model's message."""
    model = _SizeChecked().double().eval()
    x = _x((1, 3, 12, 9), seed=2)
    maps = ierf.SRD(model, head="exact").saliency(x, 1)
    torch.testing.assert_close(maps.sum().double(), model(x)[0, 1], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputSizeError, match=r"own check of its input failed: Wrong image height!"):
        ierf.SRD(model, head="exact").saliency(_x((1, 3, 10, 9), seed=2), 1)


def test_an_input_the_model_cannot_take_is_an_input_size_error() -> None:
    """Callers tell "this model is not supported" from "this image is the wrong size" by type: both are
    ValueErrors, the second an ``ierf.InputSizeError``."""
    model = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ierf.InputSizeError, match=r"input 3x3 is too small for this model"):
        ierf.SRD(model.double().eval(), head="exact").saliency(_x((1, 3, 3, 3), seed=2), 1)
    assert issubclass(ierf.InputSizeError, ValueError)


# ---- acceptance round 8: CNN idioms from users' own code ----------------------------------------------------
class _AliasedInPlace(nn.Module):
    """A value read again after an in-place op changed it. Eager PyTorch reads the changed values (the
    pre-activation block's ``identity`` is ReLU'd too); the traced graph's later readers still name the node
    from before the change, so rules that make in-place ops functional compute another function."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv0(x))
        s = a + self.bn(self.conv1(a))
        identity = s
        if self.spelling == "module":
            y = self.conv2(self.relu(s)) + identity
        elif self.spelling == "function":
            y = self.conv2(F.relu(s, inplace=True)) + identity
        elif self.spelling == "iadd":
            s += self.conv2(a)
            y = identity
        else:  # "mul_"
            s.mul_(2.0)
            y = self.conv2(a) + identity
        return self.fc(self.act(y).mean((2, 3)))


@pytest.mark.parametrize("spelling", ["module", "function", "iadd", "mul_"])
def test_a_value_read_again_after_an_in_place_op_is_decomposed_as_changed_or_refused(spelling: str) -> None:
    """nn.ReLU(inplace=True), F.relu(..., inplace=True), ``s += ...`` and ``s.mul_(...)`` on a tensor that
    is also read later: the decomposition's logits came out as another function's (the one without the
    in-place change), so its map silently explained a model that is not the user's. Exact or refused."""
    torch.manual_seed(0)
    model = randomise_bn(_AliasedInPlace(spelling)).double().eval()
    x = _x((1, 3, 6, 7), seed=2)
    with torch.no_grad():
        expected = model(x.clone())
    try:
        dec = ierf.SRD(model, head="exact").decompose(x)
    except UnsupportedModelError:
        return  # a refusal naming the op is within the contract
    torch.testing.assert_close(dec.logits, expected, atol=1e-12, rtol=1e-12)


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation written in ``_conv_forward`` (forward itself is nn.Conv2d's own)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(input, weight - weight.mean((1, 2, 3), keepdim=True), bias)


def _circular_conv_forward(self: nn.Conv2d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The seamless-tiling patch: a circular padding put into one conv instance's ``_conv_forward``."""
    return F.conv2d(F.pad(input, (1, 1, 1, 1), mode="circular"), weight, bias, self.stride, 0, self.dilation)


def _changed_conv(how: str) -> nn.Conv2d:
    if how == "subclass_conv_forward":
        return _StandardisedConv(3, 4, 3, padding=1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    if how == "instance_conv_forward":
        conv._conv_forward = _circular_conv_forward.__get__(conv)
    else:  # "instance_forward"
        stock = conv.forward
        conv.forward = lambda inp: 2.0 * stock(inp)
    return conv


@pytest.mark.parametrize("how", ["subclass_conv_forward", "instance_conv_forward", "instance_forward"])
def test_a_convolution_whose_arithmetic_is_changed_outside_its_class_forward_is_not_taken_for_a_stock_one(
    how: str,
) -> None:
    """A leaf's rule is picked by its class's ``forward`` alone: a Conv2d subclass that overrides
    ``_conv_forward`` (weight standardisation), or one instance patched (``_conv_forward`` for seamless
    tiling, ``forward`` itself), was decomposed as a plain convolution of ``m.weight``: the logits and maps
    of another model, silently. Exact or refused (a ValueError, as for hooks)."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: m.act(m.conv2(a)).mean((2, 3)), _changed_conv(how)).double().eval()
    x = _x((1, 3, 6, 7), seed=3)
    with torch.no_grad():
        expected = model(x)
    try:
        dec = ierf.SRD(model, head="exact").decompose(x)
    except ValueError:
        return
    torch.testing.assert_close(dec.logits, expected, atol=1e-12, rtol=1e-12)


class _ReferenceSpellings(nn.Module):
    """A layer scale built from a parameter in forward (``gamma.view(1, -1, 1, 1)``) and a squeeze-excitation
    gate applied with the ``.mul`` method: both decomposed exactly by the fast path (the same maps as
    ``conv(a) * gamma4`` and ``a * g``), not by the reference."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, 4))
        self.squeeze = nn.Conv2d(4, 2, 1)
        self.excite = nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        if self.spelling == "layer_scale_view":
            h = a + self.conv2(a) * self.gamma.view(1, -1, 1, 1)
        else:  # "gate_mul_method"
            g = torch.sigmoid(self.excite(self.act(self.squeeze(a.mean((2, 3), keepdim=True)))))
            h = self.conv2(a.mul(g))
        return self.fc(self.act(h).mean((2, 3)))


@pytest.mark.parametrize("spelling", ["layer_scale_view", "gate_mul_method"])
def test_the_reference_decomposes_spellings_the_fast_path_supports(spelling: str) -> None:
    """ReferenceSRD is the audit oracle: it zeroed a constant computed in forward from a parameter (it
    treats every non-get_attr operand off the path as another path's map) and took ``a.mul(g)`` for a
    product of two paths (its gate test knows only ``*`` and torch.mul). Its maps then did not even sum
    to the logit."""
    torch.manual_seed(0)
    model = _ReferenceSpellings(spelling).double().eval()
    with torch.no_grad():
        model.conv1.bias.fill_(2.0)  # every PFV live: conservation is exact
    x = _x((1, 3, 6, 7), seed=4)
    dec = ierf.SRD(model, head="exact").decompose(x)
    _conserves(dec, 2, rtol=1e-9)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    slow = reference_relevance(ref, dec_ref, 2)
    torch.testing.assert_close(slow.sum(), dec.logits[0, 2], atol=1e-9, rtol=1e-9)
    assert_matches_reference(dec, ref, dec_ref, (0, 2), 1e-9)


def test_an_element_wise_product_on_a_one_channel_map_is_not_taken_for_a_gate() -> None:
    """On a one-channel map the factor of x * sigmoid(x) has a spatial gate's shape (B, 1, H, W), as on a
    1x1 map it has a channel gate's: README says such products are refused, but this one was frozen as a
    gate (no channel reduction lies between the map and its factor)."""

    class OneChannelSiLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 1, 3, padding=1)
            self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.act(self.conv1(x))
            return self.fc(self.act(self.conv2(a * torch.sigmoid(a))).mean((2, 3)))

    with pytest.raises(UnsupportedModelError, match="not a gate"):
        ierf.SRD(OneChannelSiLU().eval(), head="exact").decompose(torch.randn(1, 3, 6, 7))


class _SEBasic(nn.Module):
    """SENet's placement: the squeeze-excitation gates conv2's batch-normed output, before the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.squeeze = nn.Conv2d(4, 2, 1)
        self.excite = nn.Conv2d(2, 4, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        y = self.bn2(self.conv2(a))
        g = torch.sigmoid(self.excite(self.act(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return self.fc(self.act(y * g + a).mean((2, 3)))


def test_a_gate_on_a_convolutions_own_output_matches_the_reference() -> None:
    """SE-ResNet's gate was first refused as "not a gate", then as a gate on a convolution whose taps the
    stage keeps apart; each tap is now a path of its own, scaled by the gate (tests/test_srd_gates.py)."""
    model = randomise_bn(_SEBasic()).double().eval()
    x = _x((1, 3, 6, 7), seed=5)
    fast = ierf.SRD(model, head="exact").saliency(x, 1)[0].double()
    slow = ReferenceSRD(model).saliency(x, 1).view(fast.shape)
    torch.testing.assert_close(fast, slow, atol=1e-5 * slow.abs().max(), rtol=0)


class _ChannelPieces(nn.Module):
    """A map cut along its channels by ``torch.chunk``, ``torch.split`` (sizes or sections) or ``.split``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if self.how == "torch.chunk":
            first, second, third = torch.chunk(y, 3, dim=1)
            p, q = first, torch.cat([second, third], 1)
        elif self.how == "torch.split":
            p, q = torch.split(y, [2, 4], dim=1)
        else:
            pieces = y.split(2, dim=1)
            p, q = pieces[0], torch.cat(pieces[1:], 1)
        return self.fc(torch.relu(torch.cat([self.a(p), self.b(q)], 1)).mean((2, 3)))


@pytest.mark.parametrize("how", ["torch.chunk", "torch.split", ".split"])
def test_channel_pieces_by_chunk_and_split_match_the_reference(how: str) -> None:
    """``x.chunk(n, dim=1)`` had a rule, but the function ``torch.chunk`` and both spellings of split were
    refused: the same channel slices, exact against the reference."""
    model = _ChannelPieces(how).double().eval()
    x = _x((1, 3, 6, 7), seed=6)
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 1), 1e-9)


# ---- mutation round 8: gaps in the round's new rules, in-place refusal, trace check and patch detection ----
def test_a_normalize_with_one_mean_and_std_for_all_channels_is_decomposed() -> None:
    """``Normalize(0.5, 0.25)`` (one mean and std for every channel, as in the common ``Normalize((0.5,),
    (0.5,))``) is the same channel affine map as the per-channel one: guards against refusing it (the rule
    takes one value per channel, or one for all)."""
    torch.manual_seed(0)
    inner = randomise_bn(TinyResNet()).double().eval()
    spelled = nn.Sequential(torchvision.transforms.Normalize(0.5, 0.25), inner).double().eval()
    as_conv = nn.Conv2d(3, 3, 1, groups=3).double()
    with torch.no_grad():
        as_conv.weight.fill_(4.0)
        as_conv.bias.fill_(-2.0)
    folded = nn.Sequential(as_conv, inner).eval()
    x = _x((1, 3, 12, 14), seed=5).abs()
    torch.testing.assert_close(spelled(x), folded(x))
    expected = ierf.SRD(folded, head="exact").decompose(x).relevance(1)
    got = ierf.SRD(spelled, head="exact").decompose(x).relevance(1)
    torch.testing.assert_close(got, expected, atol=1e-9 * float(expected.abs().max()), rtol=0)


class _OneChannelSpatialGate(nn.Module):
    """A spatial gate convolved from the one-channel map it gates: ``a * sigmoid(conv(a))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 1, 3, padding=1)
        self.spatial = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv1(x))
        return self.fc(self.act(self.conv2(a * torch.sigmoid(self.spatial(a)))).mean((2, 3)))


def test_a_spatial_gate_convolved_from_a_one_channel_map_is_a_gate() -> None:
    """On a one-channel map only a pooling or a convolution between map and factor tells a spatial gate from
    ``x * sigmoid(x)``: guards against counting only poolings, which refused this gate as "not a gate"."""
    torch.manual_seed(0)
    model = _OneChannelSpatialGate().double().eval()
    with torch.no_grad():
        model.conv1.bias.fill_(1.0)
    x = _x((1, 3, 6, 7), seed=3)
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 1), 1e-9)


def test_split_sections_that_do_not_cover_the_channels_are_refused() -> None:
    """``torch.split(a, [1, 2], dim=1)`` of a 4-channel map raises in the model's own forward: guards against
    decomposing it anyway (sections that fall short of the channels taken as two slices, one channel dropped),
    which returned maps for a model that cannot run."""
    model = _Spelled(lambda m, a: torch.cat(torch.split(a, [1, 2], dim=1), 1).mean((2, 3)))
    model.fc = nn.Linear(3, 3)
    model = model.double().eval()
    with pytest.raises(UnsupportedModelError, match=r"split sizes \[1, 2\] do not add up to the map's 4 channels"):
        ierf.SRD(model, head="exact").decompose(_x((1, 3, 6, 7), seed=1))


class _ReluedAlias(nn.Module):
    """``identity = s`` read again after an in-place ReLU of ``s``: a no-op for inputs where ``s >= 0``."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv0.weight.abs_()  # s >= 0 for inputs >= 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv0(x)
        identity = s
        r = self.relu(s) if self.spelling == "module" else F.relu(s, inplace=True)
        y = self.conv2(r) + identity
        return self.fc(self.act(y + identity).mean((2, 3)))


@pytest.mark.parametrize("spelling", ["module", "function"])
def test_an_in_place_change_read_again_is_refused_even_when_the_first_input_does_not_show_it(spelling: str) -> None:
    """The check against the model's own forward runs once per explainer, on the first input: an in-place ReLU
    of a value that is all positive there changes nothing, so only the program's own refusal (which reads
    the graph, not the values) keeps a later input with negative values from being explained as another
    function. Guards against that refusal missing an in-place module or function; the refusal names the first
    reader after the change."""
    torch.manual_seed(0)
    model = _ReluedAlias(spelling).double().eval()
    explainer = ierf.SRD(model, head="exact")
    with pytest.raises(UnsupportedModelError, match=r"in-place operation changes a feature map that 'add' in"):
        explainer.decompose(_x((1, 3, 6, 7), seed=2).abs())


class _ScaledHead(nn.Module):
    """``x * self.scale`` with a Python number: the trace keeps the value it had when the explainer was built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)) * self.scale)


def test_a_trace_that_no_longer_reproduces_the_model_by_a_few_percent_is_refused() -> None:
    """A Python number changed after the explainer was built (no module replaced) makes the traced program
    another function: logits 5 % off. Guards against a trace-check tolerance loose enough to pass that (the
    check allows 1e-3 of the largest logit, enough for float32 rounding)."""
    torch.manual_seed(0)
    model = _ScaledHead().double().eval()
    explainer = ierf.SRD(model, head="exact")
    model.scale = 1.05
    with pytest.raises(UnsupportedModelError, match=r"traced forward does not reproduce its output"):
        explainer.decompose(_x((1, 3, 6, 7), seed=2))


@pytest.mark.parametrize("attr", ["forward", "_conv_forward"])
def test_a_method_patched_onto_a_module_after_the_first_call_is_refused(attr: str) -> None:
    """The trace check runs on the first call only; a ``forward`` or ``_conv_forward`` patched onto a conv
    instance afterwards must still be seen (as a replaced submodule is) or later maps explain the model as
    it was. Guards against the module identities leaving patched methods out, or knowing only ``forward``."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: m.act(m.conv2(a)).mean((2, 3))).double().eval()
    x = _x((1, 3, 6, 7), seed=3)
    explainer = ierf.SRD(model, head="exact")
    explainer.decompose(x)
    conv = model.conv2
    if attr == "forward":
        stock = conv.forward
        conv.forward = lambda inp: 2.0 * stock(inp)
    else:
        conv._conv_forward = _circular_conv_forward.__get__(conv)
    with pytest.raises(ValueError, match=r"modules changed .*or a forward was patched"):
        explainer.decompose(x)


def test_a_forward_patched_onto_one_conv_instance_is_traced_as_written() -> None:
    """An instance's own ``forward`` (here ``2 * conv(x)``) is traced as written and decomposed exactly:
    guards against taking the patched instance for a stock Conv2d, which the trace check then refuses."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: m.act(m.conv2(a)).mean((2, 3)), _changed_conv("instance_forward")).double().eval()
    x = _x((1, 3, 6, 7), seed=3)
    with torch.no_grad():
        expected = model(x)
    dec = ierf.SRD(model, head="exact").decompose(x)
    torch.testing.assert_close(dec.logits, expected, atol=1e-12, rtol=1e-12)


def test_an_odd_chunk_put_back_in_another_order_keeps_the_models_logits() -> None:
    """``x.chunk(2, dim=1)`` of 5 channels is 3 + 2: guards against the last piece claiming the full 3
    channels, which only shows when that smaller piece is concatenated in front of another one (its width
    places the next piece)."""
    torch.manual_seed(0)
    model = _Spelled(lambda m, a: m.act(m.mix(torch.cat(a.chunk(2, dim=1)[::-1], 1))).mean((2, 3)))
    model.conv = nn.Conv2d(3, 5, 3, padding=1)
    model.mix = nn.Conv2d(5, 4, 3, padding=1)
    model = model.double().eval()
    with torch.no_grad():
        model.conv.bias.fill_(1.0)
    x = _x((1, 3, 6, 7), seed=4)
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)
    _conserves(dec, 1, rtol=1e-9)


def test_non_finite_weights_are_named_not_blamed_on_in_place_ops() -> None:
    """A diverged fine-tune saves NaN weights; the service's warm-up then failed the replica with "Usual cause: an
    in-place operation (x += t, …)", sending the team to look for code that is not there. Inputs are checked
    ("x contains NaN or infinite values"); a model whose own output is not finite should be told the same way."""
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).eval()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError) as refused:
        ierf.SRD(model).saliency(torch.randn(1, 3, 32, 32), 0)
    message = str(refused.value)
    assert "in-place" not in message, message
    assert re.search(r"NaN|non-finite|not finite", message), message


def test_a_non_finite_batch_norm_statistic_is_named_among_the_models_broken_tensors() -> None:
    """Guards ``_check_finite`` looking at buffers as well as parameters: a diverged fine-tune as often leaves
    NaN running statistics (``running_var``) as NaN weights. Looking at parameters only, the refusal read "its
    parameters are finite: an overflow inside the forward", pointing away from the broken tensor."""
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).eval()
    with torch.no_grad():
        model.layer2.bn1.running_var[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in layer2\.bn1\.running_var"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 32, 32), 0)
