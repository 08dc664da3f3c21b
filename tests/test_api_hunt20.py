"""Round 20 hunt on SRD's public API (``SRD.saliency`` / ``SRD.ierf``) over real torchvision architectures
(random weights, eval mode, small non-square inputs): iERFs at every stage boundary, the contrast rules,
targets and positions in every accepted form, input layouts, autograd modes, caches between calls, weights
edited in place, and the caller's model left as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable

import ierf
import numpy as np
import pytest
import torch
import torchvision
from ierf.srd.reference import ReferenceSRD
from ierf.srd.rules import is_activation
from srd_nets import positive_copy, randomise_bn, reference_relevance
from test_srd_api import _assert_untouched, _snapshot
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


def _small_resnet(block: type[nn.Module] = BasicBlock) -> nn.Module:
    """torchvision's ResNet with one block per stage: the real stem, max-pool, downsample shortcuts and the
    Bottleneck's reused ``relu`` module, fast enough for many calls."""
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.ResNet(block, [1, 1, 1, 1], num_classes=10), seed=1).eval()


def _image(batch: int, h: int, w: int, seed: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _receptive_fields(model: nn.Module, srd: ierf.SRD, cells: dict[str, list[tuple[int, int]]], hw) -> dict:
    """Theoretical receptive field of each position of each layer: input-gradient support of the PFV (summed
    over channels) on a float64 copy with positive weights, zero biases, average- instead of max-pooling and
    every activation but the gates' sigmoids skipped, so no path can cancel or switch off (an independent
    check of the iERF's support). A gate whose sigmoid saturates gives an empty field (skipped by callers)."""
    pos_model = positive_copy(model, {nn.Hardsigmoid: nn.Sigmoid})
    pairs = [(layer, r, c) for layer, positions in cells.items() for r, c in positions]
    gm = torch.fx.GraphModule(pos_model, srd.program.graph)
    # one image per (layer, position) pair: one backward gives every pair's gradient in its own row
    x = torch.full((len(pairs), 3, *hw), 1e-3, dtype=torch.float64, requires_grad=True)
    interp = torch.fx.Interpreter(gm)
    values: dict = {}

    def run_node(n: torch.fx.Node, orig: Callable = interp.run_node) -> object:
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        skip = is_activation(n, module) and not isinstance(module, nn.Sigmoid)  # gates: bounded
        v = interp.env[n.args[0]] if skip else orig(n)
        values[n] = v
        return v

    interp.run_node = run_node  # type: ignore[method-assign]
    interp.run(x)
    picked = [
        values[srd.program.node_of[srd.program.source_id(layer)]][i, :, r, c].sum()
        for i, (layer, r, c) in enumerate(pairs)
    ]
    (grad,) = torch.autograd.grad(torch.stack(picked).sum(), x)
    assert bool(torch.isfinite(grad).all())
    support = grad.abs().sum(1) > 0
    fields: dict[str, list[torch.Tensor]] = {layer: [] for layer in cells}
    for i, (layer, _, _) in enumerate(pairs):
        fields[layer].append(support[i])
    return fields


def _edge_positions(h: int, w: int) -> list[tuple[int, int]]:
    """Two opposite corners, a third corner and the centre, without repeats (a 1-wide map has fewer)."""
    cells = [(0, 0), (h - 1, w - 1), (0, w - 1), (h // 2, w // 2)]
    return list(dict.fromkeys(cells))


def _check_every_stage_boundary(model: nn.Module, hw: tuple[int, int]) -> int:
    """At every listed layer: corner and centre iERFs (int32 positions, one duplicated) sum to 1, equal the
    single-image run of the same image, the duplicate equals its original, and nothing leaves the theoretical
    receptive field (maps of 3x3 and more). Returns the count of iERFs whose receptive field leaves part of
    the input out, so the support check is known to test something."""
    srd = ierf.SRD(model)
    x = _image(2, *hw, seed=2)
    dec, single = srd.decompose(x), srd.decompose(x[1:])
    cells = {
        name: _edge_positions(*dec.layer_shape(name)[1:]) for name in srd.layers if len(dec.layer_shape(name)) == 3
    }
    # support: on maps of at least 3x3 (a PFV of a smaller late map sees about the whole input)
    fields = _receptive_fields(model, srd, {k: v for k, v in cells.items() if min(dec.layer_shape(k)[1:]) >= 3}, hw)
    proper = 0
    for layer, positions in cells.items():
        seeds = torch.tensor([*positions, positions[0]], dtype=torch.int32)
        erfs = dec.ierf(layer, seeds).double()
        ones = torch.ones(2, len(positions) + 1, dtype=torch.float64)
        torch.testing.assert_close(erfs.sum((2, 3)), ones, atol=1e-4, rtol=0, msg=layer)
        assert torch.equal(erfs[:, 0], erfs[:, -1]), layer
        alone = single.ierf(layer, seeds.long()).double()[0]
        torch.testing.assert_close(alone, erfs[1], atol=1e-5 * float(erfs[1].abs().max()), rtol=0, msg=layer)
        for k, field in enumerate(fields.get(layer, [])):
            if field.any():
                assert bool((erfs[:, k][:, ~field] == 0).all()), f"{layer} {positions[k]}: iERF outside its field"
                proper += int(field.sum() < field.numel())
    return proper


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_resnet_ierfs_at_every_stage_boundary_have_mass_one_and_stay_in_the_receptive_field(block) -> None:
    """Every stage boundary of torchvision's ResNet blocks, including each call of the Bottleneck's reused
    ``relu`` (``layer1.0.relu:0/1/2``), the stem (its RGB Gram path) and the corners of a non-square map."""
    model = _small_resnet(block)
    assert _check_every_stage_boundary(model, (37, 29)) > 0


def test_mobilenet_v3_small_ierfs_at_every_stage_boundary() -> None:
    """Squeeze-excitation gates, Hardswish and depthwise kernels at every boundary."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.mobilenet_v3_small(num_classes=10), seed=1).eval()
    assert _check_every_stage_boundary(model, (37, 29)) > 0


@pytest.mark.parametrize("arch", ["squeezenet1_1", "shufflenet_v2_x0_5"])
def test_more_torchvision_ierfs_at_every_stage_boundary(arch: str) -> None:
    """Ceil-mode max-pools over a channel concatenation (SqueezeNet) and channel chunks and shuffles
    (ShuffleNetV2), at an odd non-square size."""
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(num_classes=10), seed=1).eval()
    assert _check_every_stage_boundary(model, (35, 27)) > 0


@pytest.mark.parametrize(
    ("arch", "hw"), [("mnasnet0_5", (20, 17)), ("squeezenet1_1", (33, 25)), ("regnet_x_400mf", (22, 17))]
)
def test_torchvision_architectures_the_reference_tests_leave_out_match_the_reference(arch: str, hw) -> None:
    """Saliency (exact head) and iERFs at every layer against the float64 brute-force reference, for
    architectures ``test_srd_reference`` does not run whole."""
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(num_classes=5), seed=1).double().eval()
    x = _image(1, *hw, seed=1, dtype=torch.float64)
    srd = ierf.SRD(model, head="exact")
    dec = srd.decompose(x)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    for target in (0, 3):
        fast = dec.relevance(target)[0]
        slow = reference_relevance(ref, dec_ref, target).view(fast.shape)
        torch.testing.assert_close(fast, slow, atol=1e-9 * float(slow.abs().max()), rtol=0)
    for layer in srd.layers:
        shape = dec.layer_shape(layer)
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        cells = sorted({(0, 0), (h - 1, w - 1)})
        fast = dec.ierf(layer, torch.tensor(cells)).double()[0]
        for k, (r, c) in enumerate(cells):
            seed = torch.zeros(h * w, dtype=torch.float64)
            seed[r * w + c] = 1
            slow = ref.propagate(dec_ref, {srd.program.source_id(layer): seed})[0].view(fast.shape[1:])
            torch.testing.assert_close(fast[k], slow, atol=1e-6 * float(slow.abs().max()), rtol=0, msg=layer)


# -- saliency(): contrasts, targets, inputs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, ierf.SRD, torch.Tensor, torch.Tensor]:
    model = _small_resnet()
    x = _image(3, 48, 40)
    with torch.no_grad():
        logits = model(x)
    return model, ierf.SRD(model), x, logits


def _close(a: torch.Tensor, b: torch.Tensor, scale: float, rel: float = 2e-5) -> None:
    torch.testing.assert_close(a, b, atol=rel * scale, rtol=0)


def test_each_contrast_rule_conserves_what_it_says(resnet) -> None:
    """Pool+linear head: identity sums to the logit, "mean" to 0, a class to the logit gap, and a class
    contrast is exactly the difference of the two identity maps."""
    _, srd, x, logits = resnet
    scale = float(logits.abs().max())
    ident = srd.saliency(x, 4)
    assert ident.shape == (3, 48, 40) and ident.dtype == torch.float32
    _close(ident.sum((1, 2)), logits[:, 4], scale)
    _close(srd.saliency(x, 4, contrast="mean").sum((1, 2)), torch.zeros(3), scale)
    versus = srd.saliency(x, 4, contrast=7)
    _close(versus.sum((1, 2)), logits[:, 4] - logits[:, 7], scale)
    _close(versus, ident - srd.saliency(x, 7), float(ident.abs().max()), 1e-5)


def test_per_image_targets_and_contrasts_in_every_accepted_form_match_single_image_calls(resnet) -> None:
    _, srd, x, logits = resnet
    target, other = torch.tensor([1, 2, 3]), torch.tensor([0, 9, 5])
    maps = srd.saliency(x, target, contrast=other)
    scale = float(maps.abs().max())
    rows = torch.arange(3)
    _close(maps.sum((1, 2)), logits[rows, target] - logits[rows, other], float(logits.abs().max()))
    for i in range(3):
        _close(maps[i], srd.saliency(x[i : i + 1], int(target[i]), contrast=int(other[i]))[0], scale, 1e-5)
    _close(srd.saliency(x, target.int(), contrast=np.array([0, 9, 5])), maps, scale, 1e-6)
    _close(srd.saliency(x, np.int64(4), contrast=torch.tensor(7)), srd.saliency(x, 4, contrast=7), scale, 1e-6)


@pytest.mark.parametrize(
    ("target", "contrast", "error"),
    [
        (-1, "identity", ValueError),
        (True, "identity", TypeError),
        (torch.tensor([True, False, True]), "identity", TypeError),
        (torch.tensor([1, -2, 3]), "identity", ValueError),
        (torch.tensor([1, 10, 3]), "identity", ValueError),
        (torch.tensor([1.0, 2.0, 3.0]), "identity", TypeError),
        (torch.tensor([1, 2]), "identity", ValueError),
        (4, 4, ValueError),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]), ValueError),
        (4, -1, ValueError),
        (4, True, ValueError),
        (4, torch.tensor([True, False, True]), ValueError),
        (4, "Mean", ValueError),
    ],
)
def test_wrong_targets_and_contrasts_are_refused_and_leave_the_model_alone(resnet, target, contrast, error) -> None:
    model, srd, x, _ = resnet
    before = _snapshot(model)
    with pytest.raises(error):
        srd.saliency(x, target, contrast=contrast)
    _assert_untouched(model, before)


def test_input_layouts_give_the_same_maps(resnet) -> None:
    """channels_last, a strided slice of a larger tensor, a batch that repeats one image by stride 0, and a
    channels_last model: the maps of a contiguous input."""
    model, srd, x, _ = resnet
    base = srd.saliency(x, 4)
    scale = float(base.abs().max())
    _close(srd.saliency(x.contiguous(memory_format=torch.channels_last), 4), base, scale, 1e-6)
    big = torch.zeros(3, 5, 51, 45)
    big[:, 1:4, 2:50, 1:41] = x
    view = big[:, 1:4, 2:50, 1:41]
    assert not view.is_contiguous()
    _close(srd.saliency(view, 4), base, scale, 1e-6)
    _close(srd.saliency(x[1:2].expand(3, -1, -1, -1), 4), base[1:2].expand(3, -1, -1), scale, 1e-6)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    _close(ierf.SRD(last).saliency(x, 4), base, scale, 1e-6)


def test_a_float64_input_to_a_float32_model_is_refused_not_cast(resnet) -> None:
    _, srd, x, _ = resnet
    with pytest.raises(TypeError, match="float64"):
        srd.saliency(x.double(), 4)


def test_grad_modes_and_frozen_parameters_give_the_same_maps(resnet) -> None:
    """An input requiring grad, calls under no_grad and inference_mode (and an inference tensor used after),
    and a copy whose parameters require no grad: one map."""
    model, srd, x, _ = resnet
    base = srd.saliency(x, 4)
    scale = float(base.abs().max())
    _close(srd.saliency(x.clone().requires_grad_(True), 4).detach(), base, scale, 1e-6)
    with torch.no_grad():
        _close(srd.saliency(x, 4), base, scale, 1e-6)
    with torch.inference_mode():
        _close(srd.saliency(x, 4), base, scale, 1e-6)
        made_there = x.clone()
    _close(srd.saliency(made_there, 4), base, scale, 1e-6)
    frozen = copy.deepcopy(model).requires_grad_(False)
    _close(ierf.SRD(frozen).saliency(x, 4), base, scale, 1e-6)


def test_saliency_ierf_saliency_on_one_explainer_and_another_size_between(resnet) -> None:
    """What one call caches (parameter-derived tensors, layer grids, the class count) does not leak into the
    next: the same maps come back after an iERF, a single image, and an input of another size."""
    model, srd, x, _ = resnet
    first = srd.saliency(x, 4)
    scale = float(first.abs().max())
    erfs = srd.ierf(x, "layer2", torch.tensor([[0, 0], [2, 3]]))
    _close(srd.saliency(x, 4), first, scale, 1e-6)
    torch.testing.assert_close(srd.ierf(x[:1], "layer2", torch.tensor([[2, 3]])), erfs[:1, 1:], atol=1e-6, rtol=0)
    _close(srd.saliency(x[1:2], 4)[0], first[1], scale, 1e-5)
    other = _image(2, 64, 56, seed=9)
    with torch.no_grad():
        logits = model(other)
    _close(srd.saliency(other, 4).sum((1, 2)), logits[:, 4], float(logits.abs().max()))
    _close(srd.saliency(x, 4), first, scale, 1e-6)


def test_two_explainers_on_one_model_agree(resnet) -> None:
    model, srd, x, _ = resnet
    base = srd.saliency(x, 4)
    _close(ierf.SRD(model).saliency(x, 4), base, float(base.abs().max()), 1e-6)
    _close(srd.saliency(x, 4), base, float(base.abs().max()), 1e-6)


def test_weights_and_settings_edited_in_place_between_calls_are_seen() -> None:
    """After a first call: in-place writes to a convolution, a head bias and batch-norm statistics and
    affine weights, a Parameter replaced, ``load_state_dict``, a running variance rebound and module
    settings (BN eps, a convolution's dilation): each next map equals a fresh explainer's and sums to the
    edited model's logit."""
    model = _small_resnet()
    x = _image(1, 40, 32)
    srd = ierf.SRD(model)
    original = srd.saliency(x, 3)
    state = copy.deepcopy(model.state_dict())

    def check() -> None:
        got = srd.saliency(x, 3)
        with torch.no_grad():
            logit = model(x)[:, 3]
        _close(got.sum((1, 2)), logit, float(logit.abs().max()))
        _close(got, ierf.SRD(copy.deepcopy(model)).saliency(x, 3), float(got.abs().max()), 1e-5)
        assert float((got - original).abs().max()) > 1e-3 * float(original.abs().max())

    with torch.no_grad():
        model.layer3[0].conv1.weight.mul_(-1.5)
        model.fc.bias.add_(3.0)
        model.bn1.running_mean.add_(0.3)
        model.layer4[0].bn2.weight.mul_(2)
    model.fc.weight = nn.Parameter(torch.randn_like(model.fc.weight))
    check()
    model.load_state_dict(state)
    _close(srd.saliency(x, 3), original, float(original.abs().max()), 1e-6)
    model.layer1[0].bn1.running_var = model.layer1[0].bn1.running_var * 4
    model.layer1[0].bn2.eps = 0.5
    model.layer4[0].conv2.dilation, model.layer4[0].conv2.padding = (2, 2), (2, 2)
    check()


def test_layer_shapes_and_ierf_positions_follow_a_stride_set_in_place() -> None:
    """Found in round 20: decompositions follow a module setting changed in place (here the stem max-pool's
    stride, which doubles every later map), but ``layer_shape`` kept the grid it had cached for the input
    size, so it answered the old shape and ``ierf`` refused a position on the new grid as "outside the 12x10
    PFV grid" while the decomposition it refused to run had that position."""
    model = _small_resnet()
    srd = ierf.SRD(model)
    x = _image(2, 48, 40)
    srd.ierf(x, "layer1", torch.tensor([[0, 0]]))  # a batch of two: the grid is computed and cached
    assert srd.layer_shape("layer1", (48, 40)) == (64, 12, 10)
    model.maxpool.stride = 1
    assert srd.decompose(x).layer_shape("layer1") == (64, 24, 20)
    assert srd.layer_shape("layer1", (48, 40)) == (64, 24, 20)
    erfs = srd.ierf(x, "layer1", torch.tensor([[20, 15]]))
    torch.testing.assert_close(erfs.sum((2, 3)), torch.ones(2, 1), atol=1e-4, rtol=0)


def test_errors_after_a_good_call_leave_the_model_as_it_was(resnet) -> None:
    model, srd, x, _ = resnet
    srd.saliency(x, 1)
    before = _snapshot(model)
    calls = (
        lambda: srd.saliency(x, 99),
        lambda: srd.ierf(x, "maxpool", torch.tensor([[0, 0]])),
        lambda: srd.ierf(x, "layer2", torch.tensor([[99, 0]])),
        lambda: srd.ierf(x, "layer2", [[0, 0]]),
        lambda: srd.saliency(x[:, :2], 1),
        lambda: srd.saliency(x * float("nan"), 1),
    )
    for call in calls:
        with pytest.raises((ValueError, TypeError)):
            call()
    _assert_untouched(model, before)
    torch.testing.assert_close(srd.saliency(x, 1).sum((1, 2)), model(x)[:, 1].detach(), atol=1e-4, rtol=1e-4)


def test_a_grayscale_adaptation_of_the_first_convolution_is_followed() -> None:
    """A common adaptation replaces conv1's weight by its sum over RGB and leaves ``in_channels`` at 3 (the
    convolution reads the weight's shape). Both an explainer built before and a fresh one were refusing the
    one-channel input ("x must have 3 channels"): the channel count was cached from ``in_channels``."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    before = ierf.SRD(model)
    before.saliency(torch.randn(1, 3, 32, 32), 1)
    with torch.no_grad():
        model.conv1.weight = nn.Parameter(model.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 32, 32)
    for explainer in (before, ierf.SRD(model)):
        maps = explainer.saliency(x, 1)
        torch.testing.assert_close(maps.sum((1, 2)), model(x)[:, 1].detach(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="x must have 1 channels, got 3"):
        before.saliency(torch.randn(1, 3, 32, 32), 1)
