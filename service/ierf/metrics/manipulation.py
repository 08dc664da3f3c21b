"""Robustness to targeted explanation manipulation (Dombrowski et al., NeurIPS 2019).

The attack looks for a small perturbation delta (||delta||_inf <= epsilon, x + delta inside the
valid input range) that moves the explanation of x toward a chosen target map while keeping the
model's output:

    L(delta) = || h(x + delta) - h_t ||^2 + output_weight * || p(x + delta) - p(x) ||^2

with h the map scaled to unit L2 norm per image, h_t the unit-norm target map, p the softmax
output. Adam on delta, ``steps`` iterations, step size ``epsilon / 10``, projection after each step.
Unlike the reference code of Dombrowski et al., which compares channel-summed *absolute* maps scaled to
sum 1, h is the *signed* map (every method here returns a signed channel sum) scaled to unit L2 norm:
the attack must also move the sign of the evidence, which makes it harder for methods with signed maps.

ReLU networks have zero second derivatives, so gradient-based maps give the attack no signal. As in
the paper, the attack runs on a *copy* of the model whose ReLUs are replaced by softplus with
sharpness ``beta`` (ReLU6 by softplus(z) - softplus(z - 6), its smooth counterpart); the caller's
model is never changed. Maps before and after are then computed with the real model and the
method's normal (non-differentiable) path and compared: Pearson, SSIM and top-10 % intersection
between the original and the manipulated map (high = robust), the same similarities between the
manipulated map and the target (low = robust), and the change of the target-class probability.

An explainer that refuses the smoothed copy (``UnsupportedModelError``) is attacked on the unmodified
model instead, and the result says so (``smoothed=False``); SRD takes both stand-ins (``SmoothReLU6`` is
registered with it as an element-wise activation). A model with other kinked activations (LeakyReLU,
Hardswish, a ReLU subclass with its own forward) is attacked partly unsmoothed and says so the same way.
Without smoothing the attack is weaker, so such rows are flagged.

The attack is generic: ``attack_explain(model) -> f(x, target)`` must return maps that are
differentiable w.r.t. x (baselines expose ``differentiable_saliency``; SRD offers the same).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ierf.errors import UnsupportedModelError
from ierf.methods import check_input, resolve_target
from ierf.metrics._checks import check_maps, check_positive_finite, check_positive_int, eval_mode
from ierf.metrics.similarity import check_ssim_size, pearson, ssim, top_k_intersection
from ierf.srd.graph import rule_type
from ierf.srd.rules import register_activation

DiffExplain = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SmoothReLU6(nn.Softplus):
    """softplus(z) - softplus(z - 6): the smooth counterpart of ReLU6 = relu(z) - relu(z - 6).

    Subclasses nn.Softplus so tools that recognise element-wise activations by type (the SRD
    engine, Zennit's pass rule) treat it as the activation it is.
    """

    def __init__(self, beta: float) -> None:
        super().__init__(beta=beta)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.softplus(z, beta=self.beta) - F.softplus(z - 6.0, beta=self.beta)


register_activation(SmoothReLU6)  # element-wise: a PFV boundary for SRD like the ReLU6 it replaces


# Activations with a kink: a second derivative of zero almost everywhere, so a gradient map gives the attack
# no signal through them. Only (stock) ReLU and ReLU6 have smooth stand-ins here.
_KINKED = (
    nn.ReLU,
    nn.Hardtanh,  # ReLU6 too
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Hardsigmoid,
    nn.Hardswish,
)


def smooth_activations_copy(model: nn.Module, beta: float) -> tuple[nn.Module, int]:
    """A deep copy of ``model`` with every nn.ReLU -> Softplus(beta), nn.ReLU6 -> SmoothReLU6(beta).

    Returns the copy (eval mode) and the number of modules replaced. Functional ``F.relu`` calls
    inside a forward cannot be replaced this way; the count tells whether anything was.
    """
    check_positive_finite(beta, "beta")  # nan passed "beta <= 0" and zeroed every map
    smooth = copy.deepcopy(model).eval()
    replaced = 0
    for parent in list(smooth.modules()):
        for name, child in list(parent.named_children()):
            # a subclass without a forward of its own counts, a patched one not (SRD's test of a stock module)
            kind = rule_type(child, (nn.ReLU, nn.ReLU6))
            if kind is not None:
                setattr(parent, name, nn.Softplus(beta=beta) if kind is nn.ReLU else SmoothReLU6(beta))
                replaced += 1
    smooth.eval()  # the new activation modules are created in training mode
    for p in smooth.parameters():
        p.requires_grad_(False)
    return smooth, replaced


def _kinks_left(model: nn.Module) -> list[str]:
    """Names of the activation modules still kinked (LeakyReLU, Hardswish, a ReLU with its own forward…)."""
    return [name for name, module in model.named_modules() if isinstance(module, _KINKED)]


def _unit(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(maps)


@dataclass
class ManipulationResult:
    x_adv: torch.Tensor
    maps_before: torch.Tensor
    maps_after: torch.Tensor
    target_maps: torch.Tensor
    pearson_before_after: torch.Tensor
    ssim_before_after: torch.Tensor
    topk_before_after: torch.Tensor
    pearson_after_target: torch.Tensor
    prob_change: torch.Tensor  # |p_y(x_adv) - p_y(x)| on the real model
    prediction_kept: torch.Tensor  # argmax unchanged on the real model
    linf: torch.Tensor  # achieved ||delta||_inf per image
    final_loss: float
    # False: the attack ran on the unmodified activations (the explainer refused the smooth copy), or on a
    # copy that kept kinked activations without a smooth stand-in (LeakyReLU, Hardswish…)
    smoothed: bool

    def summary(self) -> dict[str, float]:
        return {
            "pearson_before_after": float(self.pearson_before_after.mean()),
            "ssim_before_after": float(self.ssim_before_after.mean()),
            "topk_before_after": float(self.topk_before_after.mean()),
            "pearson_after_target": float(self.pearson_after_target.mean()),
            "prob_change": float(self.prob_change.mean()),
            "prediction_kept": float(self.prediction_kept.float().mean()),
            "smoothed": float(self.smoothed),
        }


def manipulation_attack(
    attack_explain: Callable[[nn.Module], DiffExplain],
    evaluate_explain: DiffExplain,
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    target_maps: torch.Tensor,
    *,
    epsilon: float,
    bounds: tuple[float, float],
    steps: int = 100,
    output_weight: float = 10.0,
    beta: float = 5.0,
) -> ManipulationResult:
    """Run the attack on ``x`` (B, C, H, W); see the module docstring. Deterministic (no noise). The
    model runs in eval mode (a model left in training mode would have had its BatchNorm statistics
    updated by every step); its own flags are put back afterwards."""
    target, target_maps, (lo, hi) = _checked(x, target, target_maps, epsilon, bounds, steps)
    # An attack is gradient descent on the input: it runs (its model copy made) with gradients on, also
    # inside a caller's no_grad() or inference_mode() (an evaluation cell's)
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        smooth, replaced = smooth_activations_copy(model, beta)
        explain, smoothed = attack_explain(smooth), replaced > 0 and not _kinks_left(smooth)
        try:  # probe: an explainer may not accept the smoothed activations
            explain(x[:1].detach().clone().requires_grad_(True), target[:1])
        except UnsupportedModelError:
            smooth = copy.deepcopy(model).eval()
            for p in smooth.parameters():
                p.requires_grad_(False)
            explain, smoothed = attack_explain(smooth), False
        goal = _unit(target_maps.to(x.device))
        x = x.detach()
        with torch.no_grad():
            p_ref = smooth(x).softmax(1)

        def loss_at(x_adv: torch.Tensor) -> torch.Tensor:
            maps_loss = ((_unit(explain(x_adv, target)) - goal) ** 2).flatten(1).sum(1)
            return (maps_loss + output_weight * ((smooth(x_adv).softmax(1) - p_ref) ** 2).sum(1)).sum()

        delta = torch.zeros_like(x, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=epsilon / 10)
        for _ in range(steps):
            loss = loss_at(x + delta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                delta.clamp_(-epsilon, epsilon)
                delta.copy_((x + delta).clamp(lo, hi) - x)
        x_adv = (x + delta).detach()
        loss_value = float(loss_at(x_adv.clone().requires_grad_(True)).detach())  # at the final perturbation
        maps_before = check_maps(evaluate_explain(x, target))
        maps_after = check_maps(evaluate_explain(x_adv, target))
        with torch.no_grad():
            p_before, p_after = model(x).softmax(1), model(x_adv).softmax(1)
    rows = torch.arange(x.shape[0])
    return ManipulationResult(
        x_adv=x_adv,
        maps_before=maps_before,
        maps_after=maps_after,
        target_maps=target_maps,
        pearson_before_after=pearson(maps_before, maps_after),
        ssim_before_after=ssim(maps_before, maps_after),
        topk_before_after=top_k_intersection(maps_before, maps_after),
        pearson_after_target=pearson(maps_after, target_maps),
        prob_change=(p_after[rows, target] - p_before[rows, target]).abs().cpu(),
        prediction_kept=(p_after.argmax(1) == p_before.argmax(1)).cpu(),
        linf=(x_adv - x).flatten(1).abs().max(1).values.cpu(),
        final_loss=loss_value,
        smoothed=smoothed,
    )


def _checked(
    x: torch.Tensor,
    target: torch.Tensor,
    target_maps: torch.Tensor,
    epsilon: float,
    bounds: tuple[float, float],
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """The attack's arguments, or a precise error: one class per image (one target for two images had
    scored the second "robust"), a target map to steer toward, ``x`` inside ``bounds``."""
    check_positive_int(steps, "steps")
    check_positive_finite(epsilon, "epsilon")
    x = check_input(x)  # finite: a NaN pixel passed the bounds check below (every comparison is False)
    if not isinstance(target, torch.Tensor) or target.shape != (x.shape[0],) or target.is_floating_point():
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be an integer tensor of shape ({x.shape[0]},), one class per image, got {got}")
    check_ssim_size(x.shape[-2:])  # the maps are compared with SSIM after the attack: refuse before it runs
    target_maps = check_maps(target_maps, "target_maps")
    if target_maps.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"target_maps must be {(x.shape[0], *x.shape[-2:])}, got {tuple(target_maps.shape)}")
    if not bool(target_maps.flatten(1).abs().amax(1).gt(0).all()):
        raise ValueError("target_maps has an all-zero map: there is nothing to steer toward")
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
    slack = 1e-5 * (hi - lo)  # float rounding of a normalisation, not an input out of range
    if bool((x < lo - slack).any() or (x > hi + slack).any()):
        raise ValueError(f"x lies outside bounds {bounds}: the projection would move it past epsilon")
    return resolve_target(target, x.shape[0]).to(target.device), target_maps, (lo, hi)  # bool, negative: refused
