"""Round 13 mutation testing: checks on the round's engine changes (per-image contrast classes, the shared class
check, early contrast refusals, target wording, the portrait resize) that no earlier test pinned down. Each test
here fails on a small mutant of the product code that the rest of the suite let through."""

from __future__ import annotations

import ierf
import numpy as np
import pytest
import torch
from srd_nets import TinyResNet, randomise_bn

K = 5  # TinyResNet's classes


def _model_and_x() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).double()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


@pytest.fixture(scope="module")
def dec():
    model, x = _model_and_x()
    return ierf.SRD(model).decompose(x)


def test_a_numpy_integer_contrast_array_is_taken_per_image(dec) -> None:
    """The decomposition converts an integer numpy array (each image's runner-up from argsort) to per-image
    classes; the review test also accepts a refusal, so dropping the conversion went unnoticed."""
    got = dec.relevance(torch.tensor([1, 2]), contrast=np.array([3, 0]))
    expected = dec.relevance(torch.tensor([1, 2]), contrast=torch.tensor([3, 0]))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("what", ["target", "contrast"])
def test_the_class_count_itself_is_out_of_range_for_an_int(dec, what: str) -> None:
    """An int class equal to the class count (5 of 0..4) is refused by name, for targets and contrast classes
    alike (an off-by-one in the shared check let it through to an IndexError deep in the head)."""
    kwargs = {"target": K} if what == "target" else {"target": 0, "contrast": K}
    with pytest.raises(ValueError, match=rf"{what}( class)? out of range: the model has {K} classes \(0\.\.{K - 1}\)"):
        dec.relevance(**kwargs)


@pytest.mark.parametrize("what", ["target", "contrast"])
def test_a_negative_class_in_a_tensor_is_refused_not_wrapped(dec, what: str) -> None:
    """-1 in a (B,) tensor is not "the last class": indexing the head with it would silently explain class 4."""
    classes = torch.tensor([3, -1])
    kwargs = {"target": classes} if what == "target" else {"target": torch.tensor([1, 2]), "contrast": classes}
    with pytest.raises(ValueError, match=rf"{what}( class)? out of range.*got \[3, -1\]"):
        dec.relevance(**kwargs)


@pytest.mark.parametrize("what", ["target", "contrast"])
def test_a_zero_dim_class_tensor_applies_to_every_image(dec, what: str) -> None:
    """torch.tensor(3) is one class for the whole batch, as the int 3 is (the docstring's "0-d / (B,)")."""
    if what == "target":
        got, expected = dec.relevance(torch.tensor(3)), dec.relevance(3)
    else:
        got, expected = dec.relevance(1, contrast=torch.tensor(3)), dec.relevance(1, contrast=3)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("what", ["target", "contrast"])
def test_a_float_class_tensor_is_refused_not_truncated(dec, what: str) -> None:
    """tensor([3.7, 0.2]) is not classes 3 and 0: floats are refused, not cast to long."""
    classes = torch.tensor([3.7, 0.2])
    kwargs = {"target": classes} if what == "target" else {"target": torch.tensor([1, 2]), "contrast": classes}
    with pytest.raises((TypeError, ValueError), match=what):
        dec.relevance(**kwargs)


def test_a_sparse_contrast_tensor_is_refused_by_name(dec) -> None:
    """The contrast tensor's values are read, so a sparse one is refused naming the contrast (as a target is)."""
    with pytest.raises(TypeError, match="contrast must be a dense tensor"):
        dec.relevance(torch.tensor([1, 2]), contrast=torch.tensor([3, 0]).to_sparse())


@pytest.mark.parametrize("contrast", [-1, K, None, 1.5], ids=["negative", "class-count", "none", "float"])
def test_more_certainly_wrong_contrasts_are_refused_before_the_decomposition(contrast: object) -> None:
    """``SRD._check_contrast_early`` promises: an unknown rule or a non-integer, a class out of the range an
    earlier call saw (the class count itself included), refused before decomposing the batch."""
    model, x = _model_and_x()
    explainer = ierf.SRD(model)
    explainer.saliency(x[:1], 0)  # the class count is now known

    def no_decomposition(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batch was decomposed before its contrast was checked")

    explainer.decompose = no_decomposition  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="contrast"):
        explainer.saliency(x, 1, contrast=contrast)  # type: ignore[arg-type]


def test_a_negative_tensor_target_is_refused_in_the_shared_wording() -> None:
    """Baselines and metrics word a negative target as SRD does ("target out of range"), tensors included."""
    from ierf.methods import resolve_target

    with pytest.raises(ValueError, match=r"target out of range: the model has classes 0 and up, got \[-1\]"):
        resolve_target(torch.tensor([-1]), 1)


# sha256[:16] of resize_crop's pixels on the images below, under each PIPELINE_VERSION (v1: 5d5f065's box-only
# resize; v2: portraits resized whole; v3: strips taller than 16:1 resized as a box again, which these images
# are not). Pillow-dependent: a Pillow that resamples differently moves them too, which is as much a reason to
# bump the version (the cached activations were made from other pixels).
_PIXELS_BY_VERSION = {1: "034f0d78a6c0a4eb", 2: "9e005527caa5a527", 3: "9e005527caa5a527"}


def test_pipeline_version_names_the_pixels_it_makes() -> None:
    """Cached activations are keyed by PIPELINE_VERSION: the portrait change moved pixels, so it had to bump the
    version; keeping the old number with the new pixels (or new pixels without a new number) fails here."""
    import hashlib

    from ierf.images import resize_crop
    from ierf.models.preprocessing import PIPELINE_VERSION

    digest = hashlib.sha256()
    images = [((180, 120), 128, 112), ((120, 180), 128, 112), ((150, 150), 128, 112), ((640, 427), 256, 224)]
    images.append(((640, 640), 342, 299))  # a square whose box offset rounds differently at 299
    for shape, resize, crop in images:
        image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
        digest.update(resize_crop(image, resize, crop).tobytes())
    assert _PIXELS_BY_VERSION.get(PIPELINE_VERSION) == digest.hexdigest()[:16], (
        f"PIPELINE_VERSION {PIPELINE_VERSION} with pixels {digest.hexdigest()[:16]}: bump the version when the "
        "pixels change (and record the new pair here)"
    )
