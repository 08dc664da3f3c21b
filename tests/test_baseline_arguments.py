"""The gradient baselines check their settings when built, in their own words: a fractional step count or a
NaN noise level used to pass the constructor and fail later, deep inside Captum or torch.randn."""

from __future__ import annotations

import pytest
import torch
import torchvision
from ierf.baselines.gradient import IntegratedGradientsExplainer, SmoothGrad


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=4).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_steps": 2.5}, "n_steps must be an integer >= 1, got 2.5"),
        ({"n_steps": True}, "n_steps must be an integer >= 1, got True"),
        ({"n_steps": 0}, "n_steps must be an integer >= 1, got 0"),
        ({"internal_batch_size": 4.0}, "internal_batch_size must be an integer >= 1, got 4.0"),
    ],
)
def test_integrated_gradients_refuses_bad_settings_when_built(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        IntegratedGradientsExplainer(model, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_samples": 1.5}, ValueError, r"n_samples must be an integer >= 1, got 1\.5"),
        ({"noise_level": float("nan")}, ValueError, r"noise_level must be in \(0, 1\), got nan"),
        ({"noise_level": "0.1"}, TypeError, "noise_level must be a number, got str"),
        ({"seed": 1.0}, ValueError, r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got 1\.0"),
        ({"seed": 2**64}, ValueError, "seed must be an integer"),
    ],
)
def test_smoothgrad_refuses_bad_settings_when_built(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        SmoothGrad(model, **kwargs)


def test_good_settings_still_build_and_run(model):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert SmoothGrad(model, n_samples=2, noise_level=0.1, seed=-5).saliency(x, 1).shape == (1, 32, 32)
    assert IntegratedGradientsExplainer(model, n_steps=2, internal_batch_size=1).saliency(x, 1).shape == (1, 32, 32)
