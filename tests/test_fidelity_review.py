"""Review of the fidelity tooling as a user comparing attribution methods: each test pins a number a
paper would cite (attack robustness, a similarity, a metric's refusal of a bad input)."""

from __future__ import annotations

import pytest
import torch
from ierf import create_explainer
from ierf.metrics import insertion_deletion, manipulation_attack, max_sensitivity, pearson, smooth_activations_copy
from torch import nn


def _smooth_double_net() -> nn.Module:
    """Conv-ReLU-Conv-ReLU-GAP-Linear, ReLUs smoothed as the manipulation attack smooths them, in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()
    smooth, _ = smooth_activations_copy(net, beta=5.0)
    return smooth.double()


@pytest.mark.parametrize("method", ["gradient", "input_x_gradient", "gradcam"])
def test_differentiable_saliency_has_the_true_derivative(method: str) -> None:
    """The manipulation attack trusts ``differentiable_saliency`` to give d map / d input: every method
    that offers one must match central finite differences (LRP's did not, and is refused: below)."""
    net = _smooth_double_net()
    explainer = create_explainer(method, net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    target = torch.tensor([1])
    weights = torch.randn(1, 8, 8, generator=g, dtype=torch.float64)
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
    direction /= direction.norm()

    def score(inp: torch.Tensor) -> torch.Tensor:
        inp = inp.detach().requires_grad_(True)  # as in the attack: x + delta is part of a graph
        return (explainer.differentiable_saliency(inp, target) * weights).sum()

    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((explainer.differentiable_saliency(x_req, target) * weights).sum(), x_req)
    analytic = float((grad * direction).sum())
    h = 1e-5
    numeric = float((score(x + h * direction) - score(x - h * direction)).detach()) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_lrp_offers_no_differentiable_map_and_the_attack_leaves_it_out() -> None:
    """Zennit's hooks run their inner ``autograd.grad`` with ``create_graph=grad_output.requires_grad``,
    and the one-hot output relevance does not require grad, so LRP's "differentiable" map dropped the
    rules' dependence on the input: its derivative was ~1e-4 of the finite difference (0.0005 vs 180 on
    TinyResNet), and the README's "LRP is by far the most robust" (r 0.932 / 0.978) measured gradient
    masking. Until a path passes the check above, it is refused and not attacked."""
    import ast
    from pathlib import Path

    explainer = create_explainer("lrp", _smooth_double_net())
    with pytest.raises(NotImplementedError, match="finite differences"):
        explainer.differentiable_saliency(torch.randn(1, 3, 8, 8, dtype=torch.float64), 1)
    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py").read_text()
    (attackable,) = [
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["ATTACKABLE"]
    ]
    assert "lrp" not in ast.literal_eval(attackable)


def test_pearson_refuses_maps_of_another_spatial_shape() -> None:
    """pearson flattened both maps before comparing shapes, so a (B, H, W) map against a transposed
    (B, W, H) one (or any map with the same pixel count) got a correlation of unrelated pixels instead
    of the "maps must have the same shape" error that ssim and top_k_intersection give."""
    a = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="same shape"):
        pearson(a, a.transpose(1, 2).contiguous())


def _tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def test_image_metrics_refuse_a_non_finite_image_by_name() -> None:
    """maps with a NaN are refused ("maps contains NaN or infinite values"), and so is x in
    max_sensitivity (through the explainer), but a NaN pixel in x ran insertion_deletion's every
    forward and returned a NaN AUC for that image (the benchmark's mean then became NaN, which its
    table prints as "—", the mark for "not applicable"), and manipulation_attack's bounds check
    (x < lo, x > hi: False for NaN) let it through to a NaN prob_change."""
    model = _tiny_classifier()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        insertion_deletion(model, x, 0, torch.rand(2, 8, 8), n_steps=2)

    def explain_factory(m: nn.Module):
        def explain(inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if not inp.requires_grad:
                inp = inp.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(m(inp).gather(1, target[:, None]).sum(), inp, create_graph=True)
            return grad.sum(1)

        return explain

    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        manipulation_attack(
            explain_factory,
            explain_factory(model),
            model,
            x,
            torch.tensor([0, 1]),
            torch.rand(2, 8, 8),
            epsilon=0.1,
            bounds=(-1.0, 2.0),
            steps=1,
        )


def test_max_sensitivity_radius_is_checked_not_cast() -> None:
    """README: bad arguments are refused, not cast, and top_k_intersection / insertion_deletion refuse a
    bool fraction. max_sensitivity read radius=True as 1.0 (noise of 100 % of the image's range) and
    scored it; a string radius failed with "'>' not supported between 'str' and 'int'"."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def explain(inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return inp.sum(1)

    with pytest.raises(TypeError, match="radius must be a number, got bool"):
        max_sensitivity(explain, x, torch.tensor([0]), radius=True, n_samples=1)
    with pytest.raises(TypeError, match="radius must be a number, got str"):
        max_sensitivity(explain, x, torch.tensor([0]), radius="0.02", n_samples=1)


def test_gradcam_differentiable_saliency_accepts_a_plain_input_like_the_others() -> None:
    """gradient and input_x_gradient make a plain x require grad inside differentiable_saliency;
    Grad-CAM's raised autograd's "element 0 of tensors does not require grad and does not have a
    grad_fn" on a model with frozen parameters (as smooth_activations_copy leaves it), instead of the
    same map as ``saliency``."""
    net = _smooth_double_net()
    explainer = create_explainer("gradcam", net)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = explainer.saliency(x, 1)
    got = explainer.differentiable_saliency(x, 1)
    torch.testing.assert_close(got.detach().float(), expected, rtol=1e-5, atol=1e-6)
