"""A batch pipeline's view of the one-verb API: every method takes the same calls and refuses the same bad
calls the same way, and the pictures it draws work for every image size it meets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ierf import methods
from ierf.viz import overlay_signed, render_ierf
from torch import nn

ALL_METHODS = methods.available_methods()


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()


@pytest.mark.parametrize("target", [np.int64(1), np.int32(1)])
def test_resolve_target_takes_numpy_integers(target: object) -> None:
    """Labels in a pipeline come out of numpy arrays (``labels[i]`` is a numpy integer). SRD takes them
    ("also numpy integers", ``Decomposition._targets``); the shared ``resolve_target`` that every baseline
    and metric uses refused them with "must be an int ..., got int64"."""
    assert methods.resolve_target(target, 2).tolist() == [1, 1]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_takes_a_numpy_integer_target_as_srd_does(method: str, small_model: nn.Module) -> None:
    """One verb across methods: ``create_explainer(name, model).saliency(x, labels[i])`` must work for every
    method once it works for one; only SRD took a numpy integer, every baseline raised TypeError."""
    x = torch.randn(2, 3, 16, 16)
    explainer = methods.create_explainer(method, small_model)
    expected = explainer.saliency(x, 1) if method != "smoothgrad" else None
    got = explainer.saliency(x, np.int64(1))
    assert got.shape == (2, 16, 16)
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_an_input_with_the_wrong_channel_count_is_a_value_error_for_every_method(
    method: str, small_model: nn.Module
) -> None:
    """SRD refuses a 1-channel batch for an RGB model with ``ValueError: x must have 3 channels, got 1``; the
    baselines let torch's conv ``RuntimeError`` escape (for IG and SmoothGrad naming their internal batch of
    8 or 4 copies), so a pipeline that skips bad inputs with ``except ValueError`` dies on them."""
    with pytest.raises(ValueError, match="channel"):
        methods.create_explainer(method, small_model).saliency(torch.randn(2, 1, 16, 16), 1)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_an_input_too_small_for_the_model_is_an_input_size_error_for_every_method(
    method: str, small_model: nn.Module
) -> None:
    """README: an input the model cannot take raises ``ierf.InputSizeError`` (a ValueError). SRD does; every
    baseline raised torch's bare ``RuntimeError`` ("Kernel size can't be greater than actual input size")
    for the same 3x3 image."""
    import ierf

    with pytest.raises(ierf.InputSizeError):
        methods.create_explainer(method, small_model).saliency(torch.randn(1, 3, 3, 3), 1)


@pytest.mark.parametrize("hw", [(1, 1), (7, 1), (2, 3), (40, 6)])
def test_a_colour_bar_under_an_image_narrower_than_seven_pixels_is_drawn(hw: tuple[int, int]) -> None:
    """Overlays of tiny crops (a 1-pixel column, a 2x3 patch) with the default colour bar raised PIL's
    ``ValueError: x1 must be greater than or equal to x0`` from the bar's outline: any image under 7 px
    wide failed, though the same call without the bar works."""
    image = np.full((*hw, 3), 128, np.uint8)
    signed = np.linspace(-1.0, 1.0, hw[0] * hw[1]).reshape(hw)
    draws = (
        lambda **kw: overlay_signed(image, signed, caption="c", **kw),
        lambda **kw: render_ierf(image, signed, **kw),
    )
    for draw in draws:
        plain = draw(colorbar=False)
        with_bar = draw()
        assert with_bar.size[0] == hw[1] and with_bar.size[1] > hw[0]
        np.testing.assert_array_equal(np.asarray(with_bar)[: hw[0]], np.asarray(plain))


@pytest.mark.parametrize(
    "positions",
    [torch.tensor([[0.5, 1.0]]), torch.tensor([[100, 100]]), torch.tensor([[1, 2, 3]])],
    ids=["float", "outside-grid", "wrong-shape"],
)
def test_srd_ierf_refuses_bad_positions_before_decomposing(positions: torch.Tensor, small_model: nn.Module) -> None:
    """``SRD.saliency`` refuses a certainly-wrong target before the decomposition ("seconds on a large
    batch", ``_check_target_early``), but ``SRD.ierf`` checked only the layer name up front: float positions,
    positions off the layer's grid or of the wrong shape were refused after a full decomposition of the
    batch (0.6 s for 8 ResNet18 images at 112 px, minutes for a large batch). The grid is known from
    ``layer_shape(layer, input_hw)`` (one cached forward of one zero image)."""
    import ierf

    explainer = ierf.SRD(small_model)

    def no_decomposition(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batch was decomposed before its positions were checked")

    explainer.decompose = no_decomposition  # type: ignore[method-assign]
    with pytest.raises((TypeError, ValueError), match="position"):
        explainer.ierf(torch.randn(2, 3, 16, 16), explainer.layers[0], positions)


def test_maps_attached_to_autograd_are_drawn(small_model: nn.Module) -> None:
    """SRD's maps of an input that requires grad come back attached to autograd (for attacks): the viz helpers
    failed on them with "Can't call numpy() on Tensor that requires grad"."""
    import ierf

    explainer = ierf.SRD(small_model)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    signed = explainer.saliency(x, 1)
    assert signed.requires_grad
    image = np.full((16, 16, 3), 128, np.uint8)
    assert overlay_signed(image, signed[0]).size[0] == 16
    assert render_ierf(image, signed[0].abs()).size[0] == 16
