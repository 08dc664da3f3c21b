"""A model whose own weights are NaN (a diverged fine-tune) is refused with BrokenModelError naming the tensors
wherever its map would be NaN (SRD: whenever the logits are; a gradient method: whenever the NaN reaches the
input gradient, which a NaN in the last layer's bias does not): never a NaN map, and not blamed on the
caller's input (a server answers INTERNAL)."""

from __future__ import annotations

import ierf
import pytest
import torch
import torchvision
from ierf.errors import BrokenModelError


@pytest.fixture(scope="module")
def broken() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("method", ["srd", "gradient", "integrated_gradients", "gradcam", "lrp"])
def test_every_method_refuses_a_model_with_nan_weights_by_name(broken, method):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with pytest.raises(BrokenModelError, match=r"non-finite values in fc\.weight"):
        ierf.create_explainer(method, broken).saliency(x, 1)


def test_an_overflow_with_finite_weights_is_the_input_s_problem_not_a_broken_model():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval()
    with torch.no_grad():
        model[1].weight.fill_(1e30)
    x = torch.full((1, 3, 4, 4), 1e10)  # finite, but the logits pass float32's range
    with pytest.raises(ValueError, match="parameters are finite") as caught:
        ierf.create_explainer("input_x_gradient", model).saliency(x, 0)
    assert not isinstance(caught.value, BrokenModelError)
