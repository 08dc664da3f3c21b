"""A model whose first op is in place (``nn.SiLU(inplace=True)`` on the input) is explained as the same model
with ``inplace=False``, and the caller's image stays as it was.

The gradient and CAM methods crashed with autograd's "a leaf Variable that requires grad is being used in an
in-place operation" (SmoothGrad: "a view created in no_grad mode ... modified inplace"); Integrated Gradients
answered a wrong map without a word (Captum's scaled inputs are no leaves: the activation overwrote them, and
the gradient was taken with respect to the activated values, every pixel off); SRD's check of the
model's own output ran the model on the caller's tensor, which the activation then overwrote, and with a SiLU
applied twice the model was refused as one whose traced forward does not reproduce its output.
"""

from __future__ import annotations

import pytest
import torch
from ierf.methods import available_methods, create_explainer
from torch import nn


def _model(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.SiLU(inplace=inplace),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize("method", available_methods())
def test_an_in_place_first_activation_is_explained_as_its_out_of_place_twin(method: str) -> None:
    x = torch.randn(2, 3, 9, 10, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    maps = create_explainer(method, _model(inplace=True)).saliency(x, 1)
    assert torch.equal(x, before), "the caller's image was written"
    expected = create_explainer(method, _model(inplace=False)).saliency(x, 1)
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
