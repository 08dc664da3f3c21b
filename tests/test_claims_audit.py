"""README claims about the engine, checked against what it does (documentation audit).

Each test quotes the claim it pins. Small random-weight networks, CPU, a second or two each.
"""

from __future__ import annotations

from pathlib import Path

import ierf
import pytest
import torch
import torchvision
from ierf.errors import UnsupportedModelError
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class _TwoStages(nn.Module):
    """conv -> act -> conv -> act -> global mean -> linear: the smallest net with two PFV boundaries."""

    def __init__(self, act) -> None:  # a module, or a function (traced as a call)
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize(
    "activation",
    [
        nn.Softsign(),
        nn.LogSigmoid(),
        nn.Tanhshrink(),
        nn.Threshold(0.1, 0.0),
        nn.RReLU(),
        nn.Softshrink(),
        nn.Hardshrink(),
    ],
    ids=lambda a: type(a).__name__,
)
def test_every_stock_elementwise_activation_is_a_pfv_boundary(activation) -> None:
    """README (Generic over architectures) lists these stock torch.nn activations as PFV boundaries (RReLU in
    eval mode is a fixed leaky ReLU). Each once raised "no SRD rule for Softsign at module 'act'"; now each
    must decompose exactly: the map sums to the logit. (Mutation round 16: the test once also passed when an
    activation was refused with a hint, so dropping one from the registry went unseen.)"""
    torch.manual_seed(0)
    model = _TwoStages(activation).eval()
    x = torch.randn(1, 3, 16, 16)
    name = type(activation).__name__
    assert name in (ROOT / "README.md").read_text(), f"README does not list {name}"
    saliency = ierf.SRD(model).saliency(x, 1)
    torch.testing.assert_close(saliency.sum(), model(x)[0, 1], rtol=1e-4, atol=1e-5)


def test_a_decomposition_state_of_other_weights_is_not_taken_for_this_models() -> None:
    """README: "without like=, a state is checked for structure only (...): another model's state is refused;
    like= also pins routes and refuses NaN/inf". A state_dict of resnet18 with *other weights* (the same model
    before fine-tuning, a cache kept across a weights update) is accepted with and without like=, and its
    saliency then sums to the other model's logit, not this one's: a silently stale map. The service keys its
    cache by the weights digest, but the README offers state_dict() to Python callers as "cacheable"."""
    torch.manual_seed(0)
    before = torchvision.models.resnet18().eval()
    after = torchvision.models.resnet18().eval()  # other weights, same architecture
    x = torch.randn(1, 3, 64, 64)
    state = ierf.SRD(before).decompose(x).state_dict()
    explainer = ierf.SRD(after)
    like = ierf.StateLayout.of(explainer.decompose(x))
    readme = " ".join((ROOT / "README.md").read_text().split())
    if "another model's state is refused" not in readme:
        return  # the README no longer promises it (then say that a state carries no weights fingerprint)
    for kwargs in ({}, {"like": like}):
        with pytest.raises(ValueError):
            explainer.load_decomposition(state, **kwargs)


@pytest.mark.parametrize(
    "fn",
    [
        torch.nn.functional.softsign,
        torch.nn.functional.logsigmoid,
        torch.nn.functional.tanhshrink,
        lambda z: torch.nn.functional.threshold(z, 0.1, 0.0),
        lambda z: torch.nn.functional.rrelu(z, 0.1, 0.3, False),
        torch.nn.functional.softshrink,
        torch.nn.functional.hardshrink,
        torch.special.expit,
    ],
    ids=["softsign", "logsigmoid", "tanhshrink", "threshold", "rrelu", "softshrink", "hardshrink", "expit"],
)
def test_functional_forms_of_the_stock_activations_are_pfv_boundaries(fn) -> None:
    """The same activations called as functions: their maps sum to the logit (conservation)."""
    torch.manual_seed(0)
    model = _TwoStages(fn).eval()
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(ierf.SRD(model).saliency(x, 1).sum(), model(x)[0, 1], rtol=1e-4, atol=1e-5)


def test_rrelu_in_training_mode_is_refused_not_explained_with_a_random_slope() -> None:
    torch.manual_seed(0)
    model = _TwoStages(nn.RReLU()).eval()
    model.act.train()
    with pytest.raises(ValueError, match="modules in training mode: act"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 16, 16), 1)
    functional = _TwoStages(lambda z: torch.nn.functional.rrelu(z, 0.1, 0.3, True)).eval()
    with pytest.raises(UnsupportedModelError, match="rrelu with training=True"):
        ierf.SRD(functional).saliency(torch.randn(1, 3, 16, 16), 1)


def test_a_module_without_a_rule_is_refused_with_the_way_to_declare_an_activation() -> None:
    torch.manual_seed(0)
    model = _TwoStages(nn.Softmax2d()).eval()
    with pytest.raises(UnsupportedModelError, match=r"ierf\.srd\.register_activation\(Softmax2d\)"):
        ierf.SRD(model)


def test_the_old_weight_norm_is_refused_with_the_parametrization_that_works() -> None:
    """torch.nn.utils.weight_norm recomputes the weight in a forward pre-hook; the refusal said only "has forward
    hooks", where parametrizations.weight_norm (which SRD follows) is the way round."""
    torch.manual_seed(0)
    model = _TwoStages(nn.ReLU()).eval()
    torch.nn.utils.weight_norm(model.c2)
    with pytest.raises(ValueError, match=r"parametrizations\.weight_norm"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 16, 16), 1)
    fixed = _TwoStages(nn.ReLU()).eval()
    torch.nn.utils.parametrizations.weight_norm(fixed.c2)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(ierf.SRD(fixed).saliency(x, 1).sum(), fixed(x)[0, 1], rtol=1e-4, atol=1e-5)
