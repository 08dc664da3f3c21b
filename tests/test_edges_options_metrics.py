"""Edge cases of the explainers' options and of the metrics a notebook user hits: settings read from numpy
arrays, LRP's epsilon, the metrics' seed and blur settings, and max-sensitivity's per-image answer under
batching (the project already keeps SmoothGrad's noise independent of the batch for that reason)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from ierf import create_explainer
from ierf.metrics import gaussian_blur, insertion_deletion, max_sensitivity, pixel_ranking
from torch import nn


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


def _explain(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A deterministic, nonlinear per-image 'explainer': image i's map depends on image i only."""
    return (x.sum(1) ** 2) * (1.0 + target.view(-1, 1, 1).to(x.dtype))


def test_max_sensitivity_per_image_does_not_depend_on_the_batch() -> None:
    """Image i's max-sensitivity must be the same whether it is scored alone or in a batch (as maps,
    insertion/deletion and SmoothGrad are): the noise is drawn for the whole batch shape from one generator,
    so image 0's noise, hence its score, changes with the batch size (0.54 vs 0.61 on a random ResNet18's
    gradient maps), and the benchmark's MaxSens column changes with its subset size."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 1, 2])
    batch = max_sensitivity(_explain, x, t, n_samples=3)
    alone = torch.cat([max_sensitivity(_explain, x[i : i + 1], t[i : i + 1], n_samples=3) for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "error"),
    [(float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError), ("1e-6", TypeError)],
)
def test_lrp_epsilon_is_checked_when_built(resnet, value, error) -> None:
    """LRP takes epsilon unchecked: NaN is only noticed at the first map, blamed on the input ("an overflow
    for this input"); a string fails inside Zennit ("Value 1e-6 is not a valid stabilizer!"), and a negative
    one is silently used. The other baselines check their settings when built, naming them."""
    with pytest.raises(error, match="epsilon"):
        create_explainer("lrp", resnet, epsilon=value)


def test_integer_settings_accept_numpy_integers(resnet) -> None:
    """Targets accept numpy integers ("labels read from arrays"); the integer settings refuse them with a
    self-contradicting message ("n_steps must be an integer >= 1, got np.int64(4)")."""
    create_explainer("integrated_gradients", resnet, n_steps=np.int64(4), internal_batch_size=np.int64(8))
    create_explainer("smoothgrad", resnet, n_samples=np.int64(2), seed=np.int64(1))
    x, maps = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8)
    curves = insertion_deletion(_tiny(), x, 0, maps, n_steps=np.int64(2), batch_size=np.int64(4))
    assert curves.deletion.shape == (1, 3)


@pytest.mark.parametrize("seed", [1.5, None, "0"])
def test_insertion_deletion_refuses_a_bad_seed_by_name(seed) -> None:
    """A non-integer seed fails inside torch ("RuntimeError: manual_seed expected a long, but got float"),
    naming no argument; SmoothGrad refuses the same value by name."""
    x, maps = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8)
    with pytest.raises((TypeError, ValueError), match="seed"):
        insertion_deletion(_tiny(), x, 0, maps, n_steps=2, seed=seed)


def test_max_sensitivity_refuses_a_bad_seed_by_name() -> None:
    """Same for max_sensitivity: seed=1.5 is a RuntimeError from torch.Generator.manual_seed."""
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises((TypeError, ValueError), match="seed"):
        max_sensitivity(_explain, x, 0, n_samples=1, seed=1.5)


def test_insertion_deletion_refuses_infinite_blur_fraction() -> None:
    """blur_fraction=inf passes the "> 0" check and crashes in gaussian_blur with "OverflowError: cannot convert
    float infinity to integer"; NaN is refused by name, infinity should be too."""
    x, maps = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="blur_fraction"):
        insertion_deletion(_tiny(), x, 0, maps, n_steps=2, blur_fraction=float("inf"))


@pytest.mark.parametrize("relu", ["no", "false", 1, 0])
def test_cam_relu_flag_must_be_a_bool(resnet, relu) -> None:
    """relu="no" or "false" is truthy and silently turns the ReLU on; the flag should be a bool (or None)."""
    with pytest.raises(TypeError, match="relu"):
        create_explainer("gradcam", resnet, relu=relu)


@pytest.mark.parametrize("value", [True, np.bool_(True), 0, float("nan")])
def test_lrp_epsilon_refuses_bools_and_non_positive_values(resnet, value) -> None:
    """True is not read as 1 (the other settings refuse bools too); 0 leaves LRP's denominators unstabilised."""
    with pytest.raises((TypeError, ValueError), match="epsilon"):
        create_explainer("lrp", resnet, epsilon=value)


@pytest.mark.parametrize("value", [np.bool_(True), True, np.float64(2.0)])
def test_integer_settings_still_refuse_bools_and_floats(value) -> None:
    x, maps = torch.randn(1, 3, 8, 8), torch.randn(1, 8, 8)
    with pytest.raises(ValueError, match="n_steps must be an integer"):
        insertion_deletion(_tiny(), x, 0, maps, n_steps=value)


def test_a_numpy_seed_gives_the_same_draws_as_the_python_one() -> None:
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0, 1])
    numpy_seed = max_sensitivity(_explain, x, t, n_samples=2, seed=np.int64(4))
    assert torch.equal(numpy_seed, max_sensitivity(_explain, x, t, n_samples=2, seed=4))


@pytest.mark.parametrize(
    ("x", "sigma", "error", "match"),
    [
        (torch.rand(1, 3, 8, 8), float("nan"), ValueError, "sigma must be finite"),
        (torch.rand(1, 3, 8, 8), float("inf"), ValueError, "sigma must be finite"),
        (torch.rand(1, 3, 8, 8), -1.0, ValueError, "sigma must be finite and >= 0"),
        (torch.rand(1, 3, 8, 8), "2", TypeError, "sigma must be a number"),
        (torch.rand(3, 8, 8), 1.0, ValueError, r"x must be a floating \(B, C, H, W\) tensor, got \(3, 8, 8\)"),
        (torch.ones(1, 3, 8, 8, dtype=torch.uint8), 1.0, ValueError, "x must be a floating"),
        ([[0.0]], 1.0, TypeError, "x must be a torch.Tensor, got list"),
    ],
)
def test_gaussian_blur_refuses_bad_arguments_by_name(x, sigma, error, match) -> None:
    """Public: NaN failed in int() ("cannot convert float NaN to integer"), a 3-D input deep in conv2d."""
    with pytest.raises(error, match=match):
        gaussian_blur(x, sigma)


def test_gaussian_blur_sigma_zero_is_a_copy() -> None:
    x = torch.rand(1, 3, 8, 8)
    out = gaussian_blur(x, 0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_pixel_ranking_refuses_nan_maps_and_bad_seeds() -> None:
    """Public: a NaN pixel was silently ranked last (insertion_deletion checks its maps; this did not)."""
    maps = torch.rand(1, 4, 4)
    maps[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pixel_ranking(maps)
    with pytest.raises(ValueError, match="seed"):
        pixel_ranking(torch.rand(1, 4, 4), seed=0.5)


@pytest.mark.parametrize("relu", [True, False, None])
def test_cam_relu_flag_takes_bools_and_none(resnet, relu) -> None:
    explainer = create_explainer("gradcam", resnet, relu=relu)
    assert explainer.relu is (True if relu is None else relu)


def test_integer_settings_are_kept_as_python_ints(resnet) -> None:
    """A numpy count is stored as a plain int: settings are read back, printed and serialised (json refuses
    np.int64)."""
    explainer = create_explainer("integrated_gradients", resnet, n_steps=np.int64(4), internal_batch_size=np.int32(8))
    assert type(explainer.n_steps) is int and type(explainer.internal_batch_size) is int
    assert type(create_explainer("smoothgrad", resnet, seed=np.int64(3)).seed) is int


def test_seeds_take_torchs_whole_range() -> None:
    """torch.Generator.manual_seed takes [-2**63, 2**64): both ends work, one past either is refused."""
    x = torch.randn(1, 3, 8, 8)
    for seed in (-(2**63), 2**64 - 1):
        assert torch.isfinite(max_sensitivity(_explain, x, 0, n_samples=1, seed=seed)).all()
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            max_sensitivity(_explain, x, 0, n_samples=1, seed=seed)


def test_max_sensitivity_perturbs_in_the_inputs_dtype() -> None:
    """The noise is drawn in float32 and added in the input's own dtype: a float16 input stays float16 (a
    float32 sum would hand a half model an input of another dtype, which every explainer refuses)."""
    dtypes: list[torch.dtype] = []

    def explain(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtypes.append(x.dtype)
        return x.float().sum(1) + 1.0

    max_sensitivity(explain, torch.rand(2, 3, 8, 8).half(), torch.tensor([0, 0]), n_samples=2)
    assert dtypes == [torch.float16] * 3
