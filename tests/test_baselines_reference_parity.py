"""Baselines against the reference libraries' definitions, from a Captum/Zennit user's point of view: the CAM
layer a user names is the tensor explained, a wrong input dtype gets the shared message, and SmoothGrad's
seeded noise does not reach the global RNG that other threads draw from."""

from __future__ import annotations

import threading

import ierf
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ierf.baselines import BASELINE_METHODS
from torch import nn


def _grad_cam(activation: torch.Tensor, logit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM (pre-ReLU) and HiResCAM of ``activation`` by hand, upsampled as README says."""
    (grad,) = torch.autograd.grad(logit.sum(), activation)
    gradcam = (grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1)
    hirescam = (grad * activation).sum(1)
    up = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in (gradcam, hirescam)]
    return torch.stack([u.detach() for u in up])


def test_cam_at_a_layer_followed_by_an_in_place_op_explains_that_layers_output() -> None:
    """README: ``layer=`` picks "the output of a named module". VGG-style ``Conv2d -> ReLU(inplace=True)``
    overwrites the convolution's output in place; the captured tensor must still be the convolution's output
    (Captum's LayerGradCam clones it), not the ReLU's, which is what another layer name already gives."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    target = torch.tensor([1, 3])
    conv_out = model[0](x)
    logits = model[2:](torch.relu(conv_out))
    expected = _grad_cam(conv_out, logits.gather(1, target[:, None]), (8, 8))
    gradcam = ierf.create_explainer("gradcam", model, layer="0", relu=False).saliency(x, target)
    hirescam = ierf.create_explainer("hirescam", model, layer="0").saliency(x, target)
    torch.testing.assert_close(gradcam, expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hirescam, expected[1], rtol=1e-4, atol=1e-6)


def test_cam_default_layer_of_densenet_is_its_features_output_before_the_in_place_relu() -> None:
    """README: for models that pool functionally (DenseNet) the default layer is "their last convolutional
    top-level block", ``features``. torchvision's DenseNet.forward applies ``F.relu(features, inplace=True)``
    to that output, so the map must be the Grad-CAM of ``features(x)`` (as Captum's LayerGradCam gives)."""
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=5
    ).eval()
    with torch.no_grad():  # BN biases that make part of the features negative before the ReLU
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([0, 3])
    explainer = ierf.create_explainer("gradcam", model, relu=False)
    assert explainer.layer == "features"
    features = model.features(x)
    logits = model.classifier(F.adaptive_avg_pool2d(torch.relu(features), 1).flatten(1))
    expected = _grad_cam(features, logits.gather(1, target[:, None]), (32, 32))[0]
    torch.testing.assert_close(explainer.saliency(x, target), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_an_input_of_another_dtype_than_the_model_gets_the_shared_message(method: str) -> None:
    """``ierf.methods.check_input``: "Every method validates with this, so the same bad call gets the same
    message". SRD answers a float64 input to a float32 model with a TypeError naming both dtypes; the
    baselines let it reach Captum/pytorch-grad-cam/Zennit ("expected scalar type Double but found Float")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)  # e.g. torch.from_numpy of a float64 array
    with pytest.raises(TypeError, match="dtype"):
        ierf.create_explainer("srd", model).saliency(x, 1)
    with pytest.raises(TypeError, match="dtype"):
        ierf.create_explainer(method, model).saliency(x, 1)


class _PauseInForward(nn.Module):
    """Identity that, on its first call, tells the test it is inside the explainer's forward and waits."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = threading.Event()
        self.resume = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.inside.is_set():
            self.inside.set()
            self.resume.wait(timeout=30)
        return x


def test_smoothgrad_noise_does_not_reseed_the_global_rng_of_other_threads() -> None:
    """SmoothGrad's docstring: noise "from a private generator seeded with seed ... the global RNG is left
    untouched". It reseeds the process-wide generator inside ``fork_rng`` instead, so a thread drawing random
    numbers meanwhile (a training loop, a data loader) gets the seed-0 stream, and has its own draws rolled
    back when the call ends."""
    pause = _PauseInForward()
    model = nn.Sequential(pause, nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    explainer = ierf.create_explainer("smoothgrad", model, n_samples=2)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    errors: list[BaseException] = []

    def explain() -> None:
        try:
            explainer.saliency(x, 1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=explain)
    worker.start()
    try:
        assert pause.inside.wait(timeout=30)
        drawn = torch.rand(8)  # this thread's next numbers, while SmoothGrad is mid-call
    finally:
        pause.resume.set()
        worker.join(timeout=60)
    assert not errors, errors
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoothgrad_on_cuda_leaves_the_cuda_rng_untouched() -> None:
    """``fork_rng(devices=[])`` saves only the CPU generator while ``torch.manual_seed`` reseeds every CUDA
    device too: each SmoothGrad call on a GPU reset the caller's CUDA RNG (dropout masks repeat)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval().cuda()
    x = torch.randn(1, 3, 4, 4, device="cuda")
    torch.cuda.manual_seed_all(123)
    expected = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(123)
    ierf.create_explainer("smoothgrad", model, n_samples=2).saliency(x, 1)
    torch.testing.assert_close(torch.rand(8, device="cuda"), expected, rtol=0, atol=0)
