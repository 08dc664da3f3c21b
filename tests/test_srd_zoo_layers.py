"""Layer names and refusals for the CNNs a vision platform's teams write beyond torchvision's builders: every
name in ``SRD.layers`` must be unique and name the map it lists, a block whose output is its activation's map
(an eval-mode dropout or identity after it changes nothing) is addressed by its own name, and a refusal says
what is unsupported rather than blaming the input size or calling a spatial dim non-spatial."""

from __future__ import annotations

import re

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.errors import InputSizeError, UnsupportedModelError
from torch import nn


class _ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.c(x))


class _FunctionalBesideABlockCalledRelu(nn.Module):
    """A top-level ``F.relu`` (named "relu" by the README's rule) beside a child block whose attribute name is
    ``relu`` and whose output is its own activation's map (so "relu" is also that block's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = _ConvReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.relu(x)
        return self.fc(x.mean((2, 3)))


def test_every_listed_layer_name_is_unique_and_addresses_its_own_map() -> None:
    """Here `layers` was ['relu', 'relu']: the stem's F.relu and the block `relu` got one name, and 'relu'
    resolved to the block, so the stem's map could not be asked for at all and a caller asking for the first
    listed layer silently got the second one's iERF."""
    torch.manual_seed(0)
    model = _FunctionalBesideABlockCalledRelu().eval()
    explainer = ierf.SRD(model)
    names = explainer.layers
    assert len(names) == 2
    assert len(set(names)) == len(names), f"duplicate layer names: {names}"
    ids = [explainer.program.source_id(n) for n in names]
    assert len(set(ids)) == len(ids), f"{names} resolve to the same map"


class _LinearOverWidth(nn.Module):
    """``nn.Linear`` on a map's last dim (its width: 16 at a 32x32 input), which PyTorch allows."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.lw = nn.Linear(16, 16)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.lw(F.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_a_linear_over_a_maps_width_is_refused_as_unsupported_not_as_an_input_that_does_not_fit() -> None:
    """The model runs at 32x32, yet SRD raised InputSizeError "input 32x32 does not fit this model: ... nn.Linear
    expects 16 input features but receives 8": a caller (or the service, which maps it to a bad input) then
    tries other sizes, none of which helps. With width == channels the same model is refused correctly as
    "nn.Linear applied to a spatial map"; the spatial check must come before the feature count."""
    torch.manual_seed(0)
    model = _LinearOverWidth().eval()
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 5)  # the input fits the model
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(model).saliency(x, 0)
    assert not isinstance(info.value, InputSizeError), str(info.value)
    assert "lw" in str(info.value)


class _BlocksWithTrailingIdentities(nn.Module):
    """Blocks ending in conv-bn-relu followed by an eval-mode Dropout2d / an Identity (common in user code)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.1))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


@pytest.mark.parametrize("block, activation", [("block1", "block1.2"), ("block2", "block2.2")])
def test_a_block_whose_activation_is_followed_by_eval_dropout_or_identity_is_addressed_by_its_name(
    block: str, activation: str
) -> None:
    """The block's output is its ReLU's map (dropout is the identity in eval mode), yet 'block1' was refused
    with "its output is not a post-activation PFV map" (false), while README says a block is an alias of its
    last activation ("layer2" for ResNet)."""
    explainer = ierf.SRD(_BlocksWithTrailingIdentities().eval())
    assert explainer.program.source_id(block) == explainer.program.source_id(activation)


def test_torchvisions_quantizable_resnet_blocks_are_addressed_by_their_names() -> None:
    """torchvision.models.quantization.resnet18(quantize=False) (float, QAT-ready) ends each block in
    FloatFunctional.add_relu, whose relu is followed by an Identity (activation_post_process): 'layer4.1' and
    'layer4' were refused as "not a post-activation PFV map", unlike the plain resnet18's."""
    from torchvision.models.quantization import resnet18

    explainer = ierf.SRD(resnet18(quantize=False).eval())
    last = explainer.program.source_id(explainer.layers[-1])
    assert explainer.program.source_id("layer4.1") == last
    assert explainer.program.source_id("layer4") == last


class _MeanWidthThenHeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.stem(x)).mean(3).mean(2))


def test_a_mean_over_width_then_height_is_decomposed_or_refused_without_calling_width_non_spatial() -> None:
    """x.mean(3).mean(2) is the global average pool; SRD refused it with "mean over dims 3 (only the spatial
    mean is supported)": dim 3 *is* spatial. Either decompose it (the map then sums to the logit) or say that
    the mean must be over both spatial dims at once."""
    torch.manual_seed(0)
    model = _MeanWidthThenHeight().eval()
    x = torch.randn(1, 3, 32, 32)
    try:
        saliency = ierf.SRD(model).saliency(x, 1)
    except UnsupportedModelError as exc:
        message = str(exc)
        assert re.search(r"\(2, 3\)|both spatial|height and width|at once", message), message
    else:
        assert saliency.sum().item() == pytest.approx(model(x)[0, 1].item(), rel=1e-4, abs=1e-6)


class _SqueezedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.stem(x))).squeeze(-1).squeeze(-1))


def test_squeezing_a_pooled_1x1_map_is_a_flatten_and_the_map_sums_to_the_logit() -> None:
    """``pool(x).squeeze(-1).squeeze(-1)`` is the commonest hand-written spelling of the flatten that
    torchvision writes ``torch.flatten(x, 1)``; it was refused ("no SRD rule for method .squeeze()") though the
    head is exactly the pool + linear head whose map the README says sums to the logit."""
    torch.manual_seed(0)
    model = _SqueezedPool().eval()
    x = torch.randn(1, 3, 32, 32)
    saliency = ierf.SRD(model).saliency(x, 2)
    assert saliency.sum().item() == pytest.approx(model(x)[0, 2].item(), rel=1e-4, abs=1e-6)


class _TiedBlock(nn.Module):
    """One conv-relu block applied twice (weight tying): its output is its ReLU's map at both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(self.stem(x))).mean((2, 3)))


def test_a_block_called_twice_is_not_refused_as_having_no_post_activation_output() -> None:
    """'block' was refused with "(Sequential) is not a stage boundary: its output is not a post-activation PFV
    map", which is false for both calls. As for a reused activation module (README: "the last call is also
    the block's name"), 'block' should name its last call, or the refusal should say it runs twice and list
    block.1:0 / block.1:1."""
    explainer = ierf.SRD(_TiedBlock().eval())
    try:
        sid = explainer.program.source_id("block")
    except ValueError as exc:
        message = str(exc)
        assert "not a post-activation PFV map" not in message, message
        assert "2 times" in message or "twice" in message, message
    else:
        assert sid == explainer.program.source_id("block.1:1")


class _SqueezeSpelling(nn.Module):
    def __init__(self, squeeze) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squeeze(self.pool(F.relu(self.stem(x)))))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda v: v.squeeze((2, 3)),
        lambda v: torch.squeeze(v, (-2, -1)),
        lambda v: v.squeeze(2).squeeze(2),
        lambda v: torch.squeeze(v.squeeze(-2), -1),
    ],
    ids=["method-both", "function-both", "height-then-width", "mixed-pair"],
)
def test_every_spelling_of_squeezing_a_pooled_map_sums_to_the_logit(spelling) -> None:
    torch.manual_seed(0)
    model = _SqueezeSpelling(spelling).eval()
    x = torch.randn(2, 3, 32, 32)
    saliency = ierf.SRD(model).saliency(x, 3)
    torch.testing.assert_close(saliency.sum((1, 2)), model(x)[:, 3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spelling, shown",
    [
        (lambda v: v.squeeze(), "squeeze()"),  # would drop a batch of one too
        (lambda v: v.squeeze(-1)[..., 0], "squeeze(-1)"),  # a 3-D value SRD does not track
        (lambda v: F.relu(v.squeeze(1)).mean(-1, keepdim=True).squeeze(-1), "squeeze(1)"),
    ],
    ids=["no-dims", "one-dim-alone", "channel-dim"],
)
def test_other_squeezes_of_a_map_are_refused_naming_the_call(spelling, shown) -> None:
    model = _SqueezeSpelling(spelling).eval()
    with pytest.raises(UnsupportedModelError) as info:
        ierf.SRD(model).saliency(torch.randn(1, 3, 32, 32), 0)
    message = str(info.value)
    assert shown in message and "1x1 map" in message, message


def test_a_mean_over_one_spatial_dim_says_both_at_once() -> None:
    with pytest.raises(UnsupportedModelError, match=r"mean over one spatial dim .*both spatial dims at once"):
        ierf.SRD(_MeanWidthThenHeight().eval()).saliency(torch.randn(1, 3, 32, 32), 0)


def test_an_identity_module_after_an_activation_is_not_a_name_of_its_map() -> None:
    """VGG's classifier runs Linear, ReLU, Dropout: the ReLU keeps its own name (the dropout hands the map on
    but is not a block that returns it), and the dropout's name stays refused as no stage boundary."""
    explainer = ierf.SRD(_BlocksWithTrailingIdentities().eval())
    assert explainer.layers == ["block1", "block2"]
    with pytest.raises(ValueError, match="not a stage boundary"):
        explainer.program.source_id("block1.3")
