"""Contrast classes as a batch user passes them: one per image, as targets are, and checked before the work."""

from __future__ import annotations

import ierf
import numpy as np
import pytest
import torch
from srd_nets import TinyResNet, randomise_bn


def _model_and_x() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomise_bn(TinyResNet()).double()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


def test_contrast_takes_one_class_per_image_as_target_does() -> None:
    """Targets take a (B,) LongTensor, one class per image; a contrast class did not: contrast=torch.tensor([3, 0])
    (each image minus its own runner-up, the usual batch use) was refused with "contrast must be 'identity',
    'mean' or a class index, got tensor([3, 0])". Each image's map must be its own target minus its own contrast
    class: the per-image maps of single-class calls, summing to that image's logit gap."""
    model, x = _model_and_x()
    dec = ierf.SRD(model).decompose(x)
    target, other = torch.tensor([1, 2]), torch.tensor([3, 0])
    got = dec.relevance(target, contrast=other)
    for b in range(2):
        expected = dec.relevance(int(target[b]), contrast=int(other[b]))[b]
        torch.testing.assert_close(got[b], expected, atol=1e-12, rtol=0)
    rows = torch.arange(2)
    gaps = dec.logits[rows, target] - dec.logits[rows, other]
    torch.testing.assert_close(got.sum((1, 2)), gaps, rtol=1e-9, atol=1e-12)


def test_a_one_element_contrast_tensor_is_a_class_index_as_a_target_is() -> None:
    """The README writes a target as torch.tensor([967]) for one image; the same spelling of a contrast class,
    contrast=torch.tensor([968]), was refused ("got tensor([968])") while tensor(968) and 968 were taken."""
    model, x = _model_and_x()
    dec = ierf.SRD(model).decompose(x[:1])
    got = dec.saliency(torch.tensor([1]), contrast=torch.tensor([3]))
    torch.testing.assert_close(got, dec.saliency(1, contrast=3), atol=0, rtol=0)


def test_a_numpy_contrast_array_is_refused_by_name_or_taken_per_image() -> None:
    """contrast=np.array([3, 0]) (classes picked with numpy, e.g. each image's runner-up from argsort) failed
    with numpy's own "The truth value of an array with more than one element is ambiguous", which names
    neither the argument nor what is accepted. Either take it like a (B,) tensor or say it is the contrast."""
    model, x = _model_and_x()
    dec = ierf.SRD(model).decompose(x)
    target = torch.tensor([1, 2])
    try:
        got = dec.relevance(target, contrast=np.array([3, 0]))
    except (TypeError, ValueError) as exc:
        assert "contrast" in str(exc), f"the refusal does not name the contrast: {exc}"
    else:
        expected = torch.stack([dec.relevance(1, contrast=3)[0], dec.relevance(2, contrast=0)[1]])
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("contrast", ["avg", 1, 7], ids=["unknown-rule", "equals-target", "out-of-range"])
def test_a_certainly_wrong_contrast_is_refused_before_the_decomposition(contrast: object) -> None:
    """``SRD.saliency`` refuses a wrong target before the decomposition ("seconds on a large batch") and
    ``SRD.ierf`` wrong positions, but a wrong contrast (a typo'd rule, the target's own class, a class past the
    count an earlier call saw) was refused only after decomposing the whole batch: 4-10 s for 8 ResNet18
    images at 160 px on two cores, to say "contrast must be 'identity', 'mean' or a class index"."""
    model, x = _model_and_x()
    explainer = ierf.SRD(model)
    explainer.saliency(x[:1], 0)  # the class count (5) is now known, as it is for target checks

    def no_decomposition(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batch was decomposed before its contrast was checked")

    explainer.decompose = no_decomposition  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="contrast"):
        explainer.saliency(x, 1, contrast=contrast)  # type: ignore[arg-type]


def test_per_image_contrast_classes_with_a_gradient_head() -> None:
    """The gradient starts (Grad-CAM, gradient x activation) take per-image contrast classes the same way."""
    model, x = _model_and_x()
    dec = ierf.SRD(model, head="grad_x_act").decompose(x)
    target, other = torch.tensor([1, 2]), torch.tensor([3, 0])
    got = dec.relevance(target, contrast=other)
    for b in range(2):
        torch.testing.assert_close(got[b], dec.relevance(int(target[b]), contrast=int(other[b]))[b], atol=1e-12, rtol=0)


def test_contrast_classes_are_checked_like_targets() -> None:
    """Wrong shapes, out-of-range classes and a class equal to its image's target are refused by name."""
    model, x = _model_and_x()
    dec = ierf.SRD(model).decompose(x)
    with pytest.raises(ValueError, match=r"contrast classes must have shape \(2,\), got \(3,\)"):
        dec.relevance(0, contrast=torch.tensor([1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"contrast class out of range: the model has 5 classes \(0\.\.4\), got \[1, 5\]"
    ):
        dec.relevance(0, contrast=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="contrast class 2 is the target of image 1"):
        dec.relevance(torch.tensor([1, 2]), contrast=torch.tensor([3, 2]))
    with pytest.raises(ValueError, match="contrast must be 'identity', 'mean' or a class index"):
        dec.relevance(0, contrast=np.array(["mean"]))
