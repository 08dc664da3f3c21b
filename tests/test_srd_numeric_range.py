"""SRD at the edges of the float range: a float32 map must either be right (conserve the logit, agree with
the float64 decomposition) or be refused with a ValueError, never silently lose relevance.

Sharing ratios mu = <C + b, z> / ||z||^2 and the norm-proportional bias shares are invariant under a common
scale of the contributions, so the right map of ``s * x`` does not depend on whether ``s``'s squares
leave float32's range. The engine squares in float32 without rescaling: squares that underflow to 0 or
overflow to inf turn into ratio 0 (the ``zz > 0`` / ``total_norm > 0`` guards, and 1/inf = 0), which drops
the relevance there while the map stays finite, so the "map is not finite" check does not fire."""

from __future__ import annotations

import copy

import ierf
import pytest
import torch
from torch import nn


def _tiny_net(seed: int, hidden_scale: float = 1.0) -> nn.Module:
    """conv-ReLU-conv-ReLU-GAP-Linear: an exact head, so every map must sum to its logit. ``hidden_scale``
    shrinks the second convolution (and drops its bias) so that its pre-activations are ~hidden_scale."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        ).eval()
    if hidden_scale != 1.0:
        with torch.no_grad():
            net[2].weight.mul_(hidden_scale)
            net[2].bias.zero_()
    return net


def _image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _right_or_refused(net: nn.Module, x64: torch.Tensor, target: int = 1) -> None:
    """The float32 map of ``x64`` (rounded to float32) is conserved and equals the float64 decomposition's
    map of the same float32 values, or the call raises ValueError."""
    x32 = x64.float()
    try:
        dec = ierf.SRD(net).decompose(x32)
        fast = dec.saliency(target).double()
    except ValueError:
        return  # a precise refusal is acceptable
    slow = ierf.SRD(copy.deepcopy(net).double()).decompose(x32.double()).relevance(target)
    logit = dec.logits[0, target].double()
    assert abs(float(fast.sum() - logit)) <= 1e-4 * abs(float(logit)), (
        f"map sums to {float(fast.sum()):.6g} but the logit is {float(logit):.6g}"
    )
    err = float((fast - slow).abs().max() / slow.abs().max())
    assert err <= 1e-3, f"float32 map is {err:.3g} (max-normalised) off the float64 decomposition's"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_squared_norms_that_overflow_float32_are_refused_not_dropped(seed: int) -> None:
    """Inputs ~6e18-8e18: some ||z||^2 overflow to inf while the forward, the dots and the map stay finite;
    1/inf = 0 gave those PFVs ratio 0, so the map summed 4-15 % off the logit and was 40-80 % off the
    float64 map, with no error (at 1e19 the same model is refused with 'the map is not finite')."""
    net = _tiny_net(seed)
    for scale in (5.8e18, 8.0e18):
        _right_or_refused(net, _image(seed) * scale)


@pytest.mark.parametrize("scale", [1e-21, 1e-22, 1e-25, 1e-30])
def test_tiny_inputs_keep_their_bias_shares(scale: float) -> None:
    """The stem's per-tap squared norms underflow below |x| ~ 1e-19: the bias then had no path to be shared
    with, and the map summed to ~1e-28 against a logit of ~0.4 (1e-22: 70 % off the float64 map), with no
    error. The float64 decomposition of the same float32 values is conserved."""
    _right_or_refused(_tiny_net(0), _image(0) * scale)


@pytest.mark.xfail(
    strict=True,
    reason="known limit (README): a stage whose every pre-activation is below ~1e-23 (weights scaled down "
    "1e25, no bias) squares to exactly 0 in float32, indistinguishable from an all-zero stage without another "
    "pass over it; the window just above (subnormal squares) is refused",
)
def test_tiny_hidden_pre_activations_keep_their_relevance() -> None:
    """A hidden stage whose pre-activations are ~1e-25 (nonzero): ||z||^2 underflows to 0 and the ratio-0
    rule for all-zero PFVs dropped all relevance through it, although z != 0."""
    _right_or_refused(_tiny_net(0, hidden_scale=1e-25), _image(0))


def test_tiny_input_ierf_sums_to_one() -> None:
    """iERF mass is 1 whatever the input's scale (README); at |x| ~ 1e-30 it came out ~1e-32."""
    net = _tiny_net(0)
    srd = ierf.SRD(net)
    positions = torch.tensor([[0, 0], [12, 12]])
    try:
        erf = srd.ierf((_image(0) * 1e-30).float(), srd.layers[-1], positions)
    except ValueError:
        return
    torch.testing.assert_close(erf.sum((2, 3)), torch.ones(1, 2), atol=1e-4, rtol=0)


def test_pre_activations_whose_squares_are_subnormal_are_refused() -> None:
    """Between ~1e-23 and ~1e-19 a hidden stage's ||z||^2 is subnormal (precision gone): the forward's range
    flags refuse it, with the way out named."""
    with pytest.raises(ValueError, match=r"pre-activation vectors leave .*rescale the input"):
        ierf.SRD(_tiny_net(0, hidden_scale=1e-21)).decompose(_image(0).float())


@pytest.mark.parametrize("scale", [1e-14, 1e14])
def test_inputs_far_from_unit_scale_are_refused_before_the_forward(scale: float) -> None:
    with pytest.raises(ValueError, match="largest magnitude"):
        ierf.SRD(_tiny_net(0)).saliency((_image(0) * scale).float(), 1)
