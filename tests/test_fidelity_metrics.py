"""Fidelity metrics on toy cases whose answer is known in closed form."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from ierf.metrics import (
    boxes_to_masks,
    energy_in_box,
    gaussian_blur,
    gini,
    insertion_deletion,
    manipulation_attack,
    max_sensitivity,
    pearson,
    pixel_ranking,
    pointing_game,
    smooth_activations_copy,
    ssim,
    top_k_intersection,
)
from ierf.metrics.manipulation import SmoothReLU6
from torch import nn


def test_boxes_to_masks_end_exclusive() -> None:
    masks = boxes_to_masks(torch.tensor([[1, 2, 3, 5]]), (6, 6))
    assert masks.sum() == 2 * 3
    assert masks[0, 1, 2] and masks[0, 2, 4] and not masks[0, 3, 4] and not masks[0, 1, 5]
    with pytest.raises(ValueError, match="y0 < y1"):
        boxes_to_masks(torch.tensor([[3, 0, 3, 2]]), (6, 6))


def test_pointing_game_hit_miss_and_ties() -> None:
    maps = torch.zeros(3, 10, 10)
    maps[0, 2, 2] = 5.0  # inside the box
    maps[1, 8, 8] = 5.0  # outside
    maps[1, 2, 2] = -9.0  # strong *negative* evidence in the box is no hit: the signed maximum counts
    # maps[2] constant: every pixel ties, expected hit = box area / image area
    boxes = torch.tensor([[0, 0, 4, 5]] * 3)
    assert pointing_game(maps, boxes).tolist() == pytest.approx([1.0, 0.0, 20 / 100])
    # masks and boxes give the same answer
    assert torch.equal(pointing_game(maps, boxes_to_masks(boxes, (10, 10))), pointing_game(maps, boxes))


def test_energy_in_box_uses_positive_part() -> None:
    maps = -5.0 * torch.ones(3, 4, 4)
    maps[0, :2, :2] = 1.0  # all positive mass in the box; negatives outside ignored
    maps[1] = 1.0  # uniform positive: share = box area
    # maps[2]: no positive mass at all -> 0
    boxes = torch.tensor([[0, 0, 2, 2]] * 3)
    assert energy_in_box(maps, boxes).tolist() == pytest.approx([1.0, 4 / 16, 0.0])


def test_localisation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        pointing_game(torch.zeros(4, 4), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="NaN"):
        energy_in_box(torch.full((1, 4, 4), float("nan")), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="boxes must have shape"):
        pointing_game(torch.zeros(2, 4, 4), torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(TypeError, match="bool"):
        pointing_game(torch.zeros(1, 4, 4), torch.ones(1, 4, 4))


def test_gini_known_values() -> None:
    uniform = torch.ones(1, 8, 8)
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 3, 3] = 2.0
    # |[1, 2, 3, 4]|: sum (2i - n - 1) a_i = -3 - 2 + 3 + 12 = 10; n sum a = 40 -> 0.25
    ramp = torch.tensor([[[1.0, -2.0], [3.0, 4.0]]])
    assert gini(uniform).item() == pytest.approx(0.0, abs=1e-7)
    assert gini(one_hot).item() == pytest.approx(63 / 64)
    assert gini(ramp).item() == pytest.approx(0.25)
    assert gini(-ramp).item() == pytest.approx(gini(ramp).item())  # |.| is the metric's definition
    assert gini(torch.zeros(1, 3, 3)).item() == 0.0


def test_similarity_known_values() -> None:
    a = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert pearson(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert pearson(a, -a).tolist() == pytest.approx([-1.0, -1.0])
    assert pearson(a, 3 * a + 1).tolist() == pytest.approx([1.0, 1.0])
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert ssim(a, 5 * a).tolist() == pytest.approx([1.0, 1.0])  # each map scaled by its own peak
    assert top_k_intersection(a, a).tolist() == [1.0, 1.0]
    assert top_k_intersection(a, -a, fraction=0.25).tolist() == [0.0, 0.0]
    assert pearson(torch.ones(1, 4, 4), a[:1, :4, :4]).item() == 0.0  # constant map: defined as 0


def test_pixel_ranking_breaks_ties_randomly_but_reproducibly() -> None:
    flat = torch.zeros(1, 10, 10)
    flat[0, 9, 9] = 1.0
    order = pixel_ranking(flat, seed=0)
    assert order[0, 0] == 99  # the maximum first
    assert sorted(order[0].tolist()) == list(range(100))
    assert order[0, 1:].tolist() != list(range(99))  # ties are not in raster order
    assert torch.equal(order, pixel_ranking(flat, seed=0))


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    x = torch.full((1, 3, 20, 20), 0.7)
    assert torch.allclose(gaussian_blur(x, 2.0), x)
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 1.5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 10, 10] < 0.2


class _OnePixelModel(nn.Module):
    """Class 0 wins exactly when pixel (0, 0) of channel 0 is bright: logit0 = 100 (x - 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = 100.0 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def test_insertion_deletion_closed_form() -> None:
    x = torch.zeros(1, 3, 50, 50)
    x[0, 0, 0, 0] = 1.0
    good = torch.zeros(1, 50, 50)
    good[0, 0, 0] = 1.0  # ranks the decisive pixel first
    bad = -good  # ranks it last
    model = _OnePixelModel()
    curves = insertion_deletion(model, x, 0, good, n_steps=20, deletion_fill="mean")
    # deletion: p=1 at 0 %, ~0 from the first step (125 pixels) on -> AUC = 0.05 / 2
    assert curves.deletion[0, 0].item() == pytest.approx(1.0)
    assert curves.deletion_auc.item() == pytest.approx(0.025, abs=1e-3)
    # insertion from the blurred image (sigma 2 px: the pixel drops below 0.5):
    # 0 at 0 %, 1 from the first step -> 1 - 0.025
    assert curves.insertion_auc.item() == pytest.approx(0.975, abs=1e-3)
    worst = insertion_deletion(model, x, torch.tensor([0]), bad, n_steps=20)
    assert worst.deletion_auc.item() == pytest.approx(0.975, abs=1e-3)
    assert worst.insertion_auc.item() == pytest.approx(0.025, abs=1e-3)
    assert curves.fractions.tolist() == pytest.approx([k / 20 for k in range(21)])


class _DominatedModel(nn.Module):
    """Like _OnePixelModel, plus a third class that always wins the full softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        two = _OnePixelModel()(x)
        return torch.cat([two, torch.full_like(two[:, :1], 200.0)], dim=1)


def test_insertion_deletion_among_a_class_subset() -> None:
    x = torch.zeros(1, 3, 50, 50)
    x[0, 0, 0, 0] = 1.0
    good = torch.zeros(1, 50, 50)
    good[0, 0, 0] = 1.0
    full = insertion_deletion(_DominatedModel(), x, 0, good)
    among = insertion_deletion(_DominatedModel(), x, 0, good, classes=torch.tensor([[1, 0]]))
    assert full.deletion.max().item() < 1e-6  # class 2 takes all the probability
    assert among.deletion_auc.item() == pytest.approx(0.025, abs=1e-3)  # same as the two-class model
    assert among.insertion_auc.item() == pytest.approx(0.975, abs=1e-3)
    with pytest.raises(ValueError, match="one of its row"):
        insertion_deletion(_DominatedModel(), x, 0, good, classes=torch.tensor([[1, 2]]))


def test_insertion_deletion_rejects_bad_arguments() -> None:
    model, x, m = _OnePixelModel(), torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8)
    with pytest.raises(ValueError, match="deletion_fill"):
        insertion_deletion(model, x, 0, m, deletion_fill="black")
    with pytest.raises(ValueError, match="matching maps"):
        insertion_deletion(model, x, 0, torch.zeros(1, 4, 4))


def test_max_sensitivity_known_cases() -> None:
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, ::2] = 1.0  # value range 1 per image
    target = torch.tensor([0, 1])

    def constant(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(inp.shape[0], 8, 8)

    def first_channel(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return inp[:, 0]

    assert max_sensitivity(constant, x, target).tolist() == [0.0, 0.0]
    radius = 0.02
    sens = max_sensitivity(first_channel, x, target, radius=radius, n_samples=4, seed=3)
    # ||U[-r, r]^64|| is about r * sqrt(64 / 3); ||x[:, 0]|| = sqrt(32)
    expected = radius * math.sqrt(64 / 3) / math.sqrt(32)
    assert ((sens > 0.7 * expected) & (sens < 1.5 * expected)).all()
    scaled = max_sensitivity(lambda i, t: 7 * first_channel(i, t), x, target, radius=radius, n_samples=4, seed=3)
    assert torch.allclose(scaled, sens)  # relative: the method's scale drops out
    assert torch.equal(sens, max_sensitivity(first_channel, x, target, radius=radius, n_samples=4, seed=3))
    zero = max_sensitivity(lambda i, t: torch.zeros(i.shape[0], 8, 8), x, target)
    assert torch.isnan(zero).all()


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def test_smooth_activations_copy_leaves_model_alone() -> None:
    model = _small_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    smooth, replaced = smooth_activations_copy(model, beta=50.0)
    assert replaced == 2
    assert isinstance(model[1], nn.ReLU) and isinstance(model[3], nn.ReLU6)
    assert isinstance(smooth[1], nn.Softplus) and isinstance(smooth[3], SmoothReLU6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    z = torch.linspace(-3, 9, 50)
    assert torch.allclose(SmoothReLU6(50.0)(z), torch.clamp(z, 0, 6), atol=0.02)


def _gradient_explain(model: nn.Module):
    def explain(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        score = model(x).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, x, create_graph=True)
        return grad.sum(1)

    return explain


def test_manipulation_attack_moves_gradient_maps_and_respects_budget() -> None:
    model = _small_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = model(x).argmax(1)
    evaluate = _gradient_explain(model)
    before = evaluate(x, target).detach()
    result = manipulation_attack(
        _gradient_explain, evaluate, model, x, target, torch.roll(before, 1, 0), epsilon=0.1, bounds=(-1, 1), steps=40
    )
    assert (result.linf <= 0.1 + 1e-6).all()
    assert result.x_adv.min() >= -1 and result.x_adv.max() <= 1
    assert result.smoothed
    assert result.pearson_before_after.mean() < 0.95  # the gradient map moved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert isinstance(model[1], nn.ReLU)


def test_manipulation_attack_cannot_move_an_input_independent_map() -> None:
    model = _small_net()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    fixed = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(3))

    def constant_factory(_: nn.Module):
        return lambda inp, t: fixed + 0.0 * inp.sum()

    result = manipulation_attack(
        constant_factory,
        lambda inp, t: fixed,
        model,
        x,
        torch.tensor([0, 1]),
        -fixed,
        epsilon=0.1,
        bounds=(0, 1),
        steps=5,
    )
    assert result.pearson_before_after.tolist() == pytest.approx([1.0, 1.0])
    assert result.topk_before_after.tolist() == [1.0, 1.0]
    # the map's gradient is zero, so no step moves the input at all
    assert torch.equal(result.x_adv, x) and result.linf.tolist() == [0.0, 0.0]


def test_srd_is_attacked_on_the_smoothed_copy_of_a_relu6_network() -> None:
    """SRD takes SmoothReLU6 as an element-wise activation, so ReLU6 models get the full-strength attack."""
    import ierf

    model = _small_net()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    target = model(x).argmax(1)
    smooth, _ = smooth_activations_copy(model, beta=5.0)
    assert not any(m.training for m in smooth.modules())  # replacements included
    maps = ierf.SRD(smooth).saliency(x, target)
    torch.testing.assert_close(maps.sum((1, 2)), smooth(x).gather(1, target[:, None])[:, 0], rtol=1e-4, atol=1e-5)

    def srd_factory(m: nn.Module):
        return ierf.SRD(m).saliency

    evaluate = ierf.SRD(model).saliency
    before = evaluate(x, target)
    result = manipulation_attack(
        srd_factory, evaluate, model, x, target, torch.roll(before, 1, 0), epsilon=0.1, bounds=(-1, 1), steps=3
    )
    assert result.smoothed


# -- metrics review follow-ups ---------------------------------------------------------------------------------
def test_top_k_ties_count_at_chance_not_in_index_order() -> None:
    """Tied pixels were taken in index order by both maps, so two all-zero maps overlapped fully and two
    maps with disjoint positive pixels (zeros elsewhere) shared every tied zero they picked."""
    zeros = torch.zeros(1, 10, 10)
    assert top_k_intersection(zeros, zeros).item() == pytest.approx(0.1)  # k / N: chance
    a, b = zeros.clone(), zeros.clone()
    a[0, 0, :5], b[0, 5, :5] = 1.0, 1.0
    # each top 10: its own 5 positives (certain) + 5 of the 95 tied zeros (5/95 each)
    expected = (5 * (5 / 95) * 2 + 90 * (5 / 95) ** 2) / 10
    assert top_k_intersection(a, b).item() == pytest.approx(expected, rel=1e-6)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert top_k_intersection(x, x).tolist() == [1.0, 1.0]


def test_ssim_does_not_see_a_negated_map_pearson_does() -> None:
    """Documented: SSIM may score a negated map high (here a smooth blob, whose large local means flip the
    luminance term with the structure term), so read it with Pearson."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / 40)[None]  # a saliency-like positive blob
    assert ssim(blob, -blob).item() > 0.5 and pearson(blob, -blob).item() == pytest.approx(-1.0)


def test_manipulation_attack_leaves_a_training_model_untouched_and_checks_its_arguments() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(576, 3))
    model.train()  # left in training mode: every forward would update the BN statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = torch.tensor([0, 1])
    maps = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(2))
    evaluate = _gradient_explain(model)
    manipulation_attack(_gradient_explain, evaluate, model, x, target, maps, epsilon=0.1, bounds=(-1, 1), steps=2)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    kwargs = {"epsilon": 0.1, "bounds": (-1, 1), "steps": 2}
    with pytest.raises(ValueError, match="one class per image"):  # one target for two images scored "robust"
        manipulation_attack(_gradient_explain, evaluate, model, x, target[:1], maps, **kwargs)
    with pytest.raises(ValueError, match="outside bounds"):
        manipulation_attack(_gradient_explain, evaluate, model, x * 3, target, maps, **kwargs)
    with pytest.raises(ValueError, match="all-zero map"):
        manipulation_attack(_gradient_explain, evaluate, model, x, target, maps * 0, **kwargs)
    with pytest.raises(ValueError, match="low < high"):
        manipulation_attack(_gradient_explain, evaluate, model, x, target, maps, epsilon=0.1, bounds=(1, -1))


def test_metric_arguments_are_checked_not_cast() -> None:
    model = _small_net()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    maps = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(4))
    # -1 scored the last class
    with pytest.raises(ValueError, match=r"target out of range: the model has classes 0 and up, got -1"):
        insertion_deletion(model, x, -1, maps, n_steps=2)
    with pytest.raises(TypeError, match="bool"):
        insertion_deletion(model, x, True, maps, n_steps=2)
    with pytest.raises(TypeError, match="integer dtype"):
        insertion_deletion(model, x, torch.tensor([0.0, 1.7]), maps, n_steps=2)
    with pytest.raises(ValueError, match="repeats a class"):
        insertion_deletion(model, x, 0, maps, n_steps=2, classes=torch.tensor([[0, 0], [0, 1]]))
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        insertion_deletion(model, x, 0, maps, n_steps=2.0)
    with pytest.raises(ValueError, match=r"maps must have shape \(2, 12, 12\)"):  # broadcast silently before
        max_sensitivity(_gradient_explain(model), x, torch.tensor([0, 1]), maps=maps[:1])
    with pytest.raises(ValueError, match="outside the 12x12 map"):  # every map scored 0
        pointing_game(maps, torch.tensor([[20, 20, 30, 30], [0, 0, 4, 4]]))
    with pytest.raises(ValueError, match="whole pixel coordinates"):  # NaN scored a hit
        pointing_game(maps, torch.tensor([[float("nan"), 0, 4, 4], [0, 0, 4, 4]]))
    torch.testing.assert_close(
        pointing_game(maps, torch.tensor([[0.0, 0, 4, 4], [2, 2, 9, 9]])),
        pointing_game(maps, torch.tensor([[0, 0, 4, 4], [2, 2, 9, 9]])),
    )
    empty = torch.zeros(2, 12, 12, dtype=torch.bool)
    empty[0, 3, 3] = True
    with pytest.raises(ValueError, match="mask 1 is empty"):
        energy_in_box(maps, empty)


def test_energy_in_box_sums_in_float64() -> None:
    """A float16 map whose positive mass passes 65504 gave NaN; a subnormal one a wrong share."""
    box = torch.tensor([[0, 0, 32, 64]])
    assert energy_in_box(torch.full((1, 64, 64), 60000.0, dtype=torch.float16), box).item() == 0.5
    assert energy_in_box(torch.full((1, 64, 64), 1e-44), box).item() == 0.5


class _PixelModel(nn.Module):
    """Class 0 wins exactly when pixel (0, 0) of ``channel`` is bright: logit0 = gain (x - 0.5); a small gain
    makes the probability follow the pixel's value smoothly."""

    def __init__(self, channel: int = 0, gain: float = 100.0) -> None:
        super().__init__()
        self.channel, self.gain = channel, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.gain * (x[:, self.channel, 0, 0] - 0.5)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def _decisive_pixel(batch: int = 1, size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(batch, 3, size, size)
    x[:, :, 0, 0] = 1.0
    good = torch.zeros(batch, size, size)
    good[:, 0, 0] = 1.0
    return x, good


def test_deletion_fill_replaces_every_channel() -> None:
    """The schedule changes a pixel in all channels: a fill applied to one channel only would leave a model
    that reads another channel untouched (deletion AUC ~1 for a perfect map)."""
    x, good = _decisive_pixel()
    for fill in ("mean", "blur", "zero"):
        curves = insertion_deletion(_PixelModel(channel=2), x, 0, good, deletion_fill=fill)
        assert curves.deletion_auc.item() == pytest.approx(0.025, abs=1e-3), fill


def test_each_image_is_scored_on_its_own_target() -> None:
    """Image i's curve is the probability of target[i], checked with two images and two targets (the other
    tests use one image)."""
    x, good = _decisive_pixel(batch=2)
    curves = insertion_deletion(_PixelModel(), x, torch.tensor([0, 1]), good)
    torch.testing.assert_close(curves.deletion[1], 1 - curves.deletion[0])
    assert curves.deletion[1, 0].item() == pytest.approx(0.0, abs=1e-6)  # class 1 loses on the intact image


def test_step_counts_are_rounded_as_documented() -> None:
    """As documented: 10 pixels in 4 steps are changed 0, 2, 5, 8, 10 at a time (rounded, not floored)."""
    x = torch.zeros(1, 3, 2, 5)
    curves = insertion_deletion(_PixelModel(), x, 0, torch.zeros(1, 2, 5), n_steps=4, blur_fraction=0.5)
    assert curves.fractions.tolist() == pytest.approx([0.0, 0.2, 0.5, 0.8, 1.0])


def test_insertion_starts_from_the_blurred_image() -> None:
    """Insertion's first point is the blurred copy (sigma = 4 % of the side), not the deletion fill: here
    the blur keeps the decisive corner bright (p ~ 1) while the mean colour would give p = 0.5."""
    x = torch.zeros(1, 3, 50, 50)
    x[0, 0, :, :25] = 1.0  # left half bright: channel mean 0.5, corner stays bright under a 2 px blur
    curves = insertion_deletion(_PixelModel(), x, 0, torch.zeros(1, 50, 50))
    expected = _PixelModel()(gaussian_blur(x, 0.04 * 50)).softmax(1)[0, 0]
    assert curves.insertion[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)
    assert curves.insertion[0, 0].item() > 0.99


def _first_channel(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return inp[:, 0]


def test_max_sensitivity_noise_radius_is_per_image() -> None:
    """r = radius x (max - min) *of that image*: a dim image next to a bright one must not get the bright
    one's noise (a batch-wide range would make the dim image look 10x less stable)."""
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, ::2] = 1.0
    x[1] *= 10.0  # value range 1 and 10
    radius = 0.02
    sens = max_sensitivity(_first_channel, x, torch.tensor([0, 1]), radius=radius, n_samples=4, seed=3)
    expected = radius * math.sqrt(64 / 3) / math.sqrt(32)  # same relative noise for both images
    assert ((sens > 0.7 * expected) & (sens < 1.5 * expected)).all()


def _documented_generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """Max-sensitivity's noise source for one image: seeded with a BLAKE2b of its bytes keyed with ``seed``."""
    digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=seed.to_bytes(9, "little", signed=True))
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_sensitivity_is_the_maximum_over_the_seeded_draws(dtype: torch.dtype) -> None:
    """MS is a max over samples, not a mean: recompute it from the documented draws (private generator,
    U[-r, r] noise per sample from each image's own generator, seeded with a keyed BLAKE2b of the image's
    bytes in its own dtype (key: ``seed``), relative Frobenius change)."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    radius, n_samples, seed = 0.05, 6, 7
    sens = max_sensitivity(_first_channel, x, torch.tensor([0, 1]), radius=radius, n_samples=n_samples, seed=seed)
    expected = []
    for image in x:
        generator = _documented_generator(image, seed)
        span = image.max() - image.min()
        changes = []
        for _ in range(n_samples):
            noise = (torch.rand(image.shape, generator=generator) * 2 - 1) * radius * span
            changes.append(float(noise[0].double().norm()))
        expected.append(max(changes) / float(image[0].double().norm()))
    torch.testing.assert_close(sens, torch.tensor(expected, dtype=torch.float32))


def test_max_sensitivity_noise_is_two_sided() -> None:
    """delta ~ U[-r, r]: a map that reacts only to darker pixels still moves (one-sided noise leaves it 0)."""
    x = torch.full((1, 3, 8, 8), 0.5)
    x[:, :, ::2] = 1.0

    def darker_only(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 1.0 + (inp[:, 0] - x[:, 0]).clamp(max=0.0)

    assert max_sensitivity(darker_only, x, torch.tensor([0])).item() > 0.0


def test_ssim_scales_by_max_abs_so_joint_negation_is_symmetric() -> None:
    """Each map is scaled by its own max |value| into [-1, 1], so negating both maps gives the same SSIM.
    Scaling by the signed max would push a mostly negative map outside the data range."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 16, generator=g) - 1.0  # mostly negative: max |a| is a negative pixel
    b = a + 0.5 * torch.randn(2, 16, 16, generator=g)
    torch.testing.assert_close(ssim(-a, -b), ssim(a, b), atol=1e-6, rtol=0)


def test_prob_change_is_of_each_images_target_class() -> None:
    """prob_change = |p_target(x_adv) - p_target(x)| on the real model, checked on a non-top target so the
    top class's change cannot stand in for it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).eval()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = model(x).argsort(1)[:, 0]  # the least likely class of each image

    def gradient_explain(m: nn.Module):
        def explain(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inp = inp if inp.requires_grad else inp.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(m(inp).gather(1, t[:, None]).sum(), inp, create_graph=True)
            return grad.sum(1)

        return explain

    goal = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(2))
    result = manipulation_attack(
        gradient_explain, gradient_explain(model), model, x, target, goal, epsilon=0.3, bounds=(-1, 1), steps=10
    )
    with torch.no_grad():
        before, after = model(x).softmax(1), model(result.x_adv).softmax(1)
    rows = torch.arange(2)
    torch.testing.assert_close(result.prob_change, (after[rows, target] - before[rows, target]).abs())


def test_metrics_restore_each_modules_own_training_flag() -> None:
    """eval_mode puts back every module's flag, not the root's: a model fine-tuned with frozen BatchNorm
    (model.train(); bn.eval()) must come back with its BatchNorm still in eval mode."""
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.train()
    model[1].eval()
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    insertion_deletion(model, x, 0, torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(1)), n_steps=2)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_infinite_maps_are_refused() -> None:
    """check_maps promises finite maps: an infinite map is an error, not a NaN score."""
    with pytest.raises(ValueError, match="infinite"):
        gini(torch.full((1, 4, 4), float("inf")))


# -- mutation round 7 --------------------------------------------------------------------------------------------
def test_manipulation_result_fields_compare_the_documented_maps() -> None:
    """pearson_after_target is the *manipulated* map against the target (the attack's success), and
    prediction_kept compares the argmax after with the argmax before - not with the explained class, which
    here is each image's least likely one."""
    model = _small_net()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    target = model(x).argsort(1)[:, 0]  # the least likely class: never the argmax
    evaluate = _gradient_explain(model)
    goal = torch.roll(evaluate(x, model(x).argmax(1)).detach(), 1, 0)
    result = manipulation_attack(
        _gradient_explain, evaluate, model, x, target, goal, epsilon=0.1, bounds=(-1, 1), steps=20
    )
    torch.testing.assert_close(result.pearson_after_target, pearson(result.maps_after, goal))
    assert not torch.allclose(result.pearson_after_target, pearson(result.maps_before, goal), atol=1e-3)
    with torch.no_grad():
        kept = model(result.x_adv).argmax(1) == model(x).argmax(1)
    assert kept.all() and torch.equal(result.prediction_kept, kept)


def test_manipulation_without_replaceable_activations_is_flagged_unsmoothed() -> None:
    """``smoothed`` says whether the attack ran on a smoothed copy: a model with no nn.ReLU / nn.ReLU6 module
    (here Tanh) has nothing to replace, so its row must be flagged like a refused copy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0])
    goal = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2))
    evaluate = _gradient_explain(model)
    result = manipulation_attack(
        _gradient_explain, evaluate, model, x, target, goal, epsilon=0.1, bounds=(0, 1), steps=1
    )
    assert result.smoothed is False


def test_a_box_starting_at_the_map_edge_is_outside() -> None:
    """Row y0 = H (or column x0 = W) is past the last pixel: such a box scores 0 for every map, so it is refused
    like any other box outside the map."""
    maps = torch.randn(1, 12, 12, generator=torch.Generator().manual_seed(0))
    for box in ([12, 0, 13, 4], [0, 12, 4, 13]):
        with pytest.raises(ValueError, match="outside the 12x12 map"):
            pointing_game(maps, torch.tensor([box]))


def test_max_sensitivity_uses_every_sample() -> None:
    """n_samples draws are made and each counts: with one sample the score is that one draw's relative change."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    sens = max_sensitivity(_first_channel, x, torch.tensor([0]), radius=0.05, n_samples=1, seed=7)
    span = x.max() - x.min()
    noise = (torch.rand(x.shape, generator=_documented_generator(x[0], 7)) * 2 - 1) * 0.05 * span
    expected = noise[:, 0].double().flatten(1).norm(dim=1) / x[:, 0].double().flatten(1).norm(dim=1)
    torch.testing.assert_close(sens, expected.float())


def test_gaussian_blur_kernel_reaches_three_sigma() -> None:
    """Documented kernel radius 3 sigma: a spike blurred with sigma 1.5 spreads to 5 pixels (int(4.5 + 0.5)),
    no further, with the normalised Gaussian weights (a 2 sigma kernel would stop at 3 pixels)."""
    spike = torch.zeros(1, 1, 21, 21)
    spike[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 1.5)[0, 0]
    offsets = torch.arange(-5.0, 6.0)
    kernel = torch.exp(-0.5 * (offsets / 1.5) ** 2)
    kernel = kernel / kernel.sum()
    expected = torch.zeros(21, 21)
    expected[5:16, 5:16] = kernel[:, None] * kernel[None, :]
    torch.testing.assert_close(blurred, expected)


def test_mean_fill_is_each_channels_own_mean() -> None:
    """Deletion's default fill is the image's per-channel mean colour: a red image fully deleted stays red
    (p ~ 1 for a model reading the red channel), where a grey mean over all channels would read 0.8 / 3."""
    x = torch.zeros(1, 3, 10, 10)
    x[:, 0] = 0.8
    curves = insertion_deletion(_PixelModel(channel=0), x, 0, torch.zeros(1, 10, 10), n_steps=2)
    assert curves.deletion[0, -1].item() > 0.99


class _CountingOnePixelModel(_OnePixelModel):
    """Counts its forward passes."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_insertion_deletion_refuses_an_out_of_range_target_by_name() -> None:
    """A class the model does not have surfaced as a bare IndexError from inside the scoring loop ("index 2
    is out of bounds for dimension 1 with size 2"), after the first forward passes; max_sensitivity and every
    explainer refuse it as a ValueError saying the model's number of classes. Refused at the first forward
    (the model's class count is known only then), and so is a row of ``classes`` naming a class it lacks."""
    x = torch.zeros(2, 3, 10, 10)
    model = _CountingOnePixelModel()
    with pytest.raises(ValueError, match=r"target out of range: the model has 2 classes \(0\.\.1\), got \[0, 2\]"):
        insertion_deletion(model, x, torch.tensor([0, 2]), torch.rand(2, 10, 10), n_steps=2, batch_size=1)
    assert model.calls == 1
    with pytest.raises(ValueError, match=r"classes holds 5, out of range for a model with 2 classes"):
        insertion_deletion(model, x, 0, torch.rand(2, 10, 10), n_steps=2, classes=torch.tensor([[0, 1], [0, 5]]))


# -- acceptance round 9 (evaluation researcher) ------------------------------------------------------------------
class _CountingReLU(nn.ReLU):
    """A user's ReLU subclass that only adds bookkeeping: still a ReLU, so it gets the smooth stand-in."""


def test_smooth_copy_replaces_relu_subclasses_and_a_leaky_relu_marks_the_attack_unsmoothed() -> None:
    """``smoothed`` promises the attack ran on smooth activations. A ReLU subclass was left kinked (exact type
    checks), and a LeakyReLU beside the ReLUs still reported smoothed=True although the attack saw a kink there."""
    subclassed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _CountingReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    smooth, replaced = smooth_activations_copy(subclassed, beta=5.0)
    assert replaced == 1 and isinstance(smooth[1], nn.Softplus)
    torch.manual_seed(0)
    mixed = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    target = mixed(x).argmax(1)
    maps = _gradient_explain(mixed)(x, target).detach()
    result = manipulation_attack(
        _gradient_explain,
        _gradient_explain(mixed),
        mixed,
        x,
        target,
        maps.flip(1),
        epsilon=0.1,
        bounds=(-1, 1),
        steps=2,
    )
    assert not result.smoothed


def test_ssim_and_the_attack_refuse_maps_smaller_than_the_window_by_name() -> None:
    """SSIM's 7x7 window: smaller maps got scikit-image's own error, the attack only after all its steps."""
    with pytest.raises(ValueError, match="at least 7x7 pixels"):
        ssim(torch.rand(1, 6, 9), torch.rand(1, 6, 9))
    model = _small_net()
    x = torch.rand(1, 3, 6, 6)
    with pytest.raises(ValueError, match="at least 7x7 pixels"):
        manipulation_attack(
            _gradient_explain,
            _gradient_explain(model),
            model,
            x,
            torch.tensor([0]),
            torch.rand(1, 6, 6),
            epsilon=0.1,
            bounds=(0, 1),
            steps=1,
        )


def test_one_mask_for_a_batch_is_named_as_a_mask_and_lists_are_refused_as_types() -> None:
    """A single (H, W) mask was reported as "boxes must have shape (B, 4)", a list as an AttributeError."""
    maps = torch.rand(2, 5, 5)
    with pytest.raises(ValueError, match=r"masks must be \(B, H, W\), one per map; got one \(5, 5\) mask"):
        pointing_game(maps, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"regions must be a torch\.Tensor"):
        pointing_game(maps, [[0, 0, 2, 2], [0, 0, 2, 2]])
    assert pointing_game(maps, torch.ones(5, 5, dtype=torch.bool).expand(2, 5, 5)).tolist() == [1.0, 1.0]


def test_fraction_arguments_refuse_bools() -> None:
    """README: bad arguments are refused, not cast; True was read as a fraction of 1."""
    with pytest.raises(TypeError, match="fraction must be a number, got bool"):
        top_k_intersection(torch.rand(1, 4, 4), torch.rand(1, 4, 4), fraction=True)
    model = _small_net()
    with pytest.raises(TypeError, match="blur_fraction must be a number, got bool"):
        insertion_deletion(model, torch.rand(1, 3, 8, 8), 0, torch.rand(1, 8, 8), blur_fraction=True)


# -- mutation round 9 --------------------------------------------------------------------------------------------
class _ClampingReLU(nn.ReLU):
    """A ReLU subclass with a forward of its own (a ReLU1): not a ReLU, so Softplus is no stand-in for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def test_smooth_copy_keeps_a_relu_subclass_with_a_forward_of_its_own() -> None:
    """Guards ``_stock``'s forward check. Module docstring: "a ReLU subclass with its own forward" is attacked
    unsmoothed and says so. Replaced by Softplus like a stock ReLU, the attack would optimise against another
    function than the model's (softplus is unbounded where the ReLU1 is capped at 1)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ClampingReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    smooth, replaced = smooth_activations_copy(model, beta=5.0)
    assert replaced == 0 and type(smooth[1]) is _ClampingReLU


def test_the_attack_refuses_maps_under_the_ssim_window_before_running() -> None:
    """Guards the size check in ``_checked``: maps under SSIM's 7x7 window must be refused before the attack
    runs (its ``steps`` explainer calls take minutes on a real model), not by ``ssim`` once it has finished."""
    model = _small_net()
    made: list[nn.Module] = []

    def attack_explain(smooth: nn.Module):
        made.append(smooth)
        return _gradient_explain(smooth)

    with pytest.raises(ValueError, match="at least 7x7 pixels"):
        manipulation_attack(
            attack_explain,
            _gradient_explain(model),
            model,
            torch.rand(1, 3, 6, 6),
            torch.tensor([0]),
            torch.rand(1, 6, 6),
            epsilon=0.1,
            bounds=(0, 1),
            steps=10,
        )
    assert made == [], "the attack was built (and run) before the refusal"


def test_insertion_deletion_curves_do_not_depend_on_the_batch_size() -> None:
    """Guards the per-batch construction of the perturbed images: each batch must take *its own* steps
    (counts[start : start + batch_size]). With the default batch_size (32) and n_steps (20) everything is one
    batch, so a batch that restarted at step 0 went unseen; batch_size only bounds memory, never the curve."""
    model = _small_net()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3))
    whole = insertion_deletion(model, x, torch.tensor([0, 2]), maps, n_steps=6)
    pieces = insertion_deletion(model, x, torch.tensor([0, 2]), maps, n_steps=6, batch_size=3)
    torch.testing.assert_close(pieces.deletion, whole.deletion)
    torch.testing.assert_close(pieces.insertion, whole.insertion)
    assert not torch.allclose(whole.deletion[:, 0], whole.deletion[:, -1])  # the curve moves: a real check


def test_max_sensitivity_noise_is_the_images_own_and_independent_across_images() -> None:
    """Each image's noise depends on the image and the seed only: the same alone as at any place in a batch,
    and different for different images (one draw shared by every image made a benchmark's mean hang on a few
    draws), and another seed draws anew."""
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.sum(1) + 1.0

    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 0, 0])

    def deltas(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        seen.clear()
        max_sensitivity(recording, images, t[: len(images)], n_samples=2, seed=seed)
        return torch.stack([s - images for s in seen[1:]], 1)  # (B, samples, C, H, W); seen[0] is x itself

    batch = deltas(x)
    torch.testing.assert_close(deltas(x[2:3])[0], batch[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(deltas(x[[2, 0]])[0], batch[2], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)
    assert not torch.allclose(deltas(x, seed=1), batch, atol=1e-3)
