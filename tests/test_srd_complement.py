"""A residual stage's last 1x1 convolution takes its dot product with z from the other paths' (they all sum
to z), so it is never formed. Where that path contributes nothing its bias still goes nowhere, as where a
computed dot product is exactly zero (published rule): the complement would be rounding noise there."""

from __future__ import annotations

import ierf
import torch
from ierf.srd import ratios
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference, randomise_bn
from torch import nn


class HalfDeadBranch(nn.Module):
    """A residual block whose main branch is exactly zero on the image's left half: the first 1x1 conv
    copies +red into channels 0-3 and -red into 4-7; the branch's first conv is negative there (it takes
    0-3 negatively and 4-7, zero there, positively), so its ReLU gives zeros, but from a nonzero
    pre-activation: relevance given to the dead branch would still flow on to the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 1, bias=False)
        self.relu0 = nn.ReLU()
        self.conv_a = nn.Conv2d(8, 4, 1, bias=False)
        self.relu_a = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            w0 = torch.zeros(8, 3, 1, 1)
            w0[:4, 0] = 1.0
            w0[4:, 0] = -1.0
            w0[:, 1:] = 0.1 * torch.rand(8, 2, 1, 1, generator=g)
            self.conv0.weight.copy_(w0)
            wa = torch.zeros(4, 8, 1, 1)
            wa[:, :4] = -(torch.rand(4, 4, 1, 1, generator=g) + 0.1)
            wa[:, 4:] = torch.rand(4, 4, 1, 1, generator=g) + 0.1
            self.conv_a.weight.copy_(wa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu0(self.conv0(x))
        y = self.bn3(self.conv3(self.relu_a(self.conv_a(a))))
        return self.fc(self.pool(self.relu(y + a)).flatten(1))


def _image() -> torch.Tensor:
    x = torch.zeros(1, 3, 6, 8, dtype=torch.float64)
    x[:, 0, :, :4] = 2.0  # red > 0: channels 4-7 are zero after relu0, so conv_a's output is negative
    x[:, 0, :, 4:] = -1.5
    x[:, 1:] = 0.0  # green and blue add nothing to channels 4-7's sign
    return x


def test_a_dead_residual_branch_keeps_its_bias_off_and_matches_the_reference(monkeypatch):
    model = randomise_bn(HalfDeadBranch()).double().eval()
    x = _image()
    used = []
    complement = ratios._complement_path

    def spy(*args, **kwargs):
        found = complement(*args, **kwargs)
        used.append(found is not None)
        return found

    monkeypatch.setattr(ratios, "_complement_path", spy)
    dec = ierf.SRD(model, head="exact").decompose(x)
    assert any(used), "the residual stage did not take the complement path"
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), targets=(0, 3), rel_tol=1e-9)
    # the main branch really is zero on the left half: bn3's shift is there with nobody to carry it
    branch = model.conv_a(model.relu0(model.conv0(x)))
    assert (branch[..., :4] < 0).all() and (branch[..., 4:] > 0).all()


def test_the_complement_equals_the_direct_dot_products_on_a_resnet_in_float32(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fast = ierf.SRD(model).saliency(x, torch.tensor([1, 4]))
    monkeypatch.setattr(ratios, "_complement_path", lambda *a, **k: None)
    direct = ierf.SRD(model).saliency(x, torch.tensor([1, 4]))
    torch.testing.assert_close(fast, direct, atol=1e-5 * float(direct.abs().max()), rtol=0)


def test_a_residual_branch_contributing_only_negative_values_still_carries_its_bias():
    """'Contributes nothing' means every channel is zero, not that none is positive: a live branch whose
    contribution is negative in every channel keeps its share of the bias."""
    model = randomise_bn(HalfDeadBranch()).double().eval()
    with torch.no_grad():
        model.conv3.weight.copy_(-model.conv3.weight.abs() - 0.05)
    x = _image()
    part = model.bn3(model.conv3(model.relu_a(model.conv_a(model.relu0(model.conv0(x))))))
    shift = model.bn3.bias - model.bn3.running_mean * model.bn3.weight / (model.bn3.running_var + model.bn3.eps).sqrt()
    live = part[..., 4:] - shift[:, None, None]
    assert (live < 0).all(), "the branch's contribution is negative in every channel on the right half"
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), targets=(0, 3), rel_tol=1e-9)
