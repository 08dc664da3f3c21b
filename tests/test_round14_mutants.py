"""Round 14 mutation testing of the session's engine changes (7634b69..HEAD): each test pins a behaviour that
a mutant of the new code broke while every existing test still passed. Small CPU models; each test < 10 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


# ------------------------------------------------------------------------------ resize_crop, tall images
@pytest.mark.parametrize("aspect", [4, 16])
def test_portrait_images_up_to_16_to_1_keep_torchvisions_pixels(aspect: int) -> None:
    """WHOLE_RESIZE_MAX_PIXELS promises any photo's aspect ratio up to 16:1 (a 1:4 panorama standing up, a
    phone's long screenshot) the whole resize, hence torchvision's exact pixels; only strips taller than 16:1
    take the box path (one level off on ~45 % of the crop's pixels)."""
    import torchvision.transforms as T
    from ierf.images import demo_image, resize_crop
    from PIL import Image

    photo = Image.fromarray(np.ascontiguousarray(demo_image("chelsea").transpose(1, 0, 2)))
    tall = np.asarray(photo.resize((120, 120 * aspect), Image.Resampling.BICUBIC))
    ours = resize_crop(tall, 256, 224).astype(int)
    reference = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.fromarray(tall))).astype(int)
    differ = (np.abs(ours - reference).max(-1) > 0).mean()
    assert differ < 0.01, f"{differ:.1%} of a 1:{aspect} image's crop differs from torchvision's"


# ------------------------------------------------------------------------------------- BrokenModelError
def test_a_broken_model_is_still_a_value_error_for_in_process_callers() -> None:
    """errors.BrokenModelError: "A ValueError for in-process callers". A notebook loop that skips the images
    a model cannot explain (``except ValueError``) must keep working when the model's weights are NaN."""
    import ierf

    torch.manual_seed(0)  # unseeded, some draws left channel 0 dead: its NaN weight never reached the gradient
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    skipped = []
    for method in ("srd", "gradient"):
        try:
            ierf.create_explainer(method, model.eval()).saliency(torch.rand(1, 3, 16, 16), 0)
        except ValueError as exc:
            skipped.append(str(exc))
    assert len(skipped) == 2 and all("4.weight" in s for s in skipped), skipped


# ------------------------------------------------------------------------------------------ APOP's copy
def test_apop_does_not_call_the_callers_pre_hooks_on_its_private_copy() -> None:
    """APOP's deep copy drops the caller's hooks of every kind, forward pre-hooks included (a notebook's
    input-recording or input-normalising pre-hook would otherwise see, or change, APOP's replays)."""
    from ierf.fidelity.apop import apop_agreement

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()
    seen: list[int] = []
    handle = model[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    apop_agreement(model, torch.rand(2, 3, 8, 8))
    assert seen == [], f"the caller's forward pre-hook ran {len(seen)} times on APOP's copy"
    assert handle.id in model[2]._forward_pre_hooks  # the caller's own model keeps it


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


@pytest.mark.parametrize("method", ["srd", "gradient"])
def test_a_nan_batch_norm_statistic_is_a_broken_model_named_by_its_buffer(method: str) -> None:
    """A diverged fine-tune leaves NaN in batch norm's running statistics as often as in its weights: the
    buffer is named and the model is broken (a server's INTERNAL), not the input's overflow."""
    import ierf
    from ierf.errors import BrokenModelError

    model = _bn_net()
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
    with pytest.raises(BrokenModelError, match=r"non-finite values in 1\.running_var"):
        ierf.create_explainer(method, model).saliency(torch.rand(1, 3, 8, 8), 0)


# ------------------------------------------------------------------------------------- PIPELINE_VERSION
# sha256[:16] of resize_crop(256, 224) of a 100x2000 (1:20) noise strip under each PIPELINE_VERSION: v2 resized
# it whole, v3 resamples a box of rows (strips over 16:1). Pillow-dependent, as test_round13_mutants's pins.
_STRIP_PIXELS_BY_VERSION = {2: "7cf5cfa77fa2a90c", 3: "4da5ce4e266f9ffc"}


def test_pipeline_version_names_the_pixels_it_makes_for_a_strip_over_16_to_1() -> None:
    """Cached activations are keyed by PIPELINE_VERSION. v3 changed the pixels of strips taller than 16:1 (60 %
    of this strip's crop moved by a level); keeping version 2 would serve activations cached from v2's pixels
    for them. The round-13 pin holds only images that v2 and v3 resize alike."""
    import hashlib

    from ierf.images import resize_crop
    from ierf.models.preprocessing import PIPELINE_VERSION

    strip = np.random.default_rng(20).integers(0, 256, (2000, 100, 3), dtype=np.uint8)
    digest = hashlib.sha256(resize_crop(strip, 256, 224).tobytes()).hexdigest()[:16]
    assert _STRIP_PIXELS_BY_VERSION.get(PIPELINE_VERSION) == digest, (
        f"PIPELINE_VERSION {PIPELINE_VERSION} with strip pixels {digest}: bump the version when pixels change"
    )


# ------------------------------------------------------------------------------ SRD's follow-up of the model
def test_a_second_model_sharing_the_backbone_sees_its_moved_running_statistics() -> None:
    """The folds are cached per tensor, process-wide; the record of "statistics last seen" is per model. A
    multi-task notebook explains one head, fine-tunes (train-mode forwards move the shared backbone's batch
    norm statistics in place), then explains another model object over the same backbone for the first time:
    its maps must sum to its current logits, not to those of the statistics the first model's folds were made
    with."""
    import ierf
    from test_captum_migration import _bn_net, _update_running_stats

    first, x = _bn_net(), torch.randn(2, 3, 12, 12)
    ierf.SRD(first).saliency(x, 1)  # folds made from the statistics as they are now
    second = nn.Sequential(*first)  # the same modules, another container (a second head's model)
    _update_running_stats(first)
    with torch.no_grad():
        logits = second(x)
    sums = ierf.SRD(second).saliency(x, 1).sum((1, 2))
    torch.testing.assert_close(sums, logits[:, 1], rtol=1e-4, atol=1e-5)


def test_early_target_check_follows_a_head_grown_through_param_data() -> None:
    """The early out-of-range check remembers the class count with the parameters' identities and shapes: a
    head grown in place through ``param.data`` (same Parameter objects; clear_derived_cache() as documented)
    has more classes, and a target past the old count is explained, not refused."""
    import ierf
    from ierf.srd.derived import clear_derived_cache

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    explainer, x = ierf.SRD(model), torch.randn(2, 3, 8, 8)
    explainer.saliency(x, 1)
    head = model[4]
    head.weight.data = torch.cat([head.weight.data, torch.randn(5, 8)])
    head.bias.data = torch.cat([head.bias.data, torch.randn(5)])
    head.out_features = 10
    clear_derived_cache()
    with torch.no_grad():
        logits = model(x)
    sums = explainer.saliency(x, 7).sum((1, 2))
    torch.testing.assert_close(sums, logits[:, 7], rtol=1e-4, atol=1e-5)
