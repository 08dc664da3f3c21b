"""The CUDA paths, against the CPU and the float64 reference. CI has no GPU and skips this file; the device
machine runs it (README, "On CUDA"). Each test names what differed when a GPU path went its own way."""

from __future__ import annotations

import copy

import ierf
import numpy as np
import pytest
import torch
import torchvision
from ierf.srd.reference import ReferenceSRD
from srd_nets import all_nets, randomise_bn, reference_relevance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NETS = all_nets() if torch.cuda.is_available() else {}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """``got`` (any device) equals ``want`` to ``rel`` of ``want``'s largest magnitude."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    torch.testing.assert_close(got, want, atol=rel * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("name", sorted(NETS))
def test_every_rule_on_cuda_matches_the_float64_reference(name: str) -> None:
    """The small networks cover every rule (stride, padding, dilation, groups, BN, overlapping max-pool,
    residuals, concat, non-square input): the CUDA fast path follows the CPU reference to 1e-5."""
    model, hw = NETS[name]
    x = torch.randn(1, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = ReferenceSRD(model)
    dec_ref = ref.decompose(x)
    dec = ierf.SRD(copy.deepcopy(model).float().cuda(), head="exact").decompose(x.float().cuda())
    for target in (0, 3):
        fast = dec.relevance(target)[0]
        assert fast.device.type == "cuda"
        _close(fast, reference_relevance(ref, dec_ref, target).view(fast.shape), 1e-5)


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "densenet121", "mobilenet_v2", "efficientnet_lite0"])
def test_architectures_give_the_cpu_maps_and_ierfs_on_cuda(name: str) -> None:
    """Per-image targets in a batch and the iERFs of two PFVs at the default layer, CPU against CUDA."""
    from ierf.models import load_model

    if name == "efficientnet_lite0":
        model = load_model(name).module
    else:
        model = randomise_bn(getattr(torchvision.models, name)(), seed=3).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([7, 501])
    srd = ierf.SRD(model)
    layer = srd.layers[len(srd.layers) // 2]
    grid = srd.layer_shape(layer, (96, 96))
    positions = torch.tensor([[0, 0], [grid[-2] - 1, grid[-1] // 2]])
    cpu_map, cpu_erf = srd.saliency(x, target), srd.ierf(x, layer, positions)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = ierf.SRD(gpu_model)
    gpu_map = gpu.saliency(x.cuda(), target.cuda())
    gpu_erf = gpu.ierf(x.cuda(), layer, positions.cuda())
    assert gpu_map.device.type == gpu_erf.device.type == "cuda" and gpu_map.dtype == torch.float32
    _close(gpu_map, cpu_map, 1e-5)
    _close(gpu_erf, cpu_erf, 1e-5)
    torch.testing.assert_close(gpu_erf.sum((-2, -1)).cpu(), torch.ones(2, 2), atol=1e-5, rtol=0)


def test_every_method_gives_the_cpu_map_on_cuda() -> None:
    """Each registered method on a CUDA model answers on CUDA, with the CPU's map."""
    model = randomise_bn(torchvision.models.resnet18(), seed=4).eval()
    gpu_model = copy.deepcopy(model).cuda()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    seen = {}
    for method in ierf.available_methods():
        options = {"n_samples": 4} if method == "smoothgrad" else {}
        cpu = ierf.create_explainer(method, model, **options).saliency(x, 3)
        gpu = ierf.create_explainer(method, gpu_model, **options).saliency(x.cuda(), 3)
        assert gpu.device.type == "cuda", method
        scale = float(cpu.abs().max())
        seen[method] = float((gpu.double().cpu() - cpu.double()).abs().max()) / scale
    # SmoothGrad's noise is drawn on the CPU from its own generator, so it too matches.
    assert all(err < 1e-4 for err in seen.values()), seen


def test_a_caller_s_cuda_model_and_tf32_settings_are_left_as_they_were() -> None:
    model = randomise_bn(torchvision.models.resnet18(), seed=6).eval().cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(m._forward_hooks, m._forward_pre_hooks, m._backward_hooks) for m in model.modules()]
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    x = torch.randn(1, 3, 64, 64, device="cuda")
    ierf.SRD(model).saliency(x, 1)
    with pytest.raises(ValueError):
        ierf.SRD(model).saliency(x, 5000)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not any(h) for h in hooks)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags


def test_the_worker_on_cuda_answers_as_on_the_cpu_and_its_cached_decomposition_round_trips() -> None:
    """The serving worker (no Ray needed) on ``device: cuda``: explain, a second target from its in-process
    cache, iERF and predict equal the CPU worker's; the decomposition's state goes through the Redis codec
    (CPU bytes) and back onto the GPU with the same maps."""
    from ierf.serving.cache import decode_tensors, encode_tensors
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, IERFJob, ModelHost, PredictJob

    spec = {"id": "r18", "name": "resnet18", "random_init": True}
    hosts = {}
    for device in ("cpu", "cuda"):
        config = ServiceConfig.from_args({"models": [{**spec, "device": device}], "cache": {"redis_url": ""}})
        hosts[device] = ModelHost(config.models[0], config.cache)
    assert hosts["cuda"].device.type == "cuda"
    pixels = np.random.default_rng(9).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    answers: dict[str, list[np.ndarray]] = {}
    for device, host in hosts.items():
        first = host.explain(ExplainJob(pixels, "img", target=3))
        second = host.explain(ExplainJob(pixels, "img", target=9))
        assert ("decomposition", "l1") in second.provenance.cache, second.provenance.cache
        layer = host.srd.layers[-2]
        erf = host.ierf(IERFJob(pixels, "img", layer, np.array([[0, 0], [1, 2]], dtype=np.int64)))
        top = host.predict(PredictJob(pixels, "img", top_k=3))
        answers[device] = [first.maps, second.maps, erf.maps, np.array([s.logit for s in top.top_classes])]
    for got, want in zip(answers["cuda"], answers["cpu"], strict=True):
        _close(torch.from_numpy(got), torch.from_numpy(want), 1e-5)

    host = hosts["cuda"]
    x = torch.randn(1, 3, *host.input_hw, device="cuda")
    decomposition = host.srd.decompose(x)
    data = encode_tensors("k", decomposition.state_dict())
    restored = host.srd.load_decomposition(decode_tensors("k", data), like=host._layout, device=host.device)
    _close(restored.saliency(4), decomposition.saliency(4), 1e-6)
