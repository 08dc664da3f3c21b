"""Gradient-family baselines through Captum 0.9.0: gradient, input x gradient, IG, SmoothGrad.

All four produce a (B, C, H, W) attribution at input resolution that is collapsed by a signed sum
over channels. ``differentiable_saliency`` (gradient and input x gradient only) keeps the graph
for the manipulation attack; it is plain autograd and is tested against the Captum path.
"""

from __future__ import annotations

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from ierf.baselines._common import (
    check_input,
    check_ordinary_tensors,
    check_target_range,
    checked_forward,
    collapse_channels,
    finish,
    model_guard,
)
from ierf.methods import register_method, resolve_target
from ierf.metrics._checks import check_fraction, check_positive_int, check_seed


class _CaptumExplainer:
    """Common frame: checks, model guard, channel collapse."""

    name = ""
    #: Part of cache keys (ierf.serving): bump when a default or the library changes a map.
    version = "1-captum-0.9.0"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_ordinary_tensors(model)
        self.model = model

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        x = check_input(x, self.model)
        target = resolve_target(target, x.shape[0])
        check_ordinary_tensors(self.model)  # again: the caller may have loaded other weights since
        with model_guard(self.model):
            attribution = self._attribute(x.detach().requires_grad_(True), target.to(x.device))
        return finish(collapse_channels(attribution), tuple(x.shape[-2:]), self.model)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_method("gradient")
class Gradient(_CaptumExplainer):
    """Signed input gradient d logit_y / d x (Simonyan et al. 2014, without the absolute value)."""

    name = "gradient"

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return Saliency(checked_forward(self.model, target)).attribute(x, target=target, abs=False)

    def differentiable_saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        """Same map, differentiable w.r.t. ``x`` (create_graph); the caller owns the model state."""
        return collapse_channels(_input_gradient(self.model, x, resolve_target(target, x.shape[0])))


@register_method("input_x_gradient")
class InputTimesGradient(_CaptumExplainer):
    """x * d logit_y / d x (Shrikumar et al. 2016)."""

    name = "input_x_gradient"

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return InputXGradient(checked_forward(self.model, target)).attribute(x, target=target)

    def differentiable_saliency(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        return collapse_channels(x * _input_gradient(self.model, x, resolve_target(target, x.shape[0])))


@register_method("integrated_gradients")
class IntegratedGradientsExplainer(_CaptumExplainer):
    """Integrated Gradients (Sundararajan et al. 2017) from the all-zero normalised input.

    Zero in normalised space is the dataset mean colour for both bundled models, the usual
    "black/grey" baseline. ``n_steps`` Gauss-Legendre points (Captum's default rule); path points are
    evaluated ``max(internal_batch_size, B)`` at a time (bounded memory on large inputs).
    """

    name = "integrated_gradients"

    def __init__(self, model: nn.Module, n_steps: int = 32, internal_batch_size: int = 8) -> None:
        super().__init__(model)
        # checked here, not at the first call: 2.5 steps or True would otherwise fail deep inside Captum
        self.n_steps = check_positive_int(n_steps, "n_steps")
        self.internal_batch_size = check_positive_int(internal_batch_size, "internal_batch_size")

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ig = IntegratedGradients(checked_forward(self.model, target))
        return ig.attribute(
            x,
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=self.n_steps,
            internal_batch_size=max(self.internal_batch_size, x.shape[0]),
        )


# Noisy copies run this many at a time: each batch is one forward, so a server can stop a SmoothGrad whose
# caller has gone part-way (16 samples in one batch had a single checkpoint, before any work).
SMOOTHGRAD_SAMPLE_BATCH = 4


@register_method("smoothgrad")
class SmoothGrad(_CaptumExplainer):
    """SmoothGrad (Smilkov et al. 2017): mean signed gradient over Gaussian-noised copies.

    Noise std per image is ``noise_level`` x (max - min) of that image (the paper's 10-20 %).
    Noise is drawn from a private generator seeded with ``seed`` for every image, so a map does not
    depend on batch composition or on global RNG state (and the global RNG is left untouched). Captum's
    NoiseTunnel draws from the global generator, which other threads share (and reseeding it reseeds every
    GPU's too), so the noise is drawn here and Captum's Saliency averaged over the noised copies.
    """

    name = "smoothgrad"
    version = "2-captum-0.9.0"  # 2: noise from a private generator instead of the reseeded global one

    def __init__(self, model: nn.Module, n_samples: int = 16, noise_level: float = 0.15, seed: int = 0) -> None:
        super().__init__(model)
        self.n_samples = check_positive_int(n_samples, "n_samples")
        self.noise_level = check_fraction(noise_level, "noise_level")
        if not 0.0 < self.noise_level < 1.0:  # NaN fails this too
            raise ValueError(f"noise_level must be in (0, 1), got {noise_level!r}")
        self.seed = check_seed(seed)

    def _attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        saliency = Saliency(checked_forward(self.model, target))
        maps = []
        for i in range(x.shape[0]):
            image = x[i : i + 1]
            stdev = float(self.noise_level * (image.max() - image.min()).detach())
            gen = torch.Generator(device=x.device).manual_seed(self.seed)
            # drawn in float32 whatever the input's dtype: a float64 copy of the model sees the same samples
            noise = torch.randn(
                (self.n_samples, *image.shape[1:]), generator=gen, device=x.device, dtype=torch.float32
            ).to(x.dtype)
            noisy = image.detach() + noise * (stdev if stdev > 0 else 1e-6)
            total = torch.zeros_like(image)
            for chunk in noisy.split(SMOOTHGRAD_SAMPLE_BATCH):  # a forward (and a checkpoint) per chunk
                grads = saliency.attribute(
                    chunk.requires_grad_(True), target=target[i : i + 1].expand(len(chunk)), abs=False
                )
                total += grads.sum(0, keepdim=True)
            maps.append(total / self.n_samples)
        return torch.cat(maps)


def _input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    check_ordinary_tensors(model)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    logits = model(x.clone())  # a first op in place must not write into the differentiated input
    check_target_range(logits, target)
    selected = logits.gather(1, target.to(logits.device)[:, None]).sum()
    (grad,) = torch.autograd.grad(selected, x, create_graph=True)
    return grad
