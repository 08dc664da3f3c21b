"""Mutation round 35 on the baseline method bodies (``ierf.baselines.lrp``, ``.gradient``, ``.cam``) and on the
small modules ``ierf.interrupt``, ``ierf._memory``, ``ierf.serving.overlay`` and ``ierf.models.classes``.

Each test fails on a plausible slip that the suite let through. Maps are checked against independent
computations (Zennit used directly with its own canonizers, Grad-CAM written out in torch, central finite
differences in float64, the picture :mod:`ierf.viz` draws), not against the code under test.
"""

from __future__ import annotations

import copy
import io
import threading
from typing import Any

import ierf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ierf.baselines.cam import GradCAMExplainer
from ierf.baselines.lrp import why_unsupported
from ierf.errors import UnsupportedModelError
from ierf.interrupt import Interrupted, checkpoint, interruptible
from PIL import Image
from torch import nn


def _x(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- ierf.interrupt --------------------------------------------------------------------------------------------------
def test_a_check_that_returns_false_while_the_caller_waits_does_not_stop_the_call() -> None:
    """Kills B70: ``check()`` gives a reason to stop or a falsy value; the idiom ``lambda: gone.is_set() and
    "cancelled"`` returns False while the caller still waits, and a check on ``is not None`` stopped every call
    at its first checkpoint with the reason False."""
    gone = threading.Event()
    with interruptible(lambda: gone.is_set() and "the caller went away"):
        checkpoint()  # the caller still waits: go on
        gone.set()
        with pytest.raises(Interrupted, match="the caller went away"):
            checkpoint()


def test_interrupted_is_not_taken_for_bad_input_or_a_torch_error() -> None:
    """Kills B71: handlers of bad input (ValueError) and of torch's failures (RuntimeError) around an engine call
    must not swallow a stop; an ``Interrupted`` that is a RuntimeError was answered as a failed computation."""
    with interruptible(lambda: "stop"):
        try:
            checkpoint()
        except (ValueError, RuntimeError):  # what a server's error mapping catches
            pytest.fail("Interrupted was caught as bad input or a torch error")
        except Interrupted as exc:
            assert str(exc) == "stop"


# -- ierf._memory ----------------------------------------------------------------------------------------------------
def _system_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, str | Exception]) -> None:
    """/proc/meminfo and the cgroup files read as ``files`` says (an exception value is raised on open; a file
    not named is absent)."""
    real_open = open

    def machine(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path in files:
            content = files[path]
            if isinstance(content, Exception):
                raise content
            return io.StringIO(content)
        if str(path).startswith(("/proc/meminfo", "/sys/fs/cgroup")):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", machine)


def test_a_cgroup_file_the_process_may_not_read_is_no_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills B80: a cgroup file that exists but may not be read (PermissionError, EIO) must skip that source,
    not fail the iERF call that asked how much memory is left."""
    from ierf._memory import memory_available

    _system_files(
        monkeypatch,
        {
            "/proc/meminfo": "MemAvailable: 5 kB\n",
            "/sys/fs/cgroup/memory.max": PermissionError(13, "Permission denied"),
            "/sys/fs/cgroup/memory.current": "123\n",
        },
    )
    assert memory_available() == 5 * 1024


def test_a_cgroup_v1_group_without_a_limit_is_no_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills B76: cgroup v1 writes "no limit" as the largest page-aligned int64, 9223372036854771712 (just under
    2**63); read as a limit it became a figure of ~8 EiB instead of none."""
    from ierf._memory import memory_available

    _system_files(
        monkeypatch,
        {
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes": "1044480\n",
            "/sys/fs/cgroup/memory/memory.stat": "total_inactive_file 2048\n",
        },
    )
    assert memory_available() is None


def test_a_cgroup_over_its_limit_leaves_no_memory_not_a_negative_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills B78: a group's usage can pass its limit while the kernel reclaims; the figure is then 0 bytes left,
    not a negative count that a size check would print as "-0.0 GiB available"."""
    from ierf._memory import memory_available

    _system_files(
        monkeypatch,
        {
            "/proc/meminfo": "MemAvailable: 16000000 kB\n",
            "/sys/fs/cgroup/memory.max": "1048576\n",
            "/sys/fs/cgroup/memory.current": "1056768\n",
            "/sys/fs/cgroup/memory.stat": "anon 1000000\ninactive_file 4096\n",
        },
    )
    assert memory_available() == 0


# -- ierf.serving.overlay --------------------------------------------------------------------------------------------
def test_the_service_ierf_overlay_of_a_non_square_view_marks_the_cell_of_a_non_square_map() -> None:
    """Kills B84, B85: rows scale by the view's height over the map's rows, columns by its width over the map's
    columns. The suite's check drew a square view and a 7x7 map, where a transposed (H, W) of either is the
    same box; here the PNG must decode to exactly the picture :mod:`ierf.viz` draws for that cell."""
    from ierf.serving.overlay import ierf_png
    from ierf.viz import feature_cell_box, render_ierf

    view = np.full((160, 224, 3), 128, np.uint8)
    erf = np.zeros((160, 224), np.float32)
    erf[40:60, 100:120] = 0.0025
    box = feature_cell_box((1, 3), (5, 7), (160, 224))
    assert box == (32, 96, 64, 128)
    expected = np.asarray(render_ierf(view, erf, mark=box, caption="caption").convert("RGB"))
    got = np.asarray(Image.open(io.BytesIO(ierf_png(view, erf, (1, 3), (5, 7), "caption"))).convert("RGB"))
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


# -- ierf.baselines.lrp ----------------------------------------------------------------------------------------------
class _SharedConvThenBatchNorm(nn.Module):
    """One conv called twice; the BN registered after it normalises the first call's output only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_lrp_refuses_to_merge_a_batch_norm_into_a_layer_called_twice() -> None:
    """Kills B13: folding the BN into a conv that runs twice per forward changes its second call too (the model's
    function moves); the first call feeding only the BN must not make the merge look exact."""
    net = _SharedConvThenBatchNorm().eval()
    assert "'bn' follows 'conv' in registration order" in (why_unsupported(net) or "")
    with pytest.raises(UnsupportedModelError, match="'bn' follows 'conv' in registration order"):
        ierf.create_explainer("lrp", net)


def test_lrp_leaves_its_private_copy_without_rule_hooks_or_canonizer_sums_between_calls() -> None:
    """Kills B26: Zennit's rules are hooks and its canonizers rewrite modules while the composite is registered;
    a call that did not remove them left every later call stacking another set on the explainer's copy (12 more
    hooks per call on TinyResNet, held with their tensors for the explainer's lifetime)."""
    from ierf.fidelity.tiny_resnet import random_tiny_resnet

    explainer = ierf.create_explainer("lrp", random_tiny_resnet(seed=1).eval())
    x = _x((1, 3, 32, 32))
    first = explainer.saliency(x, 1)
    for _ in range(2):
        torch.testing.assert_close(explainer.saliency(x, 1), first, rtol=0, atol=0)
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    assert sum(len(getattr(m, kind)) for m in explainer.model.modules() for kind in kinds) == 0
    assert not any(type(m).__name__ == "Sum" for m in explainer.model.modules())


class _BottleneckNet(nn.Module):
    """A stem and one torchvision Bottleneck (16 -> 4 -> 16 channels, identity skip), pooled, a linear head."""

    def __init__(self) -> None:
        from torchvision.models.resnet import Bottleneck

        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Bottleneck(16, 4))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.layer1(self.relu(self.bn1(self.conv1(x))))).flatten(1))


def test_lrp_on_a_bottleneck_resnet_equals_zennit_with_its_own_resnet_canonizer() -> None:
    """Kills B05: ResNet-50's Bottleneck residual sum must go through Zennit's ``Sum`` (the Norm rule splits the
    relevance over both branches); without the Bottleneck canonizer the plain gradient gave each branch the full
    relevance. The suite checked only which canonizer class was chosen, and compared maps on BasicBlocks."""
    from zennit.attribution import Gradient as ZennitGradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    torch.manual_seed(0)
    net = _BottleneckNet().eval()
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    x = _x((2, 3, 12, 12), seed=2)
    target = torch.tensor([1, 7])
    reference = copy.deepcopy(net)
    for p in reference.parameters():
        p.requires_grad_(False)
    with ZennitGradient(reference, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), torch.eye(10)[target])
    ours = ierf.create_explainer("lrp", net).saliency(x, target)
    torch.testing.assert_close(ours, relevance.sum(1), rtol=1e-3, atol=1e-4 * float(ours.abs().max()))


# -- ierf.baselines.gradient -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise_level", [0.0, 1.0])
def test_smoothgrad_refuses_a_noise_level_at_either_end_of_its_range(noise_level: float) -> None:
    """Kills B43: SmoothGrad's noise level is open at both ends: 0 is the plain gradient under another name (and
    another cache key), 1 is noise the size of the whole image range, outside the paper's 10-20 %."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    with pytest.raises(ValueError, match=r"noise_level must be in \(0, 1\), got "):
        ierf.create_explainer("smoothgrad", model, noise_level=noise_level)


# -- ierf.baselines.cam ----------------------------------------------------------------------------------------------
class _SmoothNet(nn.Module):
    """Smooth everywhere (softplus, tanh) with a non-linear head, so Grad-CAM's channel weights depend on x."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 5, 3, padding=1))
        self.act = nn.Tanh()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.avgpool(self.act(self.features(x))).flatten(1))


def test_differentiable_gradcam_carries_the_derivative_of_its_channel_weights() -> None:
    """Kills B61: the manipulation attack differentiates the Grad-CAM map w.r.t. the input; the channel weights
    (mean gradients) depend on the input too, so their graph must be kept (create_graph). Without it the weights
    were constants and the attack followed a wrong direction. Checked against central finite differences in
    float64 on a smooth net (no ReLU kinks)."""
    torch.manual_seed(0)
    net = _SmoothNet().double().eval()
    explainer = GradCAMExplainer(net, relu=False)
    x = _x((1, 3, 6, 6), seed=5, dtype=torch.float64)
    weights = _x((1, 6, 6), seed=6, dtype=torch.float64)

    def objective(image: torch.Tensor) -> torch.Tensor:
        return (explainer.differentiable_saliency(image, 1) * weights).sum()

    xg = x.clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(objective(xg), xg)
    step = 1e-6
    for index in [(0, 0, 2, 3), (0, 1, 0, 0), (0, 2, 5, 1), (0, 0, 4, 4)]:
        up, down = x.clone(), x.clone()
        up[index] += step
        down[index] -= step
        numeric = (objective(up) - objective(down)).detach() / (2 * step)  # the path needs autograd on
        torch.testing.assert_close(analytic[index], numeric, rtol=1e-5, atol=1e-9)


# -- ierf.models.classes ---------------------------------------------------------------------------------------------
def test_a_name_that_differs_from_another_only_in_case_resolves_by_its_exact_spelling() -> None:
    """Kills B90, B94: ImageNet has 264 'Cardigan' (the corgi) and 474 'cardigan' (the jumper); matching ignores
    case, so the exact spelling must decide between them, and a spelling that is neither stays ambiguous (not
    the first of the two)."""
    from ierf.models.classes import class_index, imagenet_class_names

    names = imagenet_class_names()
    assert (names[264], names[474]) == ("Cardigan", "cardigan")
    assert class_index("Cardigan") == 264
    assert class_index("cardigan") == 474
    with pytest.raises(ValueError, match=r"ambiguous; candidates: 264 'Cardigan', 474 'cardigan'"):
        class_index("CARDIGAN")


def test_an_ambiguous_name_lists_its_first_twelve_candidates_and_counts_the_rest() -> None:
    """Kills B95: the message for a name with many matches lists the first twelve (enough to refine the query from)
    and says how many more there are."""
    from ierf.models.classes import class_index, imagenet_class_names

    names = imagenet_class_names()
    matches = [i for i, name in enumerate(names) if "terrier" in name.casefold()]
    assert len(matches) > 12
    shown = ", ".join(f"{i} {names[i]!r}" for i in matches[:12])
    with pytest.raises(ValueError) as caught:
        class_index("terrier")
    assert str(caught.value) == (
        f"class name 'terrier' is ambiguous; candidates: {shown}, … and {len(matches) - 12} more"
    )


# -- round 35 leftovers ----------------------------------------------------------------------------------------------
class _RectifyingPool(nn.AdaptiveAvgPool2d):
    """A global pool that rectifies its input in place first (``x.relu_()``): the module CAM reads the input of
    by default writes into that very tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.relu_())


class _ConvRectifyingPoolHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = _RectifyingPool(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_cam_reads_the_pool_input_before_a_pool_that_changes_it_in_place() -> None:
    """Kills B50 (the pre-hook hands the captured tensor itself to the pool): the default CAM layer is the input
    of the last adaptive pool, and a pool that rectifies it in place turned the captured map into the rectified
    one, with its gradient taken after the ReLU. Compared with pre-ReLU Grad-CAM written out in torch on the
    convolution's output: sum_k mean(dy/dA^k) A^k (no upsampling: the map has the input's size)."""
    model = _ConvRectifyingPoolHead().eval()
    x = _x((2, 3, 8, 8), seed=4)
    activation = model.conv(x)
    assert bool((activation < 0).any()) and bool((activation > 0).any())  # the in-place ReLU changes the map
    logits = model.fc(activation.relu().mean((2, 3)))
    (grad,) = torch.autograd.grad(logits[:, 2].sum(), activation)
    expected = (grad.mean((2, 3), keepdim=True) * activation).sum(1).detach()
    explainer = ierf.create_explainer("gradcam", model, relu=False)
    assert (explainer.layer, explainer.use_input) == ("pool", True)
    torch.testing.assert_close(explainer.saliency(x, 2), expected, rtol=1e-5, atol=1e-7)
