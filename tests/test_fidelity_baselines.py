"""Baseline explainers: the shared contract, the one map rule, cross-checks with the libraries, and
the promise that the caller's model is left exactly as found (also after exceptions)."""

from __future__ import annotations

import contextlib
import copy

import ierf
import numpy as np
import pytest
import torch
import torchvision
from ierf.baselines import BASELINE_METHODS
from ierf.baselines._common import model_guard
from ierf.baselines.lrp import EfficientNetLiteCanonizer, canonizers_for
from ierf.fidelity.tiny_resnet import random_tiny_resnet
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from zennit.attribution import Gradient as ZennitGradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    m = random_tiny_resnet(seed=3)
    with torch.no_grad():  # non-trivial BN statistics so merges and folds are exercised
        gen = torch.Generator().manual_seed(4)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
    return m


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))


def snapshot(m: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in m.state_dict().items()},
        "training": [mod.training for mod in m.modules()],
        "requires_grad": [p.requires_grad for p in m.parameters()],
        "grads": [p.grad for p in m.parameters()],
        "hooks": [len(getattr(mod, d)) for mod in m.modules() for d in HOOK_DICTS],
        "forwards": [("forward" in mod.__dict__) for mod in m.modules()],
        "n_modules": len(list(m.modules())),
    }


def assert_untouched(m: nn.Module, before: dict) -> None:
    after = snapshot(m)
    assert after["n_modules"] == before["n_modules"]
    for key in ("training", "requires_grad", "hooks", "forwards"):
        assert after[key] == before[key], key
    assert all(a is b for a, b in zip(after["grads"], before["grads"], strict=True))
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


@pytest.mark.parametrize("method", ["srd", *BASELINE_METHODS])
def test_inputs_made_under_inference_mode_give_the_same_map(method: str, model: nn.Module, x: torch.Tensor) -> None:
    """Servers build inputs under ``torch.inference_mode``; every method must accept them unchanged."""
    explainer = ierf.create_explainer(method, model)
    with torch.inference_mode():
        frozen = x.clone()
    torch.testing.assert_close(explainer.saliency(frozen, 2), explainer.saliency(x, 2), rtol=1e-4, atol=1e-6)


def test_all_baselines_registered() -> None:
    assert set(BASELINE_METHODS) <= set(ierf.available_methods())
    assert "srd" in ierf.available_methods()


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_contract_shape_dtype_and_model_untouched(method: str, model: nn.Module, x: torch.Tensor) -> None:
    model.train()  # a caller's training flags survive (explanations run in eval mode)
    model.layer1.eval()
    before = snapshot(model)
    explainer = ierf.create_explainer(method, model)
    maps = explainer.saliency(x, torch.tensor([1, 7]))
    assert maps.shape == (2, 48, 40)
    assert maps.dtype == torch.float32
    assert not maps.requires_grad
    assert torch.isfinite(maps).all()
    assert maps.abs().sum() > 0
    assert_untouched(model, before)
    model.eval()
    # the same class for every image: int and 0-d tensor targets agree
    torch.testing.assert_close(explainer.saliency(x, 4), explainer.saliency(x, torch.tensor(4)))


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_per_image_targets_match_single_image_calls(method: str, model: nn.Module, x: torch.Tensor) -> None:
    explainer = ierf.create_explainer(method, model)
    both = explainer.saliency(x, torch.tensor([2, 5]))
    first = explainer.saliency(x[:1], 2)
    second = explainer.saliency(x[1:], 5)
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_bad_calls_raise_and_leave_no_trace(method: str, model: nn.Module, x: torch.Tensor) -> None:
    before = snapshot(model)
    explainer = ierf.create_explainer(method, model)
    with pytest.raises(ValueError, match="out of range"):
        explainer.saliency(x, 10)  # 10 classes: 0..9
    with pytest.raises(ValueError, match="the model has classes 0 and up, got -1"):
        explainer.saliency(x, -1)
    with pytest.raises(ValueError, match="shape"):
        explainer.saliency(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        explainer.saliency(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="bool"):
        explainer.saliency(x, True)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explainer.saliency(x[0], 1)
    with pytest.raises(TypeError, match="floating"):
        explainer.saliency(x.to(torch.int64), 1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        explainer.saliency(x.numpy(), 1)
    with pytest.raises(ValueError, match="NaN"):
        explainer.saliency(torch.full_like(x, float("nan")), 1)
    assert_untouched(model, before)


def test_model_guard_restores_after_an_exception_mid_call(model: nn.Module) -> None:
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), model_guard(model):
        model.layer2.register_forward_hook(lambda *a: None)  # a library forgetting its hook
        model.train()
        raise RuntimeError("boom")
    assert_untouched(model, before)


def test_model_guard_keeps_gradients_written_meanwhile(model: nn.Module) -> None:
    """Parameters are not the guard's: a training step that another thread's backward writes during an
    explanation stays (the methods' own gradients never reach ``.grad``: the per-method tests above)."""
    with model_guard(model):
        assert all(p.requires_grad for p in model.parameters())
        model.fc.weight.grad = torch.ones_like(model.fc.weight)
    try:
        assert model.fc.weight.grad is not None and bool((model.fc.weight.grad == 1).all())
    finally:
        model.fc.weight.grad = None


def test_gradient_family_collapse_rule(model: nn.Module, x: torch.Tensor) -> None:
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(logits[:, 3].sum(), xg)
    torch.testing.assert_close(ierf.create_explainer("gradient", model).saliency(x, 3), grad.sum(1))
    torch.testing.assert_close(ierf.create_explainer("input_x_gradient", model).saliency(x, 3), (x * grad).sum(1))
    ig = ierf.create_explainer("integrated_gradients", model, n_steps=64).saliency(x, 3)
    with torch.no_grad():  # completeness: IG sums to f(x) - f(0)
        gap = model(x)[:, 3] - model(torch.zeros_like(x))[:, 3]
    torch.testing.assert_close(ig.sum((1, 2)), gap, atol=2e-3 * float(gap.abs().max()) + 1e-4, rtol=1e-2)


def test_smoothgrad_is_the_mean_signed_gradient_over_noised_copies(model: nn.Module, x: torch.Tensor) -> None:
    """Values, not only shapes: a linear model's gradient is the same at every noised copy, so the mean
    (signed, not absolute, not summed) equals it exactly; on the ResNet a vanishing noise level gives the
    plain gradient, the documented 15 % gives a different map, and the seed alone decides the noise."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 48 * 40, 10)).eval()
    torch.nn.init.normal_(linear[1].weight, generator=torch.Generator().manual_seed(5))
    expected = linear[1].weight[3].detach().reshape(3, 48, 40).sum(0).expand(2, 48, 40)
    torch.testing.assert_close(ierf.create_explainer("smoothgrad", linear).saliency(x, 3), expected)

    gradient = ierf.create_explainer("gradient", model).saliency(x, 3)
    quiet = ierf.create_explainer("smoothgrad", model, noise_level=1e-7).saliency(x, 3)
    torch.testing.assert_close(quiet, gradient, rtol=1e-3, atol=1e-3 * float(gradient.abs().max()))
    noisy = ierf.create_explainer("smoothgrad", model).saliency(x, 3)
    assert float((noisy - gradient).abs().max()) > 0.05 * float(gradient.abs().max())
    torch.testing.assert_close(ierf.create_explainer("smoothgrad", model).saliency(x, 3), noisy, rtol=0, atol=0)
    reseeded = ierf.create_explainer("smoothgrad", model, seed=1).saliency(x, 3)
    assert not torch.equal(reseeded, noisy)


def test_differentiable_paths_equal_the_library_paths(model: nn.Module, x: torch.Tensor) -> None:
    for method in ("gradient", "input_x_gradient", "gradcam"):  # LRP offers none (test_fidelity_review)
        explainer = ierf.create_explainer(method, model)
        xg = x.clone().requires_grad_(True)
        diff = explainer.differentiable_saliency(xg, torch.tensor([1, 7]))
        assert diff.requires_grad, method
        torch.testing.assert_close(diff.detach(), explainer.saliency(x, torch.tensor([1, 7])), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "library_cam", "layer"),
    [
        ("gradcam", GradCAM, None),
        ("gradcam", GradCAM, "layer2"),
        ("gradcam_plusplus", GradCAMPlusPlus, None),
        ("layercam", LayerCAM, None),
        ("hirescam", HiResCAM, None),
    ],
)
def test_cams_match_pytorch_grad_cam_up_to_its_normalisation(model: nn.Module, method, library_cam, layer) -> None:
    """pytorch-grad-cam applies a ReLU at the feature map's resolution to every CAM, then min-max scales:
    HiResCAM, signed by definition, is compared with relu=True; the layer option picks the same map."""
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with library_cam(model=copy.deepcopy(model), target_layers=[]) as _:
        pass
    reference_model = copy.deepcopy(model)
    target_layer = reference_model.get_submodule(layer or "layer4")
    with library_cam(model=reference_model, target_layers=[target_layer]) as cam:
        library = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in (0, 4, 9)])
    options = {"relu": True} | ({"layer": layer} if layer else {})
    ours = ierf.create_explainer(method, model, **options).saliency(x, torch.tensor([0, 4, 9])).numpy()
    for a, b in zip(library, ours, strict=True):
        if not a.any():  # every position negative before the ReLU: nothing to correlate
            assert not b.any()
            continue
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
        assert np.unravel_index(a.argmax(), a.shape) == np.unravel_index(b.argmax(), b.shape)
    assert sum(a.any() for a in library) >= 2  # most targets have a map to compare


def test_cam_relu_follows_each_method_definition(model: nn.Module, x: torch.Tensor) -> None:
    assert (ierf.create_explainer("gradcam", model).saliency(x, 1) >= 0).all()
    assert (ierf.create_explainer("layercam", model).saliency(x, 1) >= 0).all()
    raw = ierf.create_explainer("gradcam", model, relu=False).saliency(x, 1)
    hires = ierf.create_explainer("hirescam", model).saliency(x, 1)
    assert (raw < 0).any() and (hires < 0).any()  # signed where the method (or the caller) says so
    with pytest.raises(ValueError, match="no module named 'nope'"):
        ierf.create_explainer("gradcam", model, layer="nope")
    layer3 = ierf.create_explainer("gradcam", model, layer="layer2").saliency(x, 1)
    assert layer3.shape == (2, 48, 40)


def test_lrp_equals_zennit_used_directly(model: nn.Module, x: torch.Tensor) -> None:
    """Zennit with its own ResNetCanonizer, whose BN merge leaves x / sqrt(1 + eps): ours merges exactly,
    so the maps agree to that factor's order (eps = 1e-5 per BN), not bit for bit."""
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(False)
    target = torch.tensor([1, 7])
    with ZennitGradient(reference, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), torch.eye(10)[target])
    ours = ierf.create_explainer("lrp", model).saliency(x, target)
    torch.testing.assert_close(ours, relevance.sum(1), rtol=1e-3, atol=1e-4 * float(ours.abs().max()))


@pytest.mark.parametrize("architecture", ["tiny_resnet", "vgg11_bn"])
def test_lrp_bn_merge_keeps_the_models_function_exactly(architecture: str, model: nn.Module) -> None:
    """Zennit's merge left each BN computing x / sqrt(1 + eps): ResNet18's logits moved by ~1e-4. Checked to
    1e-5 of the largest logit: the merged float32 convolution rounds in another order (a vgg11_bn drew 1.3e-6
    off on a 0.18 logit, past an absolute 1e-6, with some initial weights)."""
    import torchvision
    from zennit.core import collect_leaves  # noqa: F401  (Zennit present: the canonizers below use it)

    torch.manual_seed(0)  # the vgg's initial weights: the same whatever ran before
    net = copy.deepcopy(model) if architecture == "tiny_resnet" else torchvision.models.vgg11_bn(num_classes=10)
    net.eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.1)
    xin = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(xin)
    instances = [i for c in canonizers_for(net) for i in c.apply(net)]
    try:
        with torch.no_grad():
            torch.testing.assert_close(net(xin), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    finally:
        for instance in instances:
            instance.remove()


def test_lrp_follows_changes_to_the_callers_model(model: nn.Module, x: torch.Tensor) -> None:
    """The explainer's private copy was taken once: new weights in the caller's model were ignored."""
    net = copy.deepcopy(model)
    explainer = ierf.create_explainer("lrp", net)
    before = explainer.saliency(x, 1)
    with torch.no_grad():
        net.fc.weight.mul_(-2.0)  # in place, as an optimiser step or load_state_dict does
    after = explainer.saliency(x, 1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ierf.create_explainer("lrp", net).saliency(x, 1))
    net.fc = nn.Linear(net.fc.in_features, 10)  # a replaced module
    torch.testing.assert_close(explainer.saliency(x, 1), ierf.create_explainer("lrp", net).saliency(x, 1))


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_a_callers_no_grad_or_inference_mode_changes_nothing(method: str, model: nn.Module, x: torch.Tensor) -> None:
    """Under torch.no_grad() the CAMs and LRP failed ("element 0 of tensors does not require grad"), and
    under torch.inference_mode() every baseline did."""
    explainer = ierf.create_explainer(method, model)
    expected = explainer.saliency(x, 1)
    with torch.no_grad():
        torch.testing.assert_close(explainer.saliency(x, 1), expected)
    with torch.inference_mode():
        torch.testing.assert_close(explainer.saliency(x, 1), expected)


def test_lrp_efficientnet_canonizer_merges_and_restores() -> None:
    from ierf.models import load_model

    module = load_model("efficientnet_lite0").module
    assert isinstance(canonizers_for(module)[0], EfficientNetLiteCanonizer)
    private = copy.deepcopy(module)
    state = {k: v.clone() for k, v in private.state_dict().items()}
    instances = EfficientNetLiteCanonizer().apply(private)
    try:
        n_sums = sum(1 for m in private.modules() if type(m).__name__ == "Sum")
        merged_bns = [m for m in private.modules() if isinstance(m, nn.BatchNorm2d) and bool((m.weight == 1).all())]
        skips = sum(
            1
            for b in module._blocks
            if b._block_args.id_skip
            and b._block_args.stride == 1
            and b._block_args.input_filters == b._block_args.output_filters
        )
        assert n_sums == len(module._blocks) and skips > 0  # every block gets the Sum; skip blocks use it
        assert len(merged_bns) == sum(1 for m in module.modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():  # canonised model computes the same function
            xe = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(private(xe), module(xe), atol=1e-4, rtol=1e-4)
    finally:
        for instance in instances:
            instance.remove()
    assert all(torch.equal(private.state_dict()[k], v) for k, v in state.items())
    assert not any(type(m).__name__ == "Sum" for m in private.modules())


def test_concurrent_calls_on_one_model_leave_it_untouched(model: nn.Module, x: torch.Tensor) -> None:
    """Serving runs requests in threads: guarded calls on one model must not restore each other's state."""
    from concurrent.futures import ThreadPoolExecutor

    before = snapshot(model)
    explainers = [ierf.create_explainer(m, model) for m in ("gradcam", "gradient", "layercam", "lrp")] * 3
    serial = [e.saliency(x, 3) for e in explainers]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda e: e.saliency(x, 3), explainers))
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a, b)
    assert_untouched(model, before)


def test_baselines_declare_a_version_for_cache_keys() -> None:
    from ierf.methods import _REGISTRY

    for method in BASELINE_METHODS:
        assert getattr(_REGISTRY[method], "version", ""), method


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_cam_finds_the_final_feature_map_of_functionally_pooled_models(method: str) -> None:
    """torchvision's MobileNetV2 pools with F.adaptive_avg_pool2d: the default layer is its ``features``
    output, the same map as naming it; a model with no convolution at all is refused with a reason."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    default = ierf.create_explainer(method, model)
    assert default.layer == "features"
    torch.testing.assert_close(
        default.saliency(x, 1), ierf.create_explainer(method, model, layer="features").saliency(x, 1)
    )
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    with pytest.raises(ValueError, match="cannot find the final feature map"):
        ierf.create_explainer(method, flat)


def test_cam_default_layer_is_the_input_of_the_last_adaptive_pool() -> None:
    """Squeeze-excitation blocks hold AdaptiveAvgPool2d modules of their own (registered before the head's):
    the default CAM layer is the final feature map, the input of the last one, not the first SE squeeze."""
    import torchvision
    from ierf.baselines.cam import final_feature_module

    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in net.modules()) > 1
    name, module, use_input = final_feature_module(net)
    assert (name, module, use_input) == ("avgpool", net.avgpool, True)


def test_differentiable_gradcam_honours_relu_false(model: nn.Module, x: torch.Tensor) -> None:
    """relu=False returns the signed pre-ReLU Grad-CAM; the differentiable path used by the manipulation
    attack must return that same map, not the clamped default."""
    explainer = ierf.create_explainer("gradcam", model, relu=False)
    signed = explainer.saliency(x, torch.tensor([1, 7]))
    assert bool((signed < 0).any())
    diff = explainer.differentiable_saliency(x.clone().requires_grad_(True), torch.tensor([1, 7]))
    torch.testing.assert_close(diff.detach(), signed, atol=1e-6, rtol=1e-4)


def test_smoothgrad_leaves_the_global_rng_untouched(model: nn.Module, x: torch.Tensor) -> None:
    """SmoothGrad seeds a private stream for its noise: the caller's global RNG state is as it was."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    ierf.create_explainer("smoothgrad", model, n_samples=2).saliency(x, 1)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_lrp_follows_in_place_changes_to_the_callers_buffers(model: nn.Module, x: torch.Tensor) -> None:
    """BN running statistics are buffers, not parameters: an in-place update of them (a train-mode forward,
    load_state_dict) changes the model, so the explainer's private copy must be taken again."""
    net, x = copy.deepcopy(model), x[:1, :, :32, :32]
    explainer = ierf.create_explainer("lrp", net)
    before = explainer.saliency(x, 1)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.add_(0.5)
    after = explainer.saliency(x, 1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ierf.create_explainer("lrp", net).saliency(x, 1))


# -- mutation round 7 --------------------------------------------------------------------------------------------
def test_integrated_gradients_uses_the_requested_number_of_steps(model: nn.Module, x: torch.Tensor) -> None:
    """n_steps reaches Captum: the map equals Captum's IG from the zero baseline with that many steps (Captum's
    own default of 50 differs from 5 by far more than float noise)."""
    from captum.attr import IntegratedGradients

    ours = ierf.create_explainer("integrated_gradients", model, n_steps=5).saliency(x, 3)
    reference = IntegratedGradients(copy.deepcopy(model).eval()).attribute(
        x, baselines=torch.zeros_like(x), target=3, n_steps=5
    )
    torch.testing.assert_close(ours, reference.sum(1).float(), rtol=1e-4, atol=1e-5 * float(ours.abs().max()))


def test_smoothgrad_passes_its_sample_count_and_noise_to_captum(model: nn.Module, x: torch.Tensor) -> None:
    """n_samples, the per-image noise std (noise_level x value range) and the seed shape the noise: the map is
    the mean of Captum's gradients at the copies noised from a generator seeded with ``seed`` (3 samples, not
    the default 16). The generator is private: Captum's NoiseTunnel draws from the global one, which a
    server's threads share."""
    from captum.attr import Saliency

    image = x[:1]
    ours = ierf.create_explainer("smoothgrad", model, n_samples=3, noise_level=0.1, seed=4).saliency(image, 2)
    noise = torch.randn((3, *image.shape[1:]), generator=torch.Generator().manual_seed(4))
    noisy = image + noise * float(0.1 * (image.max() - image.min()))
    reference = Saliency(copy.deepcopy(model).eval()).attribute(noisy.requires_grad_(True), target=2, abs=False)
    torch.testing.assert_close(ours, reference.mean(0, keepdim=True).sum(1).detach(), rtol=1e-4, atol=1e-6)


def test_cam_on_a_module_called_twice_uses_its_last_call(model: nn.Module, x: torch.Tensor) -> None:
    """Documented: a module called several times per forward contributes its last call. torchvision's BasicBlock
    calls its ReLU twice; the second call's output is the block's output, so the two layer names give one map."""
    shared = ierf.create_explainer("gradcam", model, layer="layer1.0.relu").saliency(x, 1)
    block = ierf.create_explainer("gradcam", model, layer="layer1.0").saliency(x, 1)
    torch.testing.assert_close(shared, block)


def test_lrp_canonizes_bottleneck_resnets_too() -> None:
    """ResNet-50/101 are built from Bottleneck blocks: they need the ResNet canonizer (residual sums through
    the Norm rule), not the plain sequential BN merge."""
    import torchvision
    from ierf.baselines.lrp import ResNetCanonizer

    with torch.device("meta"):
        net = torchvision.models.resnet50(weights=None)
    assert isinstance(canonizers_for(net)[0], ResNetCanonizer)


def test_lrp_epsilon_reaches_the_composite(model: nn.Module, x: torch.Tensor) -> None:
    """The epsilon option is Zennit's epsilon rule's (linear layers): a large one damps the map as Zennit's
    does with the same epsilon, and differs from the default."""
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(False)
    target = torch.tensor([1, 7])
    with ZennitGradient(reference, EpsilonPlusFlat(epsilon=5.0, canonizers=[ResNetCanonizer()])) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), torch.eye(10)[target])
    damped = ierf.create_explainer("lrp", model, epsilon=5.0).saliency(x, target)
    torch.testing.assert_close(damped, relevance.sum(1), rtol=1e-3, atol=1e-4 * float(damped.abs().max()))
    default = ierf.create_explainer("lrp", model).saliency(x, target)
    assert not torch.allclose(damped, default, rtol=1e-2, atol=1e-2 * float(default.abs().max()))


def test_lrp_on_densenet_is_refused_up_front_or_explains_it() -> None:
    """DenseNet (``ierf.models`` serves densenet121, whose GetModel lists every method) got the sequential
    BN merge, which pairs each layer's last convolution with the *next* layer's ``norm1`` in registration
    order: every call died inside Zennit with "The size of tensor a (32) must match the size of tensor b
    (96)". An architecture LRP cannot canonise must be refused by name when the explainer is made."""
    torch.manual_seed(0)
    net = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
    net.eval()
    try:
        explainer = ierf.create_explainer("lrp", net)
    except ierf.UnsupportedModelError:
        return
    maps = explainer.saliency(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 1)
    assert maps.shape == (1, 32, 32) and bool(torch.isfinite(maps).all())


def test_lrp_explainer_made_under_inference_mode_works(model: nn.Module, x: torch.Tensor) -> None:
    """A notebook cell under ``torch.inference_mode()`` that makes the explainer and calls it: the private
    copy (``copy.deepcopy`` under inference mode) held inference tensors, and every call failed with
    "Inference tensors do not track version counter", although the README says each explainer works under
    a caller's inference_mode (the other eight methods do)."""
    expected = ierf.create_explainer("lrp", model).saliency(x, 1)
    with torch.inference_mode():
        explainer = ierf.create_explainer("lrp", model)
        inside = explainer.saliency(x, 1)
    torch.testing.assert_close(inside, expected)
    torch.testing.assert_close(explainer.saliency(x, 1), expected)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_a_model_with_inference_tensors_is_refused_by_name_and_left_as_found(method: str) -> None:
    """A model built under ``torch.inference_mode()`` has inference-tensor parameters, which autograd cannot
    use, so the autograd-based methods failed; but the guard's restore then raised too ("Setting
    requires_grad=True on inference tensor outside InferenceMode"), hiding the cause and leaving every
    parameter with requires_grad=False. Now such a model is refused with a ValueError saying what to do
    (a server turns that into "method not available"), and the model is left exactly as found."""
    with torch.inference_mode():
        net = random_tiny_resnet(seed=3).eval()
    before = [p.requires_grad for p in net.parameters()]
    assert all(before)
    with pytest.raises(ValueError, match=r"inference_mode\(\).*outside torch.inference_mode\(\)"):
        ierf.create_explainer(method, net).saliency(torch.randn(1, 3, 32, 32), 1)
    assert [p.requires_grad for p in net.parameters()] == before


def test_a_model_given_inference_tensors_after_the_explainer_was_made_is_refused_at_the_call() -> None:
    """A layer replaced under ``torch.inference_mode()`` after the explainer was made: refused by name on
    the next call (LRP's staleness stamp read the version counter inference tensors do not have)."""
    for method in ("gradient", "gradcam", "lrp"):
        net = random_tiny_resnet(seed=3).eval()
        explainer = ierf.create_explainer(method, net)
        with torch.inference_mode():
            net.fc = nn.Linear(net.fc.in_features, net.fc.out_features)
        with pytest.raises(ValueError, match=r"'fc\.weight' is an inference tensor"):
            explainer.saliency(torch.randn(1, 3, 32, 32), 1)
        assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("fails", [True, False])
def test_model_guard_leaves_requires_grad_of_inference_parameters_alone(fails: bool) -> None:
    """The guard does not touch ``requires_grad`` (it once froze and restored it: PyTorch allows setting it
    back to True on an inference tensor only inside inference mode, and a restore loop that stopped at the
    first parameter left the rest frozen), whether the body returns or raises."""
    with torch.inference_mode():
        net = random_tiny_resnet(seed=3).eval()
    next(net.parameters()).requires_grad_(False)  # a mix
    before = [p.requires_grad for p in net.parameters()]
    with contextlib.ExitStack() as stack:
        if fails:
            stack.enter_context(pytest.raises(RuntimeError, match=r"^boom$"))
        with model_guard(net):
            assert [p.requires_grad for p in net.parameters()] == before
            if fails:
                raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == before


def test_lrp_follows_a_replaced_module_without_parameters(model: nn.Module, x: torch.Tensor) -> None:
    """The private copy is taken again when parameters or buffers change, but a swapped activation (no
    tensors of its own) went unnoticed: LRP kept explaining the old network, silently, where SRD refuses a
    model whose submodules were replaced."""
    net = copy.deepcopy(model)
    explainer = ierf.create_explainer("lrp", net)
    before = explainer.saliency(x, 1)
    net.layer1[0].relu = nn.LeakyReLU(0.5)
    expected = ierf.create_explainer("lrp", net).saliency(x, 1)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(explainer.saliency(x, 1), expected)


def test_lrp_follows_a_changed_batch_norm_eps(model: nn.Module, x: torch.Tensor) -> None:
    """``eps`` is a plain float, not a tensor: the private copy kept the old one and explained the old network."""
    net = copy.deepcopy(model)
    explainer = ierf.create_explainer("lrp", net)
    before = explainer.saliency(x, 1)
    net.bn1.eps = 0.5
    expected = ierf.create_explainer("lrp", net).saliency(x, 1)
    assert not torch.allclose(before, expected)
    torch.testing.assert_close(explainer.saliency(x, 1), expected)


class _BatchNormAfterAFunctionalReLU(nn.Module):
    """Registered conv, bn (the order the sequential merge pairs them in), but the forward normalises
    ``relu(conv(x))``: folding the BN into the convolution's weights would change the function."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.relu(self.conv(x))).mean((2, 3)))


def test_lrp_refuses_a_batch_norm_merge_the_graph_does_not_support() -> None:
    """The sequential merge trusted registration order; with equal channel counts a wrong pair merged silently
    (DenseNet's unequal ones crashed inside Zennit). The pair is checked against the traced graph and named."""
    with pytest.raises(ierf.UnsupportedModelError, match=r"batch norm 'bn' follows 'conv' .* cannot be merged"):
        ierf.create_explainer("lrp", _BatchNormAfterAFunctionalReLU().eval())
    maps = ierf.create_explainer("lrp", _WithAnUnusedHead().eval()).saliency(torch.randn(1, 3, 8, 8), 1)
    assert maps.shape == (1, 8, 8) and bool(torch.isfinite(maps).all())  # verified merges (and unused ones) run


class _WithAnUnusedHead(nn.Module):
    """conv -> bn -> relu as registered, and a conv-bn head that never runs (an auxiliary head in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.unused = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def test_lrp_follows_a_fused_optimiser_step(model: nn.Module, x: torch.Tensor) -> None:
    """A fused optimiser (``fused=True``) writes the parameters without bumping their version counters, so
    the explainer kept explaining its private copy of the weights from before the step, silently. README:
    LRP's copy is taken again when the model's parameters change."""
    net = copy.deepcopy(model)
    explainer = ierf.create_explainer("lrp", net)
    before = explainer.saliency(x, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, fused=True)
    net(x)[:, 1].sum().backward()
    opt.step()
    after = explainer.saliency(x, 1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ierf.create_explainer("lrp", net).saliency(x, 1))


@pytest.mark.parametrize("method", ["gradcam", "gradcam_plusplus", "layercam", "hirescam"])
def test_cams_explain_a_bfloat16_model_and_a_bfloat16_autocast_region(
    method: str, model: nn.Module, x: torch.Tensor
) -> None:
    """The CAMs handed the captured activation and gradient to the library as ``.numpy()``, which has no
    bfloat16: a bfloat16 model, or a float32 one inside a caller's ``torch.autocast(dtype=torch.bfloat16)``
    (an evaluation loop's usual setting), ended in "TypeError: Got unsupported ScalarType BFloat16" while
    every other method (and float16) explains it."""
    reference = ierf.create_explainer(method, model).saliency(x, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = ierf.create_explainer(method, model).saliency(x, 1)
    net = copy.deepcopy(model).to(torch.bfloat16)
    in_bfloat16 = ierf.create_explainer(method, net).saliency(x.to(torch.bfloat16), 1)
    for maps in (in_autocast, in_bfloat16):
        assert maps.dtype == torch.float32 and maps.shape == reference.shape
        assert torch.corrcoef(torch.stack([maps.flatten(), reference.flatten()]))[0, 1] > 0.9
