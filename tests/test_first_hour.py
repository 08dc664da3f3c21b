"""A new user's first hour: spellings of supported operations that a model written by hand uses.

torch takes NumPy's names as aliases (``axis=`` for ``dim=``, ``keepdims=`` for ``keepdim=``,
``torch.concatenate`` for ``torch.cat``). SRD read ``x.mean(axis=(2, 3))`` as a mean over every dimension
and refused it with that (false) reason, and refused ``torch.concatenate`` and ``torch.cat(..., axis=1)``
although it decomposes a channel concatenation.
"""

from __future__ import annotations

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference, randomise_bn
from torch import nn


class _Net(nn.Module):
    """Stem, a channel split and concatenation, a squeeze-excitation gate, a global mean and a Linear."""

    def __init__(self, numpy_names: bool) -> None:
        super().__init__()
        self.numpy_names = numpy_names
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(4, 6, 3, padding=1)
        self.right = nn.Conv2d(4, 6, 1)
        self.squeeze = nn.Conv2d(12, 4, 1)
        self.excite = nn.Conv2d(4, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        a, b = h[:, :4], h[:, 4:]
        if self.numpy_names:
            h = F.relu(torch.concatenate([self.left(a), F.pad(self.right(b), (0, 0, 0, 0))], axis=1))
            gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean(axis=(2, 3), keepdims=True)))))
            h = h * gate
            pooled = F.adaptive_avg_pool2d(h, 1).squeeze(axis=(2, 3)) + torch.mean(h, axis=(-2, -1))
        else:
            h = F.relu(torch.cat([self.left(a), F.pad(self.right(b), (0, 0, 0, 0))], dim=1))
            gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean(dim=(2, 3), keepdim=True)))))
            h = h * gate
            pooled = F.adaptive_avg_pool2d(h, 1).squeeze((2, 3)) + torch.mean(h, dim=(-2, -1))
        return self.fc(pooled)


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    numpy_net = randomise_bn(_Net(numpy_names=True), seed=1)
    torch_net = _Net(numpy_names=False).eval()
    torch_net.load_state_dict(numpy_net.state_dict())
    return numpy_net, torch_net


def test_numpy_spellings_are_explained_as_their_torch_twins() -> None:
    numpy_net, torch_net = _pair()
    x = torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 3])
    maps = ierf.SRD(numpy_net).saliency(x, targets)
    twin = ierf.SRD(torch_net).saliency(x, targets)
    torch.testing.assert_close(maps, twin, rtol=0, atol=1e-6)  # (few channels: sums may fall short of the logit)


def test_numpy_spellings_match_the_float64_reference() -> None:
    numpy_net, _ = _pair()
    model = numpy_net.double()
    x = torch.randn(1, 3, 9, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    assert_matches_reference(dec, ref, dec_ref, (0, 4), rel_tol=1e-9)


def test_a_mean_over_every_dimension_is_still_refused() -> None:
    """The alias rewrite only renames: a real mean over all dims keeps its refusal."""

    class AllMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x)).mean().expand(x.shape[0], 1)

    with pytest.raises(ierf.UnsupportedModelError, match="every dimension"):
        ierf.SRD(AllMean().eval()).saliency(torch.randn(1, 3, 8, 8), 0)


def test_an_alias_the_op_does_not_take_is_refused_with_the_models_own_error() -> None:
    """``Tensor.split`` takes no ``axis=``: renamed, SRD could replay it, but the model cannot run it."""

    class BadSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = F.relu(self.conv(x)).split(4, axis=1)
            return self.fc((a + b).mean((2, 3)))

    with pytest.raises(ierf.UnsupportedModelError, match="model's own forward raises TypeError"):
        ierf.SRD(BadSplit().eval()).saliency(torch.randn(1, 3, 8, 8), 0)
