"""Mutation round 22 on ``ierf.srd.explainer`` (relevance flow, start maps, states and argument checks) and
``ierf.srd.derived`` (the cache of parameter-derived tensors).

Each test fails on a plausible slip that the suite let through: kernel grids grown past the routes they stand
for, a head that reads two maps or a fully connected layer beside a map, ``Decomposition.input_size``, a bool
target given to a decomposition, an all-zero input, a gradient start map or a state that keeps an autograd
graph, state structure checks (shapes table, ratio grids, routes, activations, extra entries, NaN ratios),
bfloat16 states, cached layer shapes after new Parameters, and the parameter cache: weights pruned through
``.data`` slices, LRU order, folds of parameters that require grad, calls under inference mode, and entries
whose source died.
"""

from __future__ import annotations

import copy

import ierf
import pytest
import torch
from ierf.srd.terms import Route
from srd_nets import TinyVGG, randomise_bn
from torch import nn


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- kernel grids ------------------------------------------------------------------------------------------
def _grid_routes(grids: list, n: int) -> list[Route]:
    """The routes a list of grids stands for, in order (each grid's taps row-major)."""
    assert [g.start for g in grids] == [sum(g.taps for g in grids[:i]) for i in range(len(grids))]
    assert sum(g.taps for g in grids) == n
    return [g.tap(k) for g in grids for k in range(g.taps)]


def test_route_grids_stand_for_exactly_the_routes_they_split() -> None:
    """Guards against a kernel grid grown past the routes it covers: a row accepted on its first tap alone
    (a partial row: one tap missing further along), or a row continued into another map's routes. The grid's
    scatter would send relevance to offsets, or to a map, that no route names."""
    from ierf.srd.explainer import _route_grids

    conv = [Route(3, 2, 1, oy, ox) for oy in (-1, 0, 1) for ox in (-2, 0, 2, 4)]
    for missing in range(len(conv)):
        broken = conv[:missing] + conv[missing + 1 :]
        assert _grid_routes(_route_grids(broken), len(broken)) == broken, missing
    # the same offsets, the last row from another map; and one row split between two maps
    mixed = [Route(3 if oy < 1 else 4, 2, 1, oy, ox) for oy in (-1, 0, 1) for ox in (-2, 0, 2, 4)]
    assert _grid_routes(_route_grids(mixed), len(mixed)) == mixed
    split = [Route(3 if ox < 2 else 4, 1, 1, 0, ox) for ox in range(4)]
    assert _grid_routes(_route_grids(split), len(split)) == split


# ---- a head that reads two maps -----------------------------------------------------------------------------
class _TwoConvs(nn.Module):
    """Two convolution stages and a linear head on the last map's pooled channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


class _TwoScaleHead(_TwoConvs):
    """A linear head on the pooled features of two maps (a multi-scale head): the start map is two maps."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(9, 3)  # both maps' pooled channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.act1(self.conv1(x))
        a2 = self.act2(self.conv2(a1))
        return self.fc(torch.cat([a1.mean((2, 3)), a2.mean((2, 3))], 1))


def test_layer_relevance_of_the_last_map_a_two_map_head_reads_is_its_cam() -> None:
    """Guards against taking the lowest of the head's start maps as the start: the last map, which the head
    reads too, was refused as lying above the start. Its relevance is the class activation map of its part of
    the head plus an equal share of the bias over all positions of both maps."""
    torch.manual_seed(0)
    model = _TwoScaleHead().double().eval()
    srd = ierf.SRD(model)
    dec = srd.decompose(_x((2, 3, 6, 8), seed=1), keep=["act1", "act2"])
    target = torch.tensor([2, 0])
    a1, a2 = (dec.activations[srd.program.source_id(name)] for name in ("act1", "act2"))
    positions = a1.shape[2] * a1.shape[3] + a2.shape[2] * a2.shape[3]
    weight, bias = model.fc.weight[target, 4:], model.fc.bias[target]
    cam = torch.einsum("bc,bchw->bhw", weight, a2) / (a2.shape[2] * a2.shape[3])
    expected = cam + (bias / positions).view(-1, 1, 1)
    torch.testing.assert_close(dec.layer_relevance("act2", target), expected, atol=1e-12, rtol=1e-10)


def test_a_decompositions_input_size_is_height_then_width() -> None:
    """Guards against (width, height): a non-square input's size came back transposed."""
    torch.manual_seed(0)
    dec = ierf.SRD(_TwoScaleHead().double().eval()).decompose(_x((1, 3, 6, 8)))
    assert dec.input_size == (6, 8)


class _FullyConnectedBeside(nn.Module):
    """A head that reads a fully connected layer's output beside the pooled map it was computed from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.fc1, self.fc_act = nn.Linear(4 * 5 * 6, 7), nn.ReLU()
        self.fc2 = nn.Linear(7 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        return self.fc2(torch.cat([self.fc_act(self.fc1(a.flatten(1))), a.mean((2, 3))], 1))


def test_the_auto_head_is_a_gradient_one_when_any_head_path_reads_a_fully_connected_layer() -> None:
    """Guards against calling a head fully connected only when all its paths read one-PFV layers: a head
    reading a fully connected layer beside a pooled map was decomposed exactly, where the flattened PFVs'
    relevance is not class-specific (the documented rule picks the gradient start)."""
    torch.manual_seed(0)
    dec = ierf.SRD(_FullyConnectedBeside().double().eval()).decompose(_x((2, 3, 5, 6)))
    torch.testing.assert_close(dec.saliency(1), dec.saliency(1, head="gradcam"), atol=0, rtol=0)
    assert not torch.equal(dec.saliency(1), dec.saliency(1, head="exact"))


# ---- argument checks ----------------------------------------------------------------------------------------
def test_a_bool_target_given_to_a_decomposition_is_refused() -> None:
    """Guards against the decomposition reading True as class 1 (SRD.saliency refuses it early, so only a
    decomposition's own check stands between a bool and a map of class 1)."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    dec = srd.decompose(_x((1, 3, 16, 16)))
    with pytest.raises(TypeError, match="target must be an int"):
        dec.saliency(True)
    with pytest.raises(TypeError, match="target must be an int"):
        dec.layer_relevance(srd.layers[-1], False)


def test_an_all_zero_input_is_explained_not_refused() -> None:
    """Guards against the magnitude check refusing an input whose largest value is 0 (a black or mean-colour
    baseline image): it has no magnitude to overflow, and its map is finite (every pre-activation is bias
    alone, whose relevance stops where no upstream PFV contributes)."""
    torch.manual_seed(0)
    model = TinyVGG().double().eval()
    x = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    dec = ierf.SRD(model).decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x))
    saliency = dec.saliency(1)
    assert saliency.shape == (2, 16, 16) and bool(torch.isfinite(saliency).all())


# ---- no autograd graph where none was asked for ---------------------------------------------------------------
class _FC(nn.Module):
    """A fully connected head: the start map is a gradient one (Grad-CAM by default)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.fc1, self.fc_act, self.fc2 = nn.Linear(4 * 5 * 6, 7), nn.ReLU(), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc_act(self.fc1(self.act(self.conv(x)).flatten(1))))


def test_a_gradient_head_map_of_a_plain_input_holds_no_autograd_graph() -> None:
    """Guards against building the start map from the requires-grad copy the head's gradient was taken on:
    the map then carried a graph, and ``saliency(...).numpy()`` failed for every gradient head."""
    torch.manual_seed(0)
    dec = ierf.SRD(_FC().double().eval()).decompose(_x((2, 3, 5, 6)))
    for head in ("gradcam", "grad_x_act"):
        saliency = dec.saliency(1, head=head)
        assert not saliency.requires_grad and saliency.grad_fn is None, head
        assert saliency.numpy().shape == (2, 5, 6)


def test_the_state_of_a_differentiable_decomposition_is_detached() -> None:
    """Guards against state_dict handing back the tensors of a decomposition of an input that requires grad
    as they are: a store writing their bytes (numpy) failed, and they kept the graph alive."""
    torch.manual_seed(0)
    srd = ierf.SRD(_FC().double().eval(), head="grad_x_act")
    dec = srd.decompose(_x((1, 3, 5, 6)).requires_grad_(True))
    assert dec.saliency(1).requires_grad
    state = dec.state_dict()
    assert not any(v.requires_grad for v in state.values())
    again = srd.load_decomposition(
        {k: torch.from_numpy(v.numpy()) for k, v in state.items()}, like=ierf.StateLayout.of(dec)
    )
    torch.testing.assert_close(again.saliency(1), dec.saliency(1).detach(), atol=0, rtol=0)


# ---- states ---------------------------------------------------------------------------------------------------
def test_a_state_with_a_wrong_shapes_table_or_ratio_grid_is_refused_without_a_layout() -> None:
    """Guards against structure checks that count the shapes table's rows without reading their map ids,
    or compare a stage's ratios by batch and path count only: either state was taken and failed later (a
    missing map, a scatter off the grid)."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    state = srd.decompose(_x((1, 3, 16, 16))).state_dict()
    renumbered = dict(state, shapes=state["shapes"].clone())
    renumbered["shapes"][1, 0] = 2
    with pytest.raises(ValueError, match="'shapes' must list the model's"):
        srd.load_decomposition(renumbered)
    cropped = dict(state)
    cropped["stage.1.mu"] = state["stage.1.mu"][..., :-1]
    with pytest.raises(ValueError, match=r"'stage\.1\.mu' is"):
        srd.load_decomposition(cropped)


def test_a_state_whose_route_reads_its_own_map_or_whose_activation_has_other_channels_is_refused() -> None:
    """Guards against structure checks that let a stage read the map it ends at (its relevance would be added
    to a map already taken off the queue, and lost), or compare a kept activation by batch only."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    state = srd.decompose(_x((1, 3, 16, 16)), keep=[srd.layers[0]]).state_dict()
    own = dict(state, **{"stage.1.routes": state["stage.1.routes"].clone()})
    own["stage.1.routes"][0, 0] = 2  # stage 1 ends at map 2
    with pytest.raises(ValueError, match="path from map 2"):
        srd.load_decomposition(own)
    key = f"activation.{srd.program.source_id(srd.layers[0])}"
    fewer = dict(state, **{key: state[key][:, :-1]})
    with pytest.raises(ValueError, match=f"'{key}' is"):
        srd.load_decomposition(fewer)


def test_a_layout_refuses_a_state_with_an_extra_entry() -> None:
    """Guards against a layout check that looks for missing entries only: a state with another entry (another
    schema's, or a store's own bookkeeping) is not of this layout."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    dec = srd.decompose(_x((1, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        srd.load_decomposition(dict(dec.state_dict(), extra=torch.zeros(1)), like=ierf.StateLayout.of(dec))


def test_a_map_made_non_finite_by_a_state_loaded_without_a_layout_is_refused() -> None:
    """Guards against dropping the last check on the map: a state loaded without a layout is checked for
    structure, not values, and a NaN ratio in it came back as a NaN map instead of an error."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().double().eval())
    state = srd.decompose(_x((1, 3, 16, 16))).state_dict()
    poisoned = dict(state, **{"stage.1.mu": state["stage.1.mu"].clone()})
    poisoned["stage.1.mu"][0, :, 3, 3] = float("nan")  # every path of one PFV in the middle
    dec = srd.load_decomposition(poisoned)
    with pytest.raises(ValueError, match="the map is not finite"):
        dec.saliency(1)
    with pytest.raises(ValueError, match="the map is not finite"):
        dec.ierf(srd.layers[-1], torch.tensor([[0, 0]]))


def test_a_bfloat16_state_is_checked_against_its_layout() -> None:
    """Guards against reading a bfloat16 state through numpy (which has no bfloat16): the layout check raised
    TypeError on a bfloat16 model's own state."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().bfloat16().eval())
    dec = srd.decompose(torch.randn(1, 3, 16, 16).bfloat16())
    again = srd.load_decomposition(dec.state_dict(), like=ierf.StateLayout.of(dec))
    torch.testing.assert_close(again.saliency(1), dec.saliency(1), atol=0, rtol=0)


# ---- the parameter-derived cache ----------------------------------------------------------------------------
def test_channels_pruned_through_data_slices_are_seen_by_the_parameter_cache() -> None:
    """Guards against fingerprinting a source without its shape: ``w.data = w.data[:k]`` (channel pruning)
    keeps the memory, the strides and the version, so a re-laid-out kernel of the old shape was reused (the
    next explanation crashed, or mixed the pruned channels back in)."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        .double()
        .eval()
    )
    x = _x((2, 3, 7, 9), seed=1)
    srd = ierf.SRD(model)
    srd.saliency(x, 1)
    conv1, conv2 = model[0], model[2]
    conv1.weight.data, conv1.bias.data = conv1.weight.data[:5], conv1.bias.data[:5]
    conv2.weight.data = conv2.weight.data[:, :5]
    conv1.out_channels = conv2.in_channels = 5
    fresh = ierf.SRD(copy.deepcopy(model)).saliency(x, 1)
    torch.testing.assert_close(srd.saliency(x, 1), fresh, atol=0, rtol=0)


def test_layer_shapes_follow_a_layer_widened_by_new_parameters() -> None:
    """Guards against keying the cached layer shapes on the modules' settings alone: a convolution widened by
    new Parameters (its ``out_channels`` attribute left as it was, as surgery code often does) kept its old
    channel count."""
    torch.manual_seed(0)
    model = _TwoConvs().eval()
    srd = ierf.SRD(model)
    assert srd.layer_shape("act2", (8, 10)) == (5, 4, 5)
    model.conv2.weight = nn.Parameter(torch.randn(7, 4, 3, 3))
    model.conv2.bias = nn.Parameter(torch.randn(7))
    model.fc.weight = nn.Parameter(torch.randn(3, 7))
    assert srd.layer_shape("act2", (8, 10)) == (7, 4, 5)
    assert srd.decompose(torch.randn(1, 3, 8, 10)).layer_shape("act2") == (7, 4, 5)


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    return randomise_bn(model).double().eval()


def test_the_parameter_cache_keeps_the_entry_used_last() -> None:
    """Guards against evicting by insertion order: an entry read again just before the cache filled up was
    the one dropped (first in, first out), so a model's hottest kernels were rebuilt on every call."""
    from ierf.srd.derived import DerivedCache

    cache = DerivedCache(max_entries=2, max_bytes=1 << 30)
    sources = [torch.ones(3) * i for i in range(3)]
    cache.get("t0", (sources[0],), lambda: sources[0] * 2)
    cache.get("t1", (sources[1],), lambda: sources[1] * 2)
    cache.get("t0", (sources[0],), lambda: sources[0] * 2)  # t0 used last: t1 is the oldest now
    cache.get("t2", (sources[2],), lambda: sources[2] * 2)
    built = []
    cache.get("t0", (sources[0],), lambda: built.append(0) or sources[0] * 2)
    assert built == []
    cache.get("t1", (sources[1],), lambda: built.append(1) or sources[1] * 2)
    assert built == [1]


def test_a_map_is_differentiable_in_the_parameters_it_folds() -> None:
    """Guards against caching a fold built from parameters that require grad while autograd records: it is
    built without a graph, so the map of an input that requires grad lost its derivative with respect to the
    batch norm's weight (training with an explanation penalty)."""
    model = _conv_bn_net()
    srd = ierf.SRD(model)
    x = _x((1, 3, 5, 6), seed=1)
    weight = model[1].weight
    direction = _x(tuple(weight.shape), seed=2)

    def loss() -> torch.Tensor:
        return srd.decompose(x.clone().requires_grad_(True)).relevance(1).square().sum()

    (grad,) = torch.autograd.grad(loss(), weight)
    eps = 1e-5
    with torch.no_grad():
        weight.add_(eps * direction)
        plus = float(loss())
        weight.sub_(2 * eps * direction)
        minus = float(loss())
        weight.add_(eps * direction)
    assert float((grad * direction).sum()) == pytest.approx((plus - minus) / (2 * eps), rel=1e-5)


def test_a_call_under_inference_mode_leaves_later_differentiable_calls_working() -> None:
    """Guards against caching what a call under torch.inference_mode() built as it is: inference tensors
    cannot enter autograd, so the next map of an input that requires grad (a frozen model, an attack on the
    explanation) failed."""
    model = _conv_bn_net().requires_grad_(False)
    srd = ierf.SRD(model)
    x = _x((1, 3, 5, 6), seed=1)
    with torch.inference_mode():
        first = srd.saliency(x, 1)
    probe = x.clone().requires_grad_(True)
    saliency = srd.decompose(probe).saliency(1)
    (grad,) = torch.autograd.grad(saliency.square().sum(), probe)
    assert bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    torch.testing.assert_close(saliency.detach(), first, atol=0, rtol=0)


def test_replacing_a_weight_again_and_again_does_not_grow_the_parameter_cache() -> None:
    """Guards against keeping an entry until all of its sources die: a convolution's weight replaced by a new
    Parameter (its batch norm's fold, the entry's other source, still alive) left its scaled kernel behind on
    every replacement."""
    import gc

    from ierf.srd.derived import DERIVED

    model = _conv_bn_net()
    srd = ierf.SRD(model)
    x = _x((1, 3, 5, 6), seed=1)
    sizes = []
    for _ in range(4):
        model[0].weight = nn.Parameter(torch.randn_like(model[0].weight))
        srd.saliency(x, 1)
        gc.collect()
        sizes.append(len(DERIVED))
    assert sizes[1:] == sizes[:-1], sizes
