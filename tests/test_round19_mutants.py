"""Mutation round 19 on ``ierf.metrics``: each test pins a documented behaviour that a surviving mutant broke
without any other test noticing (the mutant's id is in each docstring)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ierf.errors import UnsupportedModelError
from ierf.metrics import (
    boxes_to_masks,
    energy_in_box,
    gaussian_blur,
    gini,
    insertion_deletion,
    manipulation_attack,
    pointing_game,
    smooth_activations_copy,
    ssim,
    top_k_intersection,
)
from ierf.metrics.perturbation import PerturbationCurves
from test_fidelity_metrics import _gradient_explain, _PixelModel, _small_net
from torch import nn


# -- checks shared by the metrics ---------------------------------------------------------------------------------
def test_metrics_refuse_integer_maps_by_name() -> None:
    """(CK2) Maps must be floating point: an integer map (a mask or a label image passed by mistake) is refused
    by name, not scored as if it were an attribution."""
    maps = torch.ones(1, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="floating point"):
        gini(maps)
    with pytest.raises(TypeError, match="floating point"):
        pointing_game(maps, torch.tensor([[0, 0, 2, 2]]))


def test_metrics_refuse_an_empty_batch_by_name() -> None:
    """(CK3) An empty batch is refused: its mean score over images would be NaN in a results table, far from
    the call that made it."""
    with pytest.raises(ValueError, match="empty batch"):
        gini(torch.zeros(0, 4, 4))


def test_gini_sums_in_float64() -> None:
    """(G5) Float16 maps are accepted, so the sums run in float64: in float16 sixteen values of 60000 overflow
    to inf and a uniform map scored NaN or 0 by accident, never by design."""
    maps = torch.full((1, 4, 4), 60000.0, dtype=torch.float16)
    maps[0, 0, 0] = 0.0
    # 15 equal values and one zero: G = (sum_{i=2..16} (2i - 17)) / (16 * 15) = 15 / 240
    assert gini(maps).item() == pytest.approx(15 / 240, rel=1e-6)


# -- localisation ---------------------------------------------------------------------------------------------------
def test_bool_and_fractional_boxes_are_refused() -> None:
    """(L1, L2) Boxes are pixel coordinates: a bool tensor (a mask row mistaken for a box) or a fractional
    float (2.5, silently truncated to 2) is refused, not cast."""
    with pytest.raises(TypeError, match="pixel coordinates"):
        boxes_to_masks(torch.tensor([[False, False, True, True]]), (4, 4))
    with pytest.raises(ValueError, match="whole pixel"):
        boxes_to_masks(torch.tensor([[0.0, 0.0, 2.5, 2.0]]), (4, 4))
    # whole-number floats are coordinates too
    assert boxes_to_masks(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), (4, 4)).sum() == 4


def test_a_box_ending_at_the_top_or_left_edge_is_outside() -> None:
    """(L4) End-exclusive: a box with y1 = 0 (or x1 = 0) covers no pixel of the map, so it is refused like one
    past the far edge; scoring it would give every method 0."""
    for box in ([-2, 0, 0, 3], [0, -3, 2, 0]):
        with pytest.raises(ValueError, match="outside the 4x4 map"):
            boxes_to_masks(torch.tensor([box]), (4, 4))
    # a box that reaches into the map from outside is kept (clipped to the map)
    assert boxes_to_masks(torch.tensor([[-2, 0, 1, 3]]), (4, 4)).sum() == 3


def test_boxes_on_a_non_square_map_use_rows_then_columns() -> None:
    """(L8) size is (H, W) and boxes (y0, x0, y1, x1): on a wide map the masks are (B, H, W) and the box
    lands where its coordinates say (photos are rarely square)."""
    masks = boxes_to_masks(torch.tensor([[0, 4, 2, 6]]), (3, 6))
    assert masks.shape == (1, 3, 6)
    assert masks[0, :2, 4:].all() and masks.sum() == 4
    maps = torch.zeros(1, 3, 6)
    maps[0, 1, 5] = 1.0
    assert pointing_game(maps, torch.tensor([[0, 4, 2, 6]])).item() == 1.0
    assert energy_in_box(maps, torch.tensor([[0, 4, 2, 6]])).item() == 1.0


def test_one_float_mask_for_a_batch_is_named_as_a_mask() -> None:
    """(L9) A single (H, W) mask given for a batch is named as such (with the expand() fix), also when it is
    a float mask, rather than reported as a malformed box array."""
    maps = torch.zeros(2, 5, 5)
    with pytest.raises(ValueError, match="one per map"):
        pointing_game(maps, torch.ones(5, 5))


# -- similarity -------------------------------------------------------------------------------------------------------
def test_ssim_of_a_blob_and_its_negation_is_the_documented_065() -> None:
    """(S6) SSIM runs with data_range = 2, the span of maps scaled into [-1, 1]; the README's number for a
    smooth blob against its negation (0.65) depends on it (data_range 1 gives 0.72)."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / 40)[None]
    assert ssim(blob, -blob).item() == pytest.approx(0.65, abs=0.01)


def test_ssim_takes_maps_exactly_the_size_of_its_window() -> None:
    """(S8) Only maps *smaller* than the 7x7 window are refused; a 7x7 map is one window and is scored."""
    a = torch.randn(1, 7, 7, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(a[:, :6], a[:, :6])


def test_top_k_fraction_one_is_allowed_and_counts_every_pixel() -> None:
    """(S9) fraction is in (0, 1]: 1 takes every pixel, so any two maps overlap fully."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g)
    assert top_k_intersection(a, b, fraction=1.0).item() == pytest.approx(1.0)


def test_top_k_rounds_k_to_the_nearest_pixel() -> None:
    """(S10) k = round(fraction x H x W), not floored: 10 % of 49 pixels is 5, so a map pair that shares its
    top 4 but not its 5th pixel overlaps 4/5, not 4/4."""
    a = torch.zeros(1, 7, 7)
    b = torch.zeros(1, 7, 7)
    a.view(-1)[:5] = torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0])
    b.view(-1)[:4] = torch.tensor([10.0, 9.0, 8.0, 7.0])
    b.view(-1)[5] = 6.0
    assert top_k_intersection(a, b, fraction=0.1).item() == pytest.approx(0.8)


# -- manipulation attack --------------------------------------------------------------------------------------------
_KW = {"epsilon": 0.1, "bounds": (-1.0, 1.0)}


def _attack_inputs(batch: int = 2) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = _small_net()
    x = torch.rand(batch, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = model(x).argmax(1)
    goal = torch.randn(batch, 12, 12, generator=torch.Generator().manual_seed(2))
    return model, x, target, goal


def test_attack_step_size_is_a_tenth_of_epsilon() -> None:
    """(M7) Adam's step is epsilon / 10 as documented: Adam's first step moves every coordinate with a
    gradient by exactly its learning rate, so one step leaves ||delta||_inf = epsilon / 10, not epsilon."""
    model, x, target, goal = _attack_inputs()
    result = manipulation_attack(_gradient_explain, _gradient_explain(model), model, x, target, goal, steps=1, **_KW)
    torch.testing.assert_close(result.linf, torch.full((2,), 0.01), atol=1e-6, rtol=0)


def test_an_images_attack_does_not_depend_on_its_batch() -> None:
    """(M6) Each map is scaled to unit L2 norm on its own: an image's perturbation is the same alone as in a
    batch whose other map has a very different scale (a norm over the batch coupled them)."""
    model, x, target, goal = _attack_inputs()
    x = torch.cat([x[:1], x[1:] * 0.05])  # the second image's gradient map is on another scale
    both = manipulation_attack(_gradient_explain, _gradient_explain(model), model, x, target, goal, steps=5, **_KW)
    alone = manipulation_attack(
        _gradient_explain, _gradient_explain(model), model, x[:1], target[:1], goal[:1], steps=5, **_KW
    )
    torch.testing.assert_close(both.x_adv[:1], alone.x_adv, atol=1e-4, rtol=0)


def test_output_weight_enters_the_attack_loss() -> None:
    """(M10) The loss is map distance + output_weight x output change: the reported final loss at the same
    perturbation grows with the weight, so the output term is really optimised against."""
    model, x, target, goal = _attack_inputs()
    explain = _gradient_explain(model)
    runs = [
        manipulation_attack(_gradient_explain, explain, model, x, target, goal, steps=3, output_weight=w, **_KW)
        for w in (0.0, 1e6)
    ]
    assert not torch.equal(runs[0].x_adv, runs[1].x_adv)
    smooth, _ = smooth_activations_copy(model, 5.0)
    with torch.no_grad():
        change = ((smooth(runs[1].x_adv).softmax(1) - smooth(x).softmax(1)) ** 2).sum()
    assert change > 0 and runs[1].final_loss > 1e6 * change.item() * 0.99


def test_attack_final_loss_is_at_the_final_perturbation() -> None:
    """(M19) final_loss is the attack loss at x_adv (on the smoothed copy), recomputed here from the module
    docstring's formula; at x itself the output term would be 0 and the map term the starting one."""
    model, x, target, goal = _attack_inputs()
    result = manipulation_attack(
        _gradient_explain, _gradient_explain(model), model, x, target, goal, steps=10, output_weight=10.0, **_KW
    )
    smooth, _ = smooth_activations_copy(model, 5.0)
    explain = _gradient_explain(smooth)

    def unit(m: torch.Tensor) -> torch.Tensor:
        return m / m.flatten(1).norm(dim=1)[:, None, None]

    def loss(inp: torch.Tensor) -> float:
        maps = explain(inp.clone().requires_grad_(True), target).detach()
        with torch.no_grad():
            out = ((smooth(inp).softmax(1) - smooth(x).softmax(1)) ** 2).sum(1)
        return float((((unit(maps) - unit(goal)) ** 2).flatten(1).sum(1) + 10.0 * out).sum())

    assert result.final_loss == pytest.approx(loss(result.x_adv), rel=1e-4)
    assert result.final_loss < loss(x)  # the attack made progress, so x's loss is not the one reported


def test_attack_refuses_a_float_target_and_an_all_zero_target_map_in_a_batch() -> None:
    """(M16, M17) A float class is refused, not cast; one all-zero target map among non-zero ones is refused
    too (it has no direction to steer toward: its unit map would be 0/0)."""
    model, x, target, goal = _attack_inputs()
    explain = _gradient_explain(model)
    with pytest.raises(ValueError, match="one class per image"):
        manipulation_attack(_gradient_explain, explain, model, x, target.float(), goal, steps=1, **_KW)
    goal[1] = 0.0
    with pytest.raises(ValueError, match="all-zero map"):
        manipulation_attack(_gradient_explain, explain, model, x, target, goal, steps=1, **_KW)


def test_attack_on_a_refused_smooth_copy_is_flagged_unsmoothed() -> None:
    """(M20) An explainer that refuses the smoothed copy (UnsupportedModelError) is attacked on the real model,
    and the result says smoothed=False so the weaker attack is flagged."""
    model, x, target, goal = _attack_inputs()

    def picky(m: nn.Module):
        if any(isinstance(mod, nn.Softplus) for mod in m.modules()):

            def refuse(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                raise UnsupportedModelError("no softplus here")

            return refuse
        return _gradient_explain(m)

    result = manipulation_attack(picky, _gradient_explain(model), model, x, target, goal, steps=1, **_KW)
    assert result.smoothed is False


def test_attack_linf_is_the_largest_absolute_move() -> None:
    """(M21) linf is max |x_adv - x|: at the upper bound every move is downward, so a signed maximum would
    report 0 for a perturbation that is really there."""
    model, _, _, goal = _attack_inputs()
    x = torch.ones(2, 3, 12, 12)
    target = torch.tensor([0, 1])
    result = manipulation_attack(_gradient_explain, _gradient_explain(model), model, x, target, goal, steps=3, **_KW)
    moved = (result.x_adv - x).flatten(1).abs().amax(1)
    assert (moved > 0).all()
    torch.testing.assert_close(result.linf, moved)


def test_attack_bounds_slack_scales_with_the_range() -> None:
    """(M22) x is checked against bounds with a slack relative to the range (float rounding of a
    normalisation): on a 0-255 scale, 255 plus a rounding error is inside."""
    model, _, _, goal = _attack_inputs()
    x = torch.full((2, 3, 12, 12), 255.0)
    x[:, :, 0, 0] = 255.0 * (1 + 2e-6)
    result = manipulation_attack(
        _gradient_explain,
        _gradient_explain(model),
        model,
        x,
        torch.tensor([0, 1]),
        goal,
        epsilon=1.0,
        bounds=(0.0, 255.0),
        steps=1,
    )
    assert (result.linf <= 1.0 + 1e-4).all()


def test_attack_refuses_a_bool_target() -> None:
    """README: a bool class is refused, not cast. manipulation_attack's own check only refused floats, and a
    bool target passed and was cast to classes 1/0 (product defect found in round 19)."""
    model, x, _, goal = _attack_inputs()
    with pytest.raises((ValueError, TypeError)):
        manipulation_attack(
            _gradient_explain, _gradient_explain(model), model, x, torch.tensor([True, False]), goal, steps=1, **_KW
        )


# -- insertion / deletion ---------------------------------------------------------------------------------------------
def test_gaussian_blur_pads_by_reflection_in_both_directions() -> None:
    """(P2) Reflect padding (documented): a bright first column (row) is mirrored from the pixels next to it,
    which are dark, so the edge keeps only the kernel's centre weight; replicate padding would add the
    whole left half of the kernel."""
    offsets = torch.arange(-3.0, 4.0)
    kernel = torch.exp(-0.5 * offsets**2)
    centre = (kernel[3] / kernel.sum()).item()
    x = torch.zeros(1, 1, 10, 10)
    x[..., :, 0] = 1.0
    assert gaussian_blur(x, 1.0)[0, 0, 5, 0].item() == pytest.approx(centre, abs=1e-6)
    assert gaussian_blur(x.transpose(-1, -2), 1.0)[0, 0, 0, 5].item() == pytest.approx(centre, abs=1e-6)


def test_insertion_blur_sigma_is_a_fraction_of_the_shorter_side() -> None:
    """(P11) On a non-square image the insertion start is blurred with sigma = blur_fraction x min(H, W)."""
    x = torch.zeros(1, 3, 20, 60)
    x[0, 0, :, :3] = 1.0  # a bright strip at the left edge: how much of it reaches (0, 0) depends on sigma
    x[0, 0, 0, 0] = 0.0
    soft = _PixelModel(gain=4.0)  # the probability follows the pixel's blurred value
    curves = insertion_deletion(soft, x, 0, torch.zeros(1, 20, 60), blur_fraction=0.1)
    expected = soft(gaussian_blur(x, 0.1 * 20)).softmax(1)[0, 0]
    wrong = soft(gaussian_blur(x, 0.1 * 60)).softmax(1)[0, 0]
    assert abs(expected.item() - wrong.item()) > 1e-3
    assert curves.insertion[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_insertion_deletion_refuses_classes_out_of_range_or_negative_by_name() -> None:
    """(P16, P20) ``classes`` must be classes the model has: one equal to the class count is out of range
    (not an IndexError mid-loop) and a negative one is refused (it would index from the end silently)."""
    x, maps = torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        insertion_deletion(_PixelModel(), x, 0, maps, classes=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="negative"):
        insertion_deletion(_PixelModel(), x, 0, maps, classes=torch.tensor([[0, -1]]))


def test_auc_integrates_over_the_real_rounded_fractions() -> None:
    """(P17) The AUC is the trapezoid over ``fractions`` as rounded to whole pixels (10 pixels in 4 steps:
    0, 0.2, 0.5, 0.8, 1), not over an even grid."""
    fractions = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    curve = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    curves = PerturbationCurves(fractions=fractions, deletion=curve, insertion=1 - curve)
    assert curves.deletion_auc.item() == pytest.approx(0.1)
    assert curves.insertion_auc.item() == pytest.approx(0.9)


class _DropoutModel(nn.Module):
    """_PixelModel behind a Dropout: in training mode its output would be random."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PixelModel()(self.drop(x))


def test_insertion_deletion_runs_a_training_model_in_eval_mode() -> None:
    """(P18) The curves are computed in eval mode: a model left in training mode (Dropout here) would give
    random curves; its flag is put back afterwards."""
    x = torch.zeros(1, 3, 20, 20)
    x[0, :, 0, 0] = 1.0
    maps = torch.zeros(1, 20, 20)
    maps[0, 0, 0] = 1.0
    model = _DropoutModel().train()
    torch.manual_seed(0)
    curves = insertion_deletion(model, x, 0, maps)
    reference = insertion_deletion(_DropoutModel().eval(), x, 0, maps)
    assert model.training
    torch.testing.assert_close(curves.deletion, reference.deletion)
    torch.testing.assert_close(curves.insertion, reference.insertion)


def test_blur_is_separable_gaussian_reference() -> None:
    """Cross-check of gaussian_blur against a direct 2-D convolution with the outer-product kernel and
    reflect padding (the documented blur), away from any edge effect question."""
    x = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = 1.0
    offsets = torch.arange(-3.0, 4.0)
    k = torch.exp(-0.5 * (offsets / sigma) ** 2)
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :]).expand(2, 1, 7, 7)
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), k2, groups=2)
    torch.testing.assert_close(gaussian_blur(x, sigma), ref, atol=1e-6, rtol=0)


def test_attack_refuses_a_negative_target() -> None:
    """An attack-only explainer that took -1 would let the probability change read the last class: the
    attack refuses it itself, as insertion_deletion and max_sensitivity do."""
    model, x, _, goal = _attack_inputs()
    with pytest.raises(ValueError, match="target out of range"):
        manipulation_attack(
            _gradient_explain, _gradient_explain(model), model, x, torch.tensor([-1, 0]), goal, steps=1, **_KW
        )
