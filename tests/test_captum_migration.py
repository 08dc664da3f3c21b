"""A Captum/Zennit user's notebook habits against the engine API: fine-tuning then explaining in one process,
running metrics inside a caller's ``torch.no_grad()``, and the same refusals as the methods."""

from __future__ import annotations

import ierf
import pytest
import torch
from torch import nn


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _update_running_stats(model: nn.Module) -> None:
    """What a fine-tuning loop with a frozen backbone (affine weights untouched), BN recalibration, or a
    forgotten model.train() does: batch-norm running statistics move in place, nothing else changes."""
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 12, 12) * 4 + 2)
    model.eval()


def test_maps_follow_batch_norm_running_statistics_updated_by_a_train_mode_forward():
    """PyTorch's batch_norm kernel updates running_mean/running_var in place without bumping their version
    counters, so the folded batch norm cached per parameter outlived the change: the next map summed to the
    old logit (conservation broken silently), not the model's current one."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model)
    explainer.saliency(x, 1)  # caches the folded batch norms
    _update_running_stats(model)
    with torch.no_grad():
        logits = model(x)
    sums = explainer.saliency(x, 1).sum((1, 2))
    torch.testing.assert_close(sums, logits[:, 1], rtol=1e-4, atol=1e-5)


def test_a_new_explainer_after_running_statistics_moved_is_not_refused_as_an_in_place_model():
    """The stale cache is process-wide: even ``ierf.SRD(model)`` built afresh after the update reused the old
    fold, and its first call raised UnsupportedModelError blaming an in-place operation the model does not
    have. Building a new explainer must be enough (clear_derived_cache is documented for .data writes only)."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    ierf.SRD(model).saliency(x, 1)
    _update_running_stats(model)
    with torch.no_grad():
        logits = model(x)
    sums = ierf.SRD(model).saliency(x, 1).sum((1, 2))
    torch.testing.assert_close(sums, logits[:, 1], rtol=1e-4, atol=1e-5)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).eval()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_manipulation_attack_runs_inside_a_callers_no_grad_or_inference_mode(mode):
    """Notebooks wrap evaluation cells in torch.no_grad() (Captum's attribute() and every ierf explainer work
    there, README: "defined by a backward pass"). The attack's own Adam loop then died with autograd's
    "element 0 of tensors does not require grad", which names nothing the caller did."""
    from ierf.methods import create_explainer
    from ierf.metrics import manipulation_attack

    model, x = _tiny_net(), torch.rand(2, 3, 8, 8)
    target = torch.tensor([1, 2])
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        result = manipulation_attack(
            lambda m: create_explainer("gradient", m).differentiable_saliency,
            create_explainer("gradient", model).saliency,
            model,
            x,
            target,
            torch.rand(2, 8, 8) + 0.1,
            epsilon=0.05,
            bounds=(0.0, 1.0),
            steps=2,
        )
    assert result.maps_after.shape == (2, 8, 8)
    assert float(result.linf.max()) <= 0.05 + 1e-6


@pytest.mark.parametrize("wrap", ["DataParallel", "TorchScript"])
def test_lrp_refuses_wrapped_models_with_the_way_round_as_srd_does(wrap):
    """SRD refuses a DataParallel or TorchScript model saying what to pass instead (README: "refused with the
    way round"), and gradient, Grad-CAM & co. explain a DataParallel as it is. LRP failed with torch.fx's
    "Proxy object cannot be iterated" (DataParallel) or autograd's "you can only change requires_grad flags
    of leaf variables" (TorchScript): neither says that the fix is to pass ``.module`` / the eager model."""
    from ierf.errors import UnsupportedModelError
    from ierf.methods import create_explainer

    model = _bn_net()  # batch norms: LRP's canonizer traces the model to check its merges
    wrapped = nn.DataParallel(model) if wrap == "DataParallel" else torch.jit.script(model)
    x = torch.randn(2, 3, 12, 12)
    try:
        maps = create_explainer("lrp", wrapped).saliency(x, 1)
    except UnsupportedModelError as exc:
        message = str(exc)
        assert wrap in message or ("TorchScript" in message and wrap == "TorchScript"), message
        assert ".module" in message or "eager" in message, message
    else:
        torch.testing.assert_close(maps, create_explainer("lrp", model).saliency(x, 1))


def test_apop_does_not_call_the_callers_forward_hooks_on_its_private_copy():
    """APOP says it hooks "a private deep copy of the model (the caller's model is never touched)", but
    deepcopy copies the caller's own hooks too: a notebook's activation-recording hook received APOP's
    replayed (counterfactual zeros/noise) activations, 8 extra entries for a batch of two. The copy should
    drop the caller's hooks, or APOP should refuse a hooked model as SRD does."""
    from ierf.fidelity.apop import apop_agreement

    model = _tiny_net()
    recorded: list[torch.Tensor] = []
    handle = model[1].register_forward_hook(lambda m, i, o: recorded.append(o.detach()))
    try:
        apop_agreement(model, torch.rand(2, 3, 8, 8))
    except ValueError as exc:  # a refusal naming the hook is acceptable too
        assert "hook" in str(exc), str(exc)
    assert recorded == [], f"the caller's hook ran {len(recorded)} times on APOP's copy"
    assert len(model[1]._forward_hooks) == 1 and handle.id in model[1]._forward_hooks


class _LogitsAndFeatures(nn.Module):
    """A notebook model that also returns its features (or torchvision's GoogLeNet/Inception outputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fc(self.pool(h).flatten(1)), h


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "gradcam", "lrp"])
def test_baselines_refuse_a_model_returning_a_tuple_by_name_as_srd_does(method):
    """SRD says "the model must return one logits tensor, got tuple"; every baseline died with
    AttributeError "'tuple' object has no attribute 'dim'" from its logits check (check_target_range),
    which names neither the model's output nor what to do. The same bad model deserves the same precise
    refusal (a ValueError or TypeError naming the tuple) from every method."""
    from ierf.methods import create_explainer

    model = _LogitsAndFeatures().eval()
    with pytest.raises((ValueError, TypeError), match="tuple"):
        create_explainer(method, model).saliency(torch.randn(2, 3, 8, 8), 1)


def test_early_target_check_does_not_use_a_class_count_the_model_no_longer_has():
    """SRD.saliency refuses a target past "the class count an earlier call saw" before decomposing. After a
    class-incremental head surgery (new fc Parameters with more rows, no module replaced, so the explainer
    stays valid), saliency(x, 7) was refused with "the model has 5 classes" although the model returns 10
    logits, while decompose(x).saliency(7) on the same explainer worked."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    ).eval()
    explainer, x = ierf.SRD(model), torch.randn(2, 3, 8, 8)
    explainer.saliency(x, 1)
    head = model[4]
    with torch.no_grad():
        head.weight = nn.Parameter(torch.cat([head.weight, torch.randn(5, 8)]))
        head.bias = nn.Parameter(torch.cat([head.bias, torch.randn(5)]))
    head.out_features = 10
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    sums = explainer.saliency(x, 7).sum((1, 2))
    torch.testing.assert_close(sums, logits[:, 7], rtol=1e-4, atol=1e-5)


def test_smoothgrad_draws_the_same_noise_for_a_float64_copy_of_the_model():
    """README: "explain a float64 copy when exactness matters". Every method's map of a float64 copy agrees
    with the float32 one to ~1e-7 except SmoothGrad, which differed by ~34 % of its peak: its private
    generator draws ``randn(dtype=x.dtype)``, and float64 draws a different sequence from the same seed, so
    the float64 map averages other noise (float16 and bfloat16 draw the float32 sequence). Drawing the
    noise in float32 and casting it would make the seed mean the same samples in every dtype."""
    import copy

    from ierf.methods import create_explainer

    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    single = create_explainer("smoothgrad", model).saliency(x, 1)
    double = create_explainer("smoothgrad", copy.deepcopy(model).double()).saliency(x.double(), 1)
    assert float((double - single).abs().max() / single.abs().max()) < 1e-4
