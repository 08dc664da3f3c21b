"""Engine refusals and branches that no other test reached (a line-coverage run of the whole suite left them
unexecuted). An untested refusal can itself be broken (a NameError inside its f-string, the wrong exception
type, a message naming the wrong thing, or a branch shadowed by an earlier check), and an untested computing
branch can return wrong values silently: each test here reaches one such line through the public API
(``ierf.SRD``, decomposition state round trips, ``ierf.metrics``, ``ierf.models``, the baselines, the CLI's
``main``) and checks the exception's type and key words, or the value against the float64 brute-force
reference (``ReferenceSRD``) or a hand computation. Two internals that the public API never reaches with
the value they compute (a pending uneven pool's total, the derived cache's oversize and list entries) are
checked directly against torch. Tests marked DEFECT FIXED failed before the fix next to them."""

from __future__ import annotations

import re
from collections.abc import Callable

import ierf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ierf import cli, images, metrics, models, viz
from ierf.errors import UnsupportedModelError
from ierf.srd.derived import DerivedCache
from ierf.srd.reference import ReferenceSRD
from ierf.srd.terms import Affine
from PIL import Image
from srd_nets import TinyVGG, assert_matches_reference
from test_fidelity_metrics import _gradient_explain
from torch import nn


@pytest.fixture(scope="module")
def vgg_state() -> tuple[ierf.SRD, dict[str, torch.Tensor]]:
    """One small decomposition's state, the base each state-validation test breaks in one place."""
    torch.manual_seed(0)
    srd = ierf.SRD(TinyVGG().eval())
    dec = srd.decompose(torch.rand(1, 3, 16, 16))
    return srd, dec.state_dict()


def _load(vgg_state, **changes: torch.Tensor | None) -> None:
    srd, state = vgg_state
    state = dict(state)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del state[key]
        else:
            state[key] = value
    srd.load_decomposition(state)


# -- decomposition state: structure checks (explainer._check_state_structure, Decomposition.from_state) ----
def test_state_with_another_schema_is_refused_naming_both_versions(vgg_state) -> None:
    with pytest.raises(ValueError, match=r"decomposition schema 99 != 1"):
        _load(vgg_state, schema=torch.tensor([99]))


def test_state_with_integer_logits_is_refused(vgg_state) -> None:
    logits = vgg_state[1]["logits"]
    with pytest.raises(ValueError, match=r"does not fit this model \(TinyVGG\): logits and head tensors must be float"):
        _load(vgg_state, logits=logits.long())


def test_state_with_a_complex_integer_entry_is_refused(vgg_state) -> None:
    with pytest.raises(ValueError, match=r"\(TinyVGG\): a complex tensor"):
        _load(vgg_state, schema=torch.tensor([1 + 0j]))


def test_state_with_one_dimensional_logits_is_refused(vgg_state) -> None:
    logits = vgg_state[1]["logits"]
    with pytest.raises(ValueError, match=r"logits must be \(B, classes\), got \(5,\)"):
        _load(vgg_state, logits=logits[0])


def test_state_with_an_empty_map_size_is_refused(vgg_state) -> None:
    shapes = vgg_state[1]["shapes"].clone()
    shapes[1, 2] = 0
    with pytest.raises(ValueError, match=r"'shapes' holds empty or negative sizes"):
        _load(vgg_state, shapes=shapes)


def test_state_with_routes_of_the_wrong_width_is_refused(vgg_state) -> None:
    routes = vgg_state[1]["stage.0.routes"]
    with pytest.raises(ValueError, match=r"'stage.0.routes' must be \(paths, 5\), got \(\d+, 4\)"):
        _load(vgg_state, stage__0__routes=routes[:, :4])


def test_state_with_a_stage_ending_elsewhere_is_refused(vgg_state) -> None:
    with pytest.raises(ValueError, match=r"stage 0 must end at map 1 and name its routes"):
        _load(vgg_state, stage__0__sink=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"stage 1 must end at map 2 and name its routes"):
        _load(vgg_state, stage__1__routes=None)


def test_state_with_a_head_of_the_wrong_shape_is_refused(vgg_state) -> None:
    contrib, bias = vgg_state[1]["head.contrib"], vgg_state[1]["head.bias"]
    with pytest.raises(ValueError, match=r"'head.contrib' is \(1, 4, \d+\), not \(1, 5, \d+\)"):
        _load(vgg_state, head__contrib=contrib[:, :4])
    with pytest.raises(ValueError, match=r"'head.bias' is \(5,\), not \(1, 5\)"):
        _load(vgg_state, head__bias=bias[0])


def test_state_with_an_unknown_entry_is_refused_by_name(vgg_state) -> None:
    with pytest.raises(ValueError, match=r"unexpected entry 'extra'"):
        _load(vgg_state, extra=torch.zeros(1))


def test_state_round_trip_still_loads(vgg_state) -> None:
    """The base state the tests above break loads as it is (so each refusal is the one change's)."""
    srd, state = vgg_state
    dec = srd.load_decomposition(dict(state))
    assert dec.saliency(1).shape == (1, 16, 16)


# -- rules: values that are not feature maps, and shapes of the SRD-only values ------------------------------
class _ConstOps(nn.Module):
    """A parameter table (fx traces a Parameter, where a buffer's arithmetic would be folded into a constant)
    reshaped by the tensor ops SRD also meets on feature maps: torch.transpose/Tensor.transpose, chunk, both
    splits, squeeze, unsqueeze, expand, a + b, division and a size lookup, all on non-map values, then used
    as a per-channel scale and shift of a map; and a map viewed into channel groups and back untransposed.
    Each op's result changes the logits (a wrong rule cannot cancel out)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.table = nn.Parameter(torch.linspace(0.5, 2.0, 8).reshape(4, 2))  # columns: scale, shift
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.transpose(self.table, 0, 1)  # (2, 4)
        scale, shift = torch.chunk(t, 2, 0)
        s2, _ = self.table.transpose(0, 1).split(1, dim=0)
        _, s3 = torch.split(t, 1, 0)
        scale = torch.squeeze(scale) + (s2.squeeze(0) * 0.25 - s3.squeeze(0) * 0.5)
        shift = shift.unsqueeze(2).unsqueeze(-1) / 2
        n = t.shape[1] // 2
        y = torch.relu(self.conv(x)) * scale.reshape(1, 4, 1, 1) + shift.expand(1, 4, 1, 1)
        y = torch.relu(self.conv2(y))
        b = y.shape[0]
        y = y.view(b, 2, n, 8, 8).view(b, 4, 8, 8)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class _Net(nn.Module):
    """conv + ReLU (a 4-channel PFV map ``a``), then ``fn(self, a)``, averaged over positions, then a linear
    head; ``fn`` is the one construct a test is about."""

    def __init__(self, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_nb = nn.Conv2d(4, 4, 1, bias=False)
        self.conv_g = nn.Conv2d(4, 4, 1, groups=2, bias=False)
        self.p = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.q = nn.Parameter(torch.linspace(0.5, 1.5, 256))
        self.lin = nn.Linear(4, 4)
        self.fn = fn
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fn(self, torch.relu(self.conv(x))).mean((2, 3)))


def _matches_reference(model: nn.Module, x: torch.Tensor) -> None:
    """The float64 decomposition equals the brute-force reference for every class (relevance need not sum
    to the logit: a PFV whose window holds only zeros is its bias alone, and its relevance stops there)."""
    model = model.double().eval()
    x = x.double()
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), range(dec.logits.shape[1]), 1e-9)


def test_tensor_ops_on_constants_compute_what_the_model_computes() -> None:
    torch.manual_seed(0)
    _matches_reference(_ConstOps(), torch.rand(1, 3, 8, 8))


_VALUE_CASES: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    # the shape of channel groups, before and after the (1, 2) transpose of a channel shuffle
    # (B, 1, C, H, W) groups: their middle sizes (1, 4), then (4, 1) once transposed, scale the map
    "groups_shape": lambda s, a: (
        lambda g: g.transpose(1, 2).reshape(a.shape[0], 4, 8, 8) * (g.shape[1] + 10 * g.shape[2])
    )(a.view(a.shape[0], 1, 4, 8, 8)),
    "swapped_groups_shape": lambda s, a: (lambda g: g.reshape(a.shape[0], 4, 8, 8) * (g.shape[1] + 10 * g.shape[2]))(
        a.view(a.shape[0], 1, 4, 8, 8).transpose(1, 2)
    ),
    # the view's shape given as one tuple
    "shuffle_shape_as_tuple": lambda s, a: (
        a.reshape((a.shape[0], 2, 2, 8, 8)).transpose(1, 2).reshape((a.shape[0], 4, 8, 8))
    ),
    # sizes of a pooled (B, C) vector and of a flattened map
    "vector_shape": lambda s, a: a * a.mean((2, 3)).shape[1],
    "flattened_shape": lambda s, a: a * torch.flatten(a, 1).shape[1],
    # a Linear's (B, C) output unsqueezed twice back into a (B, C, 1, 1) gate
    "vector_back_to_map": lambda s, a: (
        a * torch.sigmoid(F.linear(a.mean((2, 3)), torch.eye(4, dtype=a.dtype)).unsqueeze(-1).unsqueeze(-1))
    ),
    # a Linear's (B, C) output unsqueezed twice into a (B, C, 1, 1) map that a convolution reads (no gate)
    "vector_as_map_for_a_conv": lambda s, a: torch.relu(s.conv_nb(s.lin(a.mean((2, 3))).unsqueeze(-1).unsqueeze(-1))),
    # a full path, then paths on channel slices: the stage's sum starts as the first path's own tensor and
    # is copied before the slices are added into it
    "full_path_then_channel_slices": lambda s, a: torch.relu(
        torch.sigmoid(a) + torch.cat([s.conv_nb(a)[:, 2:], a[:, :2]], 1)
    ),
    # a 1x1 activation expanded as the map it gates
    "one_by_one_expand_as": lambda s, a: a * torch.sigmoid(F.adaptive_avg_pool2d(a, 1)).expand_as(a),
    # torch.chunk's sibling with its keyword, Tensor.split(split_size=...): channels 3 and 0..2 swapped
    "split_size_keyword": lambda s, a: (lambda p: torch.cat([p[1], p[0]], 1))(a.split(split_size=3, dim=1)),
    # the size of a (B, C) vector unsqueezed to (B, C, 1)
    "vector_column_shape": lambda s, a: a * a.mean((2, 3)).unsqueeze(-1).shape[2],
    # a channel range of a concatenation: a path wholly outside the range drops out
    "slice_drops_a_path": lambda s, a: torch.cat([a[:, :2], s.conv_nb(a)], 1)[:, 2:],
    # zero padding of a 1x1 convolution's output (one tap: materialised first)
    "zero_pad_of_one_by_one_conv": lambda s, a: F.pad(s.conv_nb(a), (1, 1, 1, 1)),
    # F.dropout in eval form (training=False) is the identity
    "dropout_not_training": lambda s, a: F.dropout(a, 0.5, False),
    # max pooling of a map times a number (one dense path, no constant)
    "max_pool_of_scaled_map": lambda s, a: F.max_pool2d(a * 2, 2),
}


@pytest.mark.parametrize("case", sorted(_VALUE_CASES))
def test_srd_only_values_compute_what_the_model_computes(case: str) -> None:
    torch.manual_seed(0)
    _matches_reference(_Net(_VALUE_CASES[case]), torch.rand(1, 3, 8, 8))


_REFUSALS: dict[str, tuple[Callable[[nn.Module, torch.Tensor], torch.Tensor], str]] = {
    "cat_with_a_constant": (
        lambda s, a: torch.cat([a[:, :2], s.p[:2].reshape(1, 2, 1, 1).expand(1, 2, 8, 8)], 1),
        r"'cat' in the model's top-level forward: expected a feature map, got Tensor",
    ),
    "max_pool_of_map_plus_constant": (
        lambda s, a: F.max_pool2d(s.conv_nb(a) + 1.0, 2),
        r"max pooling of a map plus a constant, such as a convolution's output \(max pooling needs an activation",
    ),
    "max_pool_of_sum_of_maps": (
        lambda s, a: F.max_pool2d(s.conv_nb(a) + s.conv_nb(torch.sigmoid(a)), 2),
        r"max pooling of a sum of several feature maps \(max pooling needs an activation first\)",
    ),
    "max_pool_of_conv_beside_map": (
        lambda s, a: F.max_pool2d(torch.cat([s.conv_nb(a)[:, :2], a[:, 2:]], 1), 2),
        r"max pooling of a value that is not made of PFV maps as they are",
    ),
    "expand_over_the_batch": (
        lambda s, a: a * F.adaptive_avg_pool2d(torch.sigmoid(a), 1).expand(2, 4, 8, 8),
        r"'expand' .*: expand of a \(B, C, 1, 1\) map to \(2, 4, 8, 8\) \(only over positions\)",
    ),
    "expanded_map_times_number": (
        lambda s, a: F.adaptive_avg_pool2d(a, 1).expand(1, 4, 8, 8) * 2.0,
        r"'mul' .*: product of an expanded \(B, C, 1, 1\) map with anything but the map it was expanded to",
    ),
    "map_times_bool": (lambda s, a: a * True, r"'mul' .*: multiplication of a feature map by bool"),
    "cat_along_rows": (lambda s, a: torch.cat([a, a], 2), r"torch.cat along dim 2 \(only channel concatenation\)"),
    "channel_groups_reshaped_elsewhere": (
        lambda s, a: a.view(1, 2, 2, 8, 8).transpose(1, 2).reshape(1, 2, 2, 64).reshape(1, 4, 8, 8),
        r"'reshape' .*: reshape\(1, 2, 2, 64\) of channel groups \(only back to \(B, C, H, W\)\)",
    ),
    "transpose_of_map": (lambda s, a: a.transpose(2, 3), r"'transpose' .*: transpose\(2, 3\) of a feature map"),
    "attribute_of_map": (lambda s, a: a * a.ndim, r"attribute 'ndim' of a feature map"),
    "comparison_of_map": (lambda s, a: a * (a > 0), r"'gt' .*: comparison \(gt\) of a feature map"),
    "floordiv_of_map": (lambda s, a: a // 2, r"'floordiv' .*: floordiv on a feature map"),
    "flattened_map_times_tensor": (
        lambda s, a: (torch.flatten(a, 1) * s.q).reshape(1, 4, 8, 8),
        r"'mul' .*: multiplication of a flattened or pooled vector by a tensor of shape \(256,\) \(only a number",
    ),
    "channel_range_of_grouped_conv": (
        lambda s, a: torch.cat([s.conv_g(a)[:, :2], a[:, 2:]], 1),
        r"'getitem' .*: channel indexing of a grouped convolution's output",
    ),
    "padded_avg_pool_after_conv": (
        lambda s, a: F.avg_pool2d(F.conv2d(a, torch.ones(4, 4, 3, 3) / 9), 3, 1, 1),
        r"'avg_pool2d' .*: padded average pooling directly after a \(3, 3\) convolution \(no activation",
    ),
    "grouped_conv_channel_shuffle": (
        lambda s, a: s.conv_g(a).view(1, 2, 2, 8, 8).transpose(1, 2).reshape(1, 4, 8, 8),
        r"'reshape' .*: channel permutation of a grouped convolution's output",
    ),
}


@pytest.mark.parametrize("case", sorted(_REFUSALS))
def test_unsupported_constructs_are_refused_naming_the_op(case: str) -> None:
    fn, message = _REFUSALS[case]
    torch.manual_seed(0)
    model = _Net(fn).eval()
    x = torch.rand(1, 3, 8, 8)
    model(x)  # the model itself runs: the refusal is SRD's
    with pytest.raises(UnsupportedModelError, match=message):
        ierf.SRD(model, head="exact").decompose(x)


def test_constructs_the_model_cannot_run_are_refused_by_srd_too() -> None:
    """A factor that does not broadcast to the map, and an assertion on a map: the model's own forward raises
    (SRD swallows that error and lets its own run say what it cannot decompose)."""
    x = torch.rand(1, 3, 8, 8)
    misfit = _Net(lambda s, a: a * s.p[:3]).eval()
    with pytest.raises(
        UnsupportedModelError,
        match=r"multiplication of a feature map of shape \(1, 4, 8, 8\) by a tensor of shape \(3,\)",
    ):
        ierf.SRD(misfit).decompose(x)
    asserted = _Net(lambda s, a: (torch._assert(a, "x"), a)[1]).eval()
    with pytest.raises(UnsupportedModelError, match=r"'_assert' .*: an assertion on a feature map"):
        ierf.SRD(asserted).decompose(x)


# -- ierf.metrics argument checks ----------------------------------------------------------------------------
def test_metric_maps_that_are_not_tensors_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"^b must be a torch.Tensor, got list$"):
        metrics.pearson(torch.zeros(1, 4, 4), [[0.0]])


def test_boxes_of_the_wrong_width_are_refused() -> None:
    with pytest.raises(ValueError, match=r"boxes must have shape \(B, 4\), got \(2, 3\)"):
        metrics.boxes_to_masks(torch.zeros(2, 3, dtype=torch.long), (4, 4))


def test_masks_of_another_size_than_the_maps_are_refused() -> None:
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match=r"masks must match maps \(2, 4, 4\), got \(2, 5, 5\)"):
        metrics.pointing_game(maps, torch.ones(2, 5, 5, dtype=torch.bool))


def test_top_k_fraction_outside_its_range_is_refused() -> None:
    a = torch.rand(1, 4, 4)
    for fraction in (0, 0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\], got {fraction}"):
            metrics.top_k_intersection(a, a, fraction=fraction)
    assert float(metrics.top_k_intersection(a, a, fraction=1)[0]) == 1.0


def test_max_sensitivity_refuses_an_input_that_is_not_a_batch_of_images() -> None:
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got \(3, 8, 8\)"):
        metrics.max_sensitivity(lambda x, t: x.sum(1), torch.rand(3, 8, 8), torch.tensor([0]))


def _small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_insertion_deletion_refuses_classes_that_are_not_an_integer_batch_table() -> None:
    model, x = _small_classifier(), torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    with pytest.raises(TypeError, match=r"classes must be an integer tensor \(B, K\)"):
        metrics.insertion_deletion(model, x, 0, maps, classes=torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"classes must be an integer tensor \(B, K\)"):
        metrics.insertion_deletion(model, x, 0, maps, classes=[[0, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"classes must have shape \(2, K\), got \(1, 2\)"):
        metrics.insertion_deletion(model, x, 0, maps, classes=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"classes must have shape \(2, K\), got \(2,\)"):
        metrics.insertion_deletion(model, x, 0, maps, classes=torch.tensor([0, 1]))


def test_manipulation_attack_refuses_target_maps_of_another_size() -> None:
    model, x = _small_classifier(), torch.rand(2, 3, 12, 12)
    with pytest.raises(ValueError, match=r"target_maps must be \(2, 12, 12\), got \(2, 12, 11\)"):
        metrics.manipulation_attack(
            _gradient_explain,
            _gradient_explain(model),
            model,
            x,
            torch.tensor([0, 1]),
            torch.rand(2, 12, 11),
            epsilon=0.1,
            bounds=(0, 1),
            steps=1,
        )


def test_manipulation_summary_is_the_mean_of_each_score() -> None:
    model, x = _small_classifier(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    goal = torch.rand(2, 12, 12, generator=torch.Generator().manual_seed(2))
    result = metrics.manipulation_attack(
        _gradient_explain,
        _gradient_explain(model),
        model,
        x,
        torch.tensor([0, 1]),
        goal,
        epsilon=0.05,
        bounds=(0, 1),
        steps=2,
    )
    summary = result.summary()
    assert set(summary) == {
        "pearson_before_after",
        "ssim_before_after",
        "topk_before_after",
        "pearson_after_target",
        "prob_change",
        "prediction_kept",
        "smoothed",
    }
    for key in ("pearson_before_after", "ssim_before_after", "topk_before_after", "pearson_after_target"):
        assert summary[key] == pytest.approx(float(getattr(result, key).mean()))
    assert summary["prob_change"] == pytest.approx(float(result.prob_change.mean()))
    assert summary["prediction_kept"] == float(result.prediction_kept.float().mean())
    assert summary["smoothed"] == (1.0 if result.smoothed else 0.0)
    assert all(isinstance(v, float) for v in summary.values())


# -- ierf.viz argument checks --------------------------------------------------------------------------------
def test_overlay_refuses_an_empty_map_and_a_dim_outside_zero_one() -> None:
    image = Image.new("RGB", (6, 4))
    with pytest.raises(ValueError, match=r"map is empty, shape \(0, 4\)"):
        viz.overlay_signed(image, np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"dim must be in \[0, 1\], got 1.5"):
        viz.overlay_signed(image, np.ones((4, 6)), dim=1.5)
    assert viz.overlay_signed(image, np.ones((4, 6)), dim=1.0, colorbar=False).size == (6, 4)


# -- ierf.models, ierf.images, targets, the CLI's output ----------------------------------------------------
def test_an_empty_class_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^class name is empty$"):
        models.class_index("  ", ["cat", "dog"])


def test_normalize_refuses_what_is_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"normalize expects a uint8 torch.Tensor, got ndarray"):
        models.IMAGENET.normalize(np.zeros((3, 4, 4), np.uint8))


def test_resize_smaller_than_the_crop_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^resize 8 is smaller than crop 9$"):
        images.resize_crop(np.zeros((10, 20, 3), np.uint8), 8, 9)
    assert images.resize_crop(np.zeros((10, 20, 3), np.uint8), 9, 9).shape == (9, 9, 3)


def test_a_target_of_another_type_is_refused_naming_it() -> None:
    model = _small_classifier()
    with pytest.raises(TypeError, match=r"^target must be an int or an integer tensor, got str$"):
        metrics.insertion_deletion(model, torch.rand(1, 3, 8, 8), "cat", torch.rand(1, 8, 8))


def test_a_truncated_weights_file_is_refused_in_one_line_naming_the_error(tmp_path) -> None:
    """torch.load's error on a cut zip archive is a RuntimeError (not an UnpicklingError): its first line,
    with its type, in the one-line refusal."""
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(
        ValueError,
        match=r"cannot load weights from .*cut\.pth: not a readable PyTorch state_dict "
        r"file \(RuntimeError: [^\n]+\)$",
    ) as caught:
        models.load_model("resnet18", weights=path)
    assert "\n" not in str(caught.value)


def test_weights_of_the_wrong_shape_are_refused_naming_the_tensor(tmp_path) -> None:
    state = models.build_module("mobilenet_v2").state_dict()
    state["classifier.1.weight"] = torch.zeros(10, 1280)
    state["classifier.1.bias"] = torch.zeros(10)
    path = tmp_path / "ten_classes.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"does not fit mobilenet_v2: shape \(file != model\) classifier\.1\.weight \(10, 1280\) != "
        r"\(1000, 1280\), classifier\.1\.bias \(10,\) != \(1000,\)$",
    ):
        models.load_model("mobilenet_v2", weights=path)


def test_cli_output_folder_that_cannot_be_made_is_a_usage_error(tmp_path, capsys) -> None:
    """A dangling symlink passes the output check (its nearest existing ancestor is a writable folder), and
    making the folder then fails: one usage line, exit status 2, nothing written."""
    (tmp_path / "link").symlink_to(tmp_path / "missing" / "target")
    out = tmp_path / "link" / "out.png"
    assert cli.main(["demo-image", "coffee", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {str(out)!r}: File exists" in err
    assert not (tmp_path / "missing").exists()


# -- SRD and its program: refusals and less common graphs ---------------------------------------------------
class _Body(nn.Module):
    """A conv, a raw convolution weight, a parameter vector and a linear head; ``body(self, x)`` is the
    forward a test is about."""

    def __init__(self, body: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.p = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.fc = nn.Linear(4, 3)
        self.narrow = False
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)


def _plain(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return s.fc(torch.relu(s.conv(x)).mean((2, 3)))


def test_srd_refuses_what_is_not_a_module_and_a_layer_that_is_not_a_name() -> None:
    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got str$"):
        ierf.SRD("resnet18")  # type: ignore[arg-type]
    srd = ierf.SRD(_Body(_plain).eval())
    with pytest.raises(TypeError, match=r"^layer must be a string, got int$"):
        srd.layer_shape(1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "shape"),
    [(lambda s, x: torch.relu(s.conv(x)), "(1, 4, 8, 8)"), (lambda s, x: x * 1.0, "(1, 3, 8, 8)")],
    ids=["activation-map", "input"],
)
def test_a_model_returning_a_map_is_refused_naming_its_shape(body, shape: str) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"must return \(B, num_classes\) logits, got {re.escape(shape)}"):
        ierf.SRD(_Body(body).eval()).decompose(torch.rand(1, 3, 8, 8))


def test_an_activation_of_a_flattened_map_is_refused() -> None:
    body = lambda s, x: s.fc(torch.relu(torch.flatten(s.conv(x), 1)).reshape(1, 4, 64).mean(2))  # noqa: E731
    with pytest.raises(UnsupportedModelError, match=r"'relu' in the model's top-level forward: activation on a flat"):
        ierf.SRD(_Body(body).eval()).decompose(torch.rand(1, 3, 8, 8))


def _in_place_add(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = s.conv(x)
    y += 1.0  # a constant added in place to a map nothing reads afterwards (fx records it as an add)
    return s.fc(torch.relu(y).mean((2, 3)))


def _conv_of_a_computed_weight(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # F.conv2d whose weight is computed in the forward: the first convolution's in-channels are not known
    # without running it, so SRD leaves the channel check to the forward
    return s.fc(torch.relu(F.conv2d(x, s.w * 2, padding=1)).mean((2, 3)))


@pytest.mark.parametrize("body", [_in_place_add, _conv_of_a_computed_weight], ids=["iadd", "computed-weight"])
def test_less_common_forwards_compute_what_the_model_computes(body) -> None:
    torch.manual_seed(0)
    _matches_reference(_Body(body), torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("channels", [2, 4])
def test_a_computed_conv_weight_still_refuses_an_input_with_other_channels(channels: int) -> None:
    """DEFECT FIXED: the model's own forward raises (the weight takes 3 channels), but SRD returned logits
    for a 2-channel input (its convolution read a slice of the weight) and raised an internal reshape
    error for a 4-channel one."""
    model = _Body(_conv_of_a_computed_weight).eval()
    x = torch.rand(1, channels, 8, 8)
    with pytest.raises(RuntimeError, match=r"expected input\[1, \d, 8, 8\] to have 3 channels"):
        model(x)
    with pytest.raises(
        ValueError,
        match=rf"'conv2d' .*: the convolution takes 3 input channels \(weight "
        rf"\(4, 3, 3, 3\), groups=1\) but its input has {channels}",
    ):
        ierf.SRD(model).decompose(x)


def test_a_convolution_deeper_in_that_does_not_fit_its_input_is_refused() -> None:
    """DEFECT FIXED: a model whose second convolution takes 5 channels from a 4-channel map cannot run at
    all, yet SRD explained it (with a slice of the weight)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(5, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 3),
    ).eval()
    with pytest.raises(
        ValueError,
        match=r"module '2' \(Conv2d\): the convolution takes 5 input channels "
        r"\(weight \(2, 5, 1, 1\), groups=1\) but its input has 4",
    ):
        ierf.SRD(model).decompose(torch.rand(1, 3, 8, 8))


def test_grouped_and_depthwise_convolutions_still_fit() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    _matches_reference(model, torch.rand(1, 3, 6, 6))


def test_a_runtime_error_of_the_model_itself_propagates_as_it_is() -> None:
    """Not a size problem (those become InputSizeError): the model's own error, unchanged."""
    model = _Body(lambda s, x: _plain(s, x) + (s.p[:3] + s.p)[:3]).eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(3\) must match the size of tensor b \(4\)"):
        model(x)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(3\) must match the size of tensor b \(4\)") as caught:
        ierf.SRD(model).decompose(x)
    assert not isinstance(caught.value, ierf.InputSizeError)


def test_srd_ierf_leaves_a_wrong_x_to_the_decomposition_to_name() -> None:
    srd = ierf.SRD(_Body(_plain).eval())
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got ndarray$"):
        srd.ierf(np.zeros((1, 3, 8, 8), np.float32), "relu", torch.tensor([[0, 0]]))


@pytest.mark.parametrize("head", ["gradcam", "grad_x_act"])
def test_a_gradient_head_on_a_model_without_a_spatial_map_is_refused_in_words(head: str) -> None:
    """DEFECT FIXED: an MLP (or a model whose maps all have one position) has no map for a gradient start
    ("auto" picks the exact head there), and an explicit gradient head ended in KeyError: 0."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.rand(1, 3, 2, 2)
    dec = ierf.SRD(mlp, head=head).decompose(x)
    with pytest.raises(
        ValueError,
        match=rf"head {head!r} starts on the last feature map with more than one "
        r"position, and this model has none .*use head='exact'",
    ):
        dec.saliency(0)
    assert dec.saliency(0, head="exact").shape == (1, 2, 2)
    assert ierf.SRD(mlp).decompose(x).saliency(0).shape == (1, 2, 2)  # "auto": the exact head


def test_a_traced_forward_with_another_output_shape_is_refused() -> None:
    """DEFECT FIXED: Python the tracer cannot see (here a flag set after the explainer was built) made the
    model return 2 logits and the traced graph 3; the check compared values only for equal shapes and
    let SRD explain the other function silently."""

    def narrowed(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = _plain(s, x)
        return out[:, :2] if s.narrow else out

    model = _Body(narrowed).eval()
    srd = ierf.SRD(model)
    model.narrow = True
    with pytest.raises(
        UnsupportedModelError,
        match=r"does not reproduce its output \(logits of shape \(1, 3\), the "
        r"model's own \(1, 2\)\)",
    ):
        srd.decompose(torch.rand(1, 3, 8, 8))
    model.narrow = False
    assert srd.decompose(torch.rand(1, 3, 8, 8)).logits.shape == (1, 3)


def test_maps_of_different_sizes_are_not_concatenated() -> None:
    model = _Net(lambda s, a: torch.cat([a, F.avg_pool2d(a, 2)], 1)[:, :4]).eval()
    with pytest.raises(UnsupportedModelError, match=r"'cat' .*: torch.cat of maps with different spatial sizes"):
        ierf.SRD(model).decompose(torch.rand(1, 3, 8, 8))


def test_uneven_adaptive_pooling_of_a_map_with_a_constant_is_refused() -> None:
    """Uneven windows are folded into the Linear that reads them, which works for PFV paths only."""

    class Uneven(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(36, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv2(torch.relu(self.conv(x))), 3), 1))

    with pytest.raises(
        UnsupportedModelError,
        match=r"adaptive average pooling from 8x8 to 3x3 has uneven windows; "
        r"supported only on a PFV map \(no bias\)",
    ):
        ierf.SRD(Uneven().eval()).decompose(torch.rand(1, 3, 8, 8))


def test_register_activation_refuses_a_function() -> None:
    with pytest.raises(TypeError, match=r"register_activation takes nn.Module subclasses, got <built-in"):
        ierf.srd.register_activation(torch.sigmoid)


class _TwoHeads(nn.Module):
    """Two feature maps; the logits read the last one, scaled by a parameter, or both (``reads_both``)."""

    def __init__(self, reads_both: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.fc2 = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.reads_both = reads_both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = torch.relu(self.c1(x))
        a2 = torch.relu(self.c2(a1))
        out = self.fc(a2.mean((2, 3)))
        return out + self.fc2(a1.mean((2, 3))) if self.reads_both else out * self.scale


def test_a_gradient_head_that_also_reads_an_earlier_map_is_refused() -> None:
    dec = ierf.SRD(_TwoHeads(reads_both=True).eval(), head="gradcam").decompose(torch.rand(1, 3, 8, 8))
    with pytest.raises(
        UnsupportedModelError,
        match=r"the head after 'relu_1' also reads 'fc2'; a gradient start map "
        r"needs a head that depends on the last feature map only",
    ):
        dec.saliency(0)


def test_a_gradient_head_reading_a_parameter_is_its_grad_cam() -> None:
    """The head's own parameter (a get_attr node) is copied into the head module: the start map is the
    Grad-CAM of the last map, computed here with autograd on the model itself."""
    torch.manual_seed(0)
    model = _TwoHeads(reads_both=False).double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    dec = ierf.SRD(model, head="gradcam").decompose(x)
    a = torch.relu(model.c2(torch.relu(model.c1(x)))).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad((model.fc(a.mean((2, 3))) * model.scale)[:, 1].sum(), a)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1)).detach()
    torch.testing.assert_close(dec.layer_relevance("relu:1", 1), expected, atol=1e-12, rtol=1e-12)


def test_a_pending_uneven_pool_totals_to_the_adaptive_average_pool() -> None:
    """Affine.total of a pending uneven pooling (the public API folds it into the Linear that reads it, so
    nothing else reads the pending value; checked directly against torch)."""
    x = torch.rand(2, 3, 7, 5, dtype=torch.float64)
    pooled = Affine.of_source(x, 0).adaptive_avg_pool(3, 4, "test")
    assert pooled.pending_pool is not None
    torch.testing.assert_close(pooled.total(), F.adaptive_avg_pool2d(x, (3, 4)), atol=1e-14, rtol=0)


class _PaddingOnly(nn.Module):
    """A 1x1 map, then a 1x1 convolution of stride 2 and padding 1: each of its 2x2 outputs reads only
    padding, so its one path lands wholly outside the map below (nothing to scatter)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 1, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class _MapAsLogits(nn.Module):
    """The logits are a 1x1 activation map itself, flattened and scaled: the head's one path is that map."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.relu(self.c1(x)), 1) * 2


class _FlatPlusConstant(nn.Module):
    """A constant added to a flattened map before the Linear that reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.c1(x)), 1) + 0.5)


@pytest.mark.parametrize(
    ("net", "size"),
    [(_PaddingOnly, 3), (_MapAsLogits, 8), (_FlatPlusConstant, 4)],
    ids=["path-in-padding-only", "map-as-logits", "flattened-plus-constant"],
)
def test_less_common_shapes_compute_what_the_model_computes(net: type[nn.Module], size: int) -> None:
    torch.manual_seed(0)
    _matches_reference(net(), torch.rand(1, 3, size, size))


def test_a_path_in_padding_only_carries_no_relevance() -> None:
    """Its outputs are the bias alone (a PFV with no contributor): every class's input map is zero there."""
    torch.manual_seed(0)
    dec = ierf.SRD(_PaddingOnly().double().eval(), head="exact").decompose(torch.rand(1, 3, 3, 3, dtype=torch.float64))
    assert dec.relevance(0).abs().max() == 0 and dec.ierf("relu:1", torch.tensor([[0, 0]])).abs().max() == 0


# -- baselines and fidelity tools: argument checks ----------------------------------------------------------
@pytest.mark.parametrize("name", ["GradCAMExplainer", "Gradient", "LRPExplainer"])
def test_baselines_refuse_what_is_not_a_module(name: str) -> None:
    from ierf import baselines

    with pytest.raises(TypeError, match=r"^model must be a torch.nn.Module, got str$"):
        getattr(baselines, name)("resnet18")


def test_baselines_package_names_only_what_it_has() -> None:
    from ierf import baselines

    assert baselines.SmoothGrad.__name__ == "SmoothGrad"  # lazily imported from its module
    assert baselines.gradient.SmoothGrad is baselines.SmoothGrad
    with pytest.raises(AttributeError, match=r"module 'ierf.baselines' has no attribute 'GradCam'"):
        baselines.GradCam  # noqa: B018


def test_lrp_refuses_a_model_whose_batch_norm_merges_cannot_be_checked() -> None:
    """A conv + batch norm pair (a merge candidate) in a forward torch.fx cannot trace (data-dependent
    control flow): the canonizer cannot check the merge, so LRP says so."""
    from ierf.baselines import LRPExplainer

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            if y.sum() > 0:
                y = y * 2
            return self.fc(y.mean((2, 3)))

    with pytest.raises(
        UnsupportedModelError,
        match=r"LRP canonizer: could not trace Branchy with torch.fx to check "
        r"its batch-norm merges \(TraceError: ",
    ):
        LRPExplainer(Branchy().eval()).saliency(torch.rand(1, 3, 8, 8), 0)


def test_fidelity_tools_refuse_arguments_out_of_range() -> None:
    from ierf.fidelity import apop, grid, synthetic

    with pytest.raises(ValueError, match=r"^kind must be 'zeros' or 'noise', got 'ones'$"):
        apop.uninformative(torch.zeros(1, 3, 4, 4), "ones")
    images = [grid.GridImage(name=str(i), pixels=torch.zeros(3, 4, 4), label=i, prob=1.0) for i in range(4)]
    for orders in (0, 5):
        with pytest.raises(ValueError, match=rf"^orders must be in 1\.\.4, got {orders}$"):
            grid.build_grids(images, orders=orders)
    with pytest.raises(ValueError, match=r"^max_distractors must be >= 0, got -1$"):
        synthetic.SyntheticConfig(max_distractors=-1)


def test_an_activation_pattern_counts_its_units() -> None:
    """One state per ReLU output element and one index per max-pool output element, per call."""
    from ierf.fidelity.apop import APOP

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    _, pattern = APOP(model.eval()).record(torch.rand(2, 3, 4, 4))
    assert pattern.units() == 2 * 4 * 4 * 4 + 2 * 4 * 2 * 2


def test_the_derived_cache_keeps_what_fits_and_lists_without_pinning_their_source() -> None:
    """A value larger than the cache's budget is handed back uncached; a list of views of a source is kept
    as views of a detached alias (the entry must not keep its source alive); a non-tensor costs nothing."""
    w = torch.arange(12.0)
    cache = DerivedCache(max_bytes=32)
    big = cache.get("big", (w,), lambda: torch.zeros(100))
    assert len(cache) == 0 and cache.get("big", (w,), lambda: torch.zeros(100)) is not big
    views = cache.get("views", (w,), lambda: [w.view(3, 4), w[:6]])
    assert len(cache) == 1 and all(v._base is not w for v in views)
    assert torch.equal(views[0], w.view(3, 4)) and torch.equal(views[1], w[:6])
    assert views[0].data_ptr() == w.data_ptr()  # the same memory: no copy
    assert cache.get("views", (w,), lambda: pytest.fail("rebuilt")) is views
    assert cache.get("count", (w,), lambda: 3) == 3 and len(cache) == 2


class _ShuffleWithoutContiguous(nn.Module):
    """A channel shuffle whose second view needs ``.contiguous()``: without it the model raises on every input."""

    def __init__(self, contiguous: bool = False) -> None:
        super().__init__()
        self.contiguous = contiguous
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b, c, h, w = a.shape
        g = a.view(b, 2, c // 2, h, w).transpose(1, 2)
        a = (g.contiguous() if self.contiguous else g).view(b, c, h, w)
        return self.fc(F.relu(self.c2(a)).mean((2, 3)))


def test_a_model_whose_own_forward_raises_is_refused_though_its_graph_runs() -> None:
    """DEFECT FIXED: SRD swallowed the model's own error and explained the replay of its traced graph, which
    treats the shuffle as channel groups and never meets the non-contiguous view; the map summed to logits the
    model cannot compute. Refused now, naming the model's error; the contiguous spelling is still explained."""
    torch.manual_seed(0)
    model = _ShuffleWithoutContiguous().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        model(x)
    with pytest.raises(UnsupportedModelError, match=r"own forward raises RuntimeError \(view size is not compatible"):
        ierf.SRD(model).saliency(x, 1)
    assert not model._forward_hooks and not model._forward_pre_hooks
    fixed = _ShuffleWithoutContiguous(contiguous=True).eval()
    fixed.load_state_dict(model.state_dict())
    saliency = ierf.SRD(fixed).saliency(x, 1)
    assert torch.allclose(saliency.sum(), fixed(x)[0, 1], rtol=1e-4, atol=1e-5)
