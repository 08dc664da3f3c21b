"""Mutation round 23 on ``ierf.baselines`` (the shared guard and checks, the Captum, pytorch-grad-cam and Zennit
paths) and ``ierf.models.registry`` / ``ierf.models.preprocessing``.

Each test fails on a plausible slip that the suite let through: a model whose only inference tensors are its
buffers, 1-D logits, a tuple-returning model refused as another type than SRD's, torch's channel and
linear-head refusals reworded wrongly or not at all, the guard restoring hook dictionaries only when they grew
or skipping some kinds of hook, IG's and SmoothGrad's documented defaults, SmoothGrad on a constant image, the
differentiable gradient path's in-place first op and its checks, the CAM layer of a functionally pooled model,
a CAM capture fed by another thread, non-spatial CAM layers; ``top_k`` asked for more classes than the model
has, the weight lookup searching by file name before directory, the torchvision hash warning given for files
that are not torchvision's, the "module." prefix stripped where only some keys carry it, and a preprocessing
version that leaves out the crop. The LRP canonizer checks (run after the first pass): a batch norm merged into
a layer whose output is also read elsewhere, or into a layer when the batch norm itself never runs, a ResNet's
merges left unchecked, and squeeze-excitation blocks let through.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from pathlib import Path

import ierf
import pytest
import torch
import torchvision
from ierf.fidelity.tiny_resnet import random_tiny_resnet
from ierf.models import registry
from ierf.models.classes import imagenet_class_names
from ierf.models.preprocessing import IMAGENET, IMAGENET_299
from test_fidelity_baselines import _BatchNormAfterAFunctionalReLU


# ---- inference tensors among the buffers only ------------------------------------------------------------
@pytest.mark.parametrize("method", ["gradient", "gradcam", "lrp"])
def test_a_model_whose_buffers_alone_are_inference_tensors_is_refused_by_name(method: str) -> None:
    """Guards against C3 (``check_ordinary_tensors`` reading parameters only): running statistics replaced
    under ``torch.inference_mode()`` (statistics loaded inside a serving loop) cannot be saved for backward,
    so the call failed with torch's RuntimeError about inference tensors instead of the ValueError naming
    the buffer and saying what to do."""
    net = random_tiny_resnet(seed=3).eval()
    with torch.inference_mode():
        net.bn1.running_var = torch.ones_like(net.bn1.running_var)
    assert not any(p.is_inference() for p in net.parameters())
    with pytest.raises(ValueError, match=r"'bn1\.running_var' is an inference tensor"):
        ierf.create_explainer(method, net).saliency(torch.randn(1, 3, 32, 32), 1)


# ---- top_k -----------------------------------------------------------------------------------------------
def test_top_k_beyond_the_number_of_classes_lists_every_class_once() -> None:
    """Guards against R5 (``topk(k)`` without ``min(k, classes)``): ``top_k(logits, k=2000)`` on a 1000-class
    model raised torch's "selected index k out of range" instead of ranking all 1000 classes."""
    loaded = registry.LoadedModel(
        name="resnet18",
        module=torch.nn.Identity(),
        class_names=imagenet_class_names(),
        weights_digest="0" * 16,
        weights_source="test",
        preprocessing=IMAGENET,
        device=torch.device("cpu"),
    )
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    ranked = loaded.top_k(logits, k=2000)
    assert len(ranked) == 1000
    assert sorted(score.index for score in ranked) == list(range(1000))
    assert ranked[0].index == int(logits.argmax())
    assert sum(score.probability for score in ranked) == pytest.approx(1.0)


# ---- weight lookup order ---------------------------------------------------------------------------------
def test_the_env_dir_wins_over_the_hub_cache_whichever_file_name_each_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards against R7 (the file-name loop outside the directory loop): with torchvision's second ResNet50 file
    in ``$IERF_WEIGHTS_DIR`` and its first file in the hub cache, the hub cache's file was taken because its
    name comes first, against the documented order (the directory chosen for the deployment comes first)."""
    weights_dir, torch_home = tmp_path / "weights", tmp_path / "torch_home"
    hub_dir = torch_home / "hub" / "checkpoints"
    weights_dir.mkdir()
    hub_dir.mkdir(parents=True)
    monkeypatch.setenv(registry.WEIGHTS_DIR_ENV, str(weights_dir))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    first, second = registry.model_spec("resnet50").weight_files
    (hub_dir / first).write_bytes(b"hub")
    (weights_dir / second).write_bytes(b"env")
    assert registry.resolve_weights("resnet50") == weights_dir / second
    (weights_dir / second).unlink()
    assert registry.resolve_weights("resnet50") == hub_dir / first


# ---- torchvision's hash in file names --------------------------------------------------------------------
def test_only_torchvisions_own_file_names_are_checked_against_their_hash(caplog: pytest.LogCaptureFixture) -> None:
    """Guards against R21 (the canonical-name condition dropped): a fine-tune saved as
    ``resnet18-finetune-deadbeef.pth`` has a hash-like tail that is no sha256 of anything, and was warned about
    as "a corrupted download" on every load."""
    spec = registry.model_spec("resnet18")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        registry._check_named_hash(Path("/w/resnet18-finetune-deadbeef.pth"), spec, "0123456789abcdef")
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        registry._check_named_hash(Path("/w/resnet18-f37072fd.pth"), spec, "0123456789abcdef")
    assert len(caplog.records) == 1 and "f37072fd" in caplog.records[0].getMessage()


# ---- DataParallel prefixes -------------------------------------------------------------------------------
def test_a_prefix_is_stripped_only_when_every_key_carries_it() -> None:
    """Guards against R18 (``any`` for ``all``): a file holding both ``module.fc.weight`` and ``fc.weight``
    (two models' weights merged, not a DataParallel file) had one silently overwrite the other; such a file
    must reach the key check as it is, which names the unexpected keys."""
    a, b = torch.zeros(2), torch.ones(2)
    buffer = io.BytesIO()
    torch.save({"module.fc.weight": a, "fc.weight": b}, buffer)
    buffer.seek(0)
    state = registry._read_state_dict(buffer, Path("merged.pth"))
    assert set(state) == {"module.fc.weight", "fc.weight"}
    assert torch.equal(state["fc.weight"], b)
    buffer = io.BytesIO()
    torch.save({"module.fc.weight": a, "module.fc.bias": b}, buffer)
    buffer.seek(0)
    assert set(registry._read_state_dict(buffer, Path("dp.pth"))) == {"fc.weight", "fc.bias"}


# ---- logits of the wrong rank ----------------------------------------------------------------------------
class _OneImageLogits(torch.nn.Module):
    """Returns the logits of the first image as a 1-D tensor (a forward ending in ``.squeeze()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = random_tiny_resnet(seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


@pytest.mark.parametrize("method", ["gradient", "gradcam", "lrp"])
def test_one_dimensional_logits_are_refused_with_the_shape_they_have(method: str) -> None:
    """Guards against C5 (``dim() > 2`` for ``dim() != 2``): a model returning (num_classes,) logits passed the
    shape check and the class check then failed on ``logits.shape[1]`` with a bare IndexError."""
    with pytest.raises(ValueError, match=r"must return \(B, num_classes\) logits, got shape \(10,\)"):
        ierf.create_explainer(method, _OneImageLogits()).saliency(torch.randn(1, 3, 32, 32), 1)


class _LogitsAndFeatures(torch.nn.Module):
    """Returns (logits, features), as many research models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = random_tiny_resnet(seed=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x), x


@pytest.mark.parametrize("method", ["srd", "gradient", "gradcam", "lrp"])
def test_a_model_returning_a_tuple_is_refused_as_unsupported_by_every_method(method: str) -> None:
    """Guards against C6 (the baselines' refusal raised as another type): SRD refuses a model whose forward
    returns a tuple with ``ierf.UnsupportedModelError`` (public; callers catch it to fall back to a wrapper),
    and the baselines word the same refusal after SRD's, so they must raise the same type."""
    with pytest.raises(ierf.UnsupportedModelError, match="must return one logits tensor, got tuple"):
        ierf.create_explainer(method, _LogitsAndFeatures().eval()).saliency(torch.randn(1, 3, 32, 32), 1)


# ---- the preprocessing version names every pixel setting -------------------------------------------------
def test_the_preprocessing_version_tells_apart_settings_that_differ_only_in_the_crop() -> None:
    """Guards against P10 (the crop left out of ``Preprocessing.version``): a ResNet deployed with ``resize=342``
    and Inception-v3 (resize 342, crop 299) then shared one version, which keys cached pixels and views (a
    224-pixel view would be taken for a 299-pixel one)."""
    resnet_at_342 = dataclasses.replace(IMAGENET, resize=342)
    assert resnet_at_342.version != IMAGENET_299.version
    assert dataclasses.replace(IMAGENET_299, crop=224).version == resnet_at_342.version
    assert len({IMAGENET.version, resnet_at_342.version, IMAGENET_299.version}) == 3


# ---- torch's refusals of an input, in the caller's words -------------------------------------------------
@pytest.mark.parametrize("method", ["gradient", "gradcam", "lrp"])
def test_the_channel_refusal_names_the_models_channels_then_the_inputs(method: str) -> None:
    """Guards against C15 (the two counts of torch's conv message swapped): a 4-channel batch for an RGB model
    was refused as "x must have 4 channels, got 3", telling the caller to send what they sent."""
    with pytest.raises(ValueError, match=r"^x must have 3 channels, got 4$"):
        ierf.create_explainer(method, random_tiny_resnet(seed=3).eval()).saliency(torch.randn(1, 4, 32, 32), 1)


class _FixedSizeHead(torch.nn.Module):
    """A convolution and a linear layer on the flattened map: takes 8x8 inputs only (no adaptive pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("method", ["gradient", "gradcam", "lrp"])
def test_an_input_whose_features_do_not_fit_the_linear_head_is_an_input_size_error(method: str) -> None:
    """Guards against C16 (torch's "mat1 and mat2 shapes cannot be multiplied" dropped from the sizes refused):
    a 10x10 image for a head that reads an 8x8 map's features escaped as a bare RuntimeError, where SRD and
    the README promise ``ierf.InputSizeError``."""
    torch.manual_seed(0)
    explainer = ierf.create_explainer(method, _FixedSizeHead().eval())
    assert explainer.saliency(torch.randn(1, 3, 8, 8), 1).shape == (1, 8, 8)
    with pytest.raises(ierf.InputSizeError, match="do not fit this model: mat1 and mat2 shapes cannot be multiplied"):
        explainer.saliency(torch.randn(1, 3, 10, 10), 1)


# ---- the guard puts back the caller's hooks --------------------------------------------------------------
def test_the_guard_puts_back_a_callers_hook_a_library_removed_and_replaced() -> None:
    """Guards against C20 (restoring a hook dictionary only when it grew): a library that removes the caller's
    forward hook and leaves one of its own behind keeps the dictionary's size, so the caller's hook stayed
    lost and the stray one stayed installed."""
    from ierf.baselines._common import model_guard

    net = random_tiny_resnet(seed=3).eval()
    calls: list[str] = []
    mine = net.layer1.register_forward_hook(lambda m, i, o: calls.append("mine"))
    with model_guard(net):
        mine.remove()
        net.layer1.register_forward_hook(lambda m, i, o: calls.append("stray"))
    assert list(net.layer1._forward_hooks) == [mine.id]
    net(torch.randn(1, 3, 32, 32))
    assert calls == ["mine"]


def test_the_guard_drops_every_kind_of_hook_a_library_leaves_behind() -> None:
    """Guards against C24 and C26 (``_forward_pre_hooks`` or ``_backward_hooks`` left out of the dictionaries
    restored): a capture that installs a pre-hook (the CAM input capture does) or a module backward hook and
    fails to remove it left it on the caller's model, running on every later forward or backward."""
    from ierf.baselines._common import model_guard

    net = random_tiny_resnet(seed=3).eval()
    kinds = {
        "_forward_pre_hooks": lambda m: m.register_forward_pre_hook(lambda *a: None),
        "_forward_pre_hooks_with_kwargs": lambda m: m.register_forward_pre_hook(lambda *a: None, with_kwargs=True),
        "_forward_hooks": lambda m: m.register_forward_hook(lambda *a: None),
        "_forward_hooks_always_called": lambda m: m.register_forward_hook(lambda *a: None, always_call=True),
        "_backward_hooks": lambda m: m.register_full_backward_hook(lambda *a: None),
        "_backward_pre_hooks": lambda m: m.register_full_backward_pre_hook(lambda *a: None),
    }
    before = {name: dict(getattr(net.layer1, name)) for name in kinds}
    with model_guard(net):
        for install in kinds.values():
            install(net.layer1)
        assert all(len(getattr(net.layer1, name)) > len(before[name]) for name in kinds)
    assert {name: dict(getattr(net.layer1, name)) for name in kinds} == before


# ---- integrated gradients' documented default -----------------------------------------------------------
def test_integrated_gradients_defaults_to_the_documented_32_path_points() -> None:
    """Guards against G5 (another default ``n_steps``): the package table and the cache-key version promise
    IG over 32 points; a changed default would change every map while cached maps kept the old version's key."""
    net = random_tiny_resnet(seed=3).eval()
    rows: list[int] = []
    net.conv1.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    ierf.create_explainer("integrated_gradients", net).saliency(torch.randn(1, 3, 16, 16), 1)
    assert sum(rows) == 32 and max(rows) == 8


def test_smoothgrad_defaults_to_the_documented_16_samples_at_15_percent_noise() -> None:
    """Guards against G6 (another default ``noise_level``): the package table promises 16 samples with noise
    15 % of the image's range, under the same cache-key version."""
    net = random_tiny_resnet(seed=3).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    explicit = ierf.create_explainer("smoothgrad", net, n_samples=16, noise_level=0.15, seed=0).saliency(x, 1)
    torch.testing.assert_close(ierf.create_explainer("smoothgrad", net).saliency(x, 1), explicit)


def test_smoothgrad_still_noises_the_copies_of_a_constant_image() -> None:
    """Guards against G11 (the 1e-6 floor on the noise dropped): a constant image (a blank frame, a padded
    tile) has a range of 0, so all 16 copies were the image itself and SmoothGrad returned the gradient at
    max-pool ties broken by index (36 % away from the smoothed map on the tiny ResNet) instead of averaging
    over copies that break them at random."""
    net = random_tiny_resnet(seed=3).eval()
    seen: list[torch.Tensor] = []
    net.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = torch.full((1, 3, 16, 16), 0.3)
    ierf.create_explainer("smoothgrad", net).saliency(x, 1)
    copies = torch.cat(seen)
    assert copies.shape[0] == 16
    deviation = (copies - x).abs()
    assert 0 < float(deviation.max()) < 1e-4
    assert all(not torch.equal(copies[0], c) for c in copies[1:])


# ---- the differentiable gradient paths -------------------------------------------------------------------
def test_the_differentiable_gradient_map_takes_a_model_whose_first_op_is_in_place() -> None:
    """Guards against G16 (the model fed the differentiated input itself): a first ``SiLU(inplace=True)``
    wrote into the leaf being differentiated and autograd refused it, where ``saliency`` explains the model."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.SiLU(inplace=True), torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)
    )
    net(torch.randn(1, 3, 6, 6))
    net.eval()
    explainer = ierf.create_explainer("gradient", net)
    x = torch.randn(1, 3, 6, 6)
    kept = x.clone()
    torch.testing.assert_close(explainer.differentiable_saliency(x, 2).detach(), explainer.saliency(x, 2))
    assert torch.equal(x, kept)


def test_the_differentiable_gradient_map_refuses_what_saliency_refuses() -> None:
    """Guards against G20 and G21 (the model and target checks dropped from the differentiable path): an
    inference-tensor model and a class the model does not have gave torch's RuntimeErrors (inference tensors
    saved for backward, an index out of bounds) instead of the methods' ValueErrors."""
    net = random_tiny_resnet(seed=3).eval()
    explainer = ierf.create_explainer("gradient", net)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"target out of range: the model has 10 classes"):
        explainer.differentiable_saliency(x, 10)
    with torch.inference_mode():
        net.fc = torch.nn.Linear(net.fc.in_features, net.fc.out_features)
    with pytest.raises(ValueError, match=r"'fc\.weight' is an inference tensor"):
        explainer.differentiable_saliency(x, 1)


# ---- CAM layers ------------------------------------------------------------------------------------------
class _StemAndBody(torch.nn.Module):
    """Two top-level blocks with convolutions and a functional pool (no AdaptiveAvgPool2d module)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.adaptive_avg_pool2d(self.body(self.stem(x)), 1).flatten(1))


def test_cam_on_a_functionally_pooled_model_reads_its_last_convolutional_block() -> None:
    """Guards against K3 (the first top-level block with a convolution for the last): a model with a stem and
    a body was explained at its stem, the map two layers before the one feeding the classifier."""
    torch.manual_seed(0)
    model = _StemAndBody().eval()
    x = torch.randn(2, 3, 16, 16)
    default = ierf.create_explainer("gradcam", model)
    assert default.layer == "body"
    torch.testing.assert_close(
        default.saliency(x, 1), ierf.create_explainer("gradcam", model, layer="body").saliency(x, 1)
    )


class _Poked(torch.nn.Module):
    """While ``poke`` is set, runs ``a`` on another image in another thread in the middle of its own forward
    (another request's forward on a shared model, made deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 5)
        self.poke = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.poke:
            other = threading.Thread(target=lambda: self.a(torch.randn(1, 3, 8, 8)))
            other.start()
            other.join()
        return self.fc(self.pool(h).flatten(1))


def test_cam_at_a_named_layer_ignores_that_layers_calls_from_other_threads() -> None:
    """Guards against K6 (the thread check dropped from the output capture): another thread running the
    captured layer during the CAM's forward replaced the captured map with its own, so the CAM differentiated
    a tensor outside its graph (or explained the other request's image)."""
    torch.manual_seed(0)
    model = _Poked().eval()
    x = torch.randn(2, 3, 8, 8)
    explainer = ierf.create_explainer("gradcam", model, layer="a", relu=False)
    expected = explainer.saliency(x, 1)
    model.poke = True
    torch.testing.assert_close(explainer.saliency(x, 1), expected)


class _FlatFeatures(torch.nn.Module):
    """A convolution whose map is flattened to (B, C, h*w) before the head (a token-style layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.flat = torch.nn.Flatten(2)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.conv(x)).mean(-1))


def test_cam_refuses_a_layer_whose_output_is_not_a_spatial_map() -> None:
    """Guards against K11 (only maps of fewer than 3 dimensions refused): a (B, C, L) layer reached the
    library's formula, which has no height and width to weight, instead of the refusal naming the shape."""
    torch.manual_seed(0)
    explainer = ierf.create_explainer("gradcam", _FlatFeatures().eval(), layer="flat")
    with pytest.raises(ValueError, match=r"CAM layer 'flat' must produce a \(B, C, h, w\) map, got \(1, 4, 64\)"):
        explainer.saliency(torch.randn(1, 3, 8, 8), 1)


class _ConvReadTwice(_BatchNormAfterAFunctionalReLU):
    """conv -> bn (test_fidelity_baselines' layers) as registered and in the forward, but the convolution's
    output is also read by the skip: folding the BN into the convolution's weights would change what the skip
    adds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((torch.relu(self.bn(y)) + y).mean((2, 3)))


def test_lrp_refuses_a_merge_into_a_layer_whose_output_is_also_read_elsewhere() -> None:
    """L5: the merge check dropped its "the layer's only reader is the batch norm" clause, and LRP merged the
    BN into a convolution whose raw output the skip also reads: a different network, explained silently."""
    net = _ConvReadTwice().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    with pytest.raises(ierf.UnsupportedModelError, match=r"batch norm 'bn' follows 'conv' .* cannot be merged"):
        ierf.create_explainer("lrp", net)


class _BatchNormNeverRun(_BatchNormAfterAFunctionalReLU):
    """conv, bn registered in that order, but the forward never calls the batch norm: merging it into the
    convolution would explain a network that normalises where this one does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_lrp_refuses_a_merge_when_only_the_layer_runs() -> None:
    """L6: "neither runs" read as "either does not run", so a batch norm that never runs after a
    convolution that does was merged into it without a check."""
    net = _BatchNormNeverRun().eval()
    with torch.no_grad():
        net.bn.running_var.uniform_(0.5, 2)
    with pytest.raises(ierf.UnsupportedModelError, match=r"batch norm 'bn' follows 'conv' .* cannot be merged"):
        ierf.create_explainer("lrp", net)


class _ResNetNormalisingAfterTheStemReLU(torchvision.models.ResNet):
    """A torchvision ResNet whose stem normalises relu(conv1(x)): registration order still pairs conv1 with
    bn1, so the ResNet canonizer's merge would change the function."""

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.relu(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_lrp_checks_the_merges_of_a_resnet_too() -> None:
    """L7: the ResNet branch of the canonizer choice returned before checking the merges against the traced
    graph, so a ResNet subclass with a re-ordered stem was merged silently."""
    net = _ResNetNormalisingAfterTheStemReLU(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5).eval()
    with pytest.raises(ierf.UnsupportedModelError, match=r"batch norm 'bn1' follows 'conv1' .* cannot be merged"):
        ierf.create_explainer("lrp", net)


def test_lrp_refuses_squeeze_excitation_blocks_by_name() -> None:
    """L8: the squeeze-excitation refusal dropped: EfficientNet-B0's blocks (same code as the bundled Lite0,
    with SE) went to the Lite canonizer, whose skip-sum forward leaves the SE gate out."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-b0").eval()
    message = r"squeeze-excitation blocks are not supported: \['_blocks\.0'"
    with pytest.raises(ierf.UnsupportedModelError, match=message):
        ierf.create_explainer("lrp", net)
