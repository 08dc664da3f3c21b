"""Stability of a map under small random input noise: max-sensitivity (Yeh et al. 2019).

    MS(x) = max_j || Phi(x + delta_j) - Phi(x) ||_F / || Phi(x) ||_F,
    delta_j ~ U[-r, r]^(C x H x W),  r = radius x (max(x) - min(x)) of that image,

with the signed maps compared directly (relative Frobenius change, so the method's own scale drops
out). Lower is more stable. Defaults: radius 2 % of the image's value range, 8 samples, noise from a
private generator per image, seeded with ``seed`` and a hash of the image's own values (the global RNG is
untouched): an image's noise, and so its score, is the same alone or in any batch, so a subset of a
benchmark scores its images as the full run does, and different images get independent noise (one shared
draw for every image made a benchmark's mean hang on a few draws: LRP on TinyResNet 0.50 with one seed,
0.29 with the next). A map that is identically zero at x gives NaN (its relative change is undefined);
callers report how many. Yeh et al. take the absolute change; dividing by the map's own norm makes
methods with maps of different scales comparable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from ierf.methods import resolve_target
from ierf.metrics._checks import check_maps, check_positive_finite, check_positive_int, check_seed

ExplainFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _image_seed(image: torch.Tensor, seed: int) -> int:
    """A generator seed from ``seed`` and the image's values: the same image, the same noise, in any batch."""
    values = image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()  # any dtype, bit for bit
    digest = hashlib.blake2b(values, digest_size=8, key=seed.to_bytes(9, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") >> 1  # in [0, 2**63): what manual_seed takes


def max_sensitivity(
    explain: ExplainFn,
    x: torch.Tensor,
    target: torch.Tensor,
    radius: float = 0.02,
    n_samples: int = 8,
    seed: int = 0,
    maps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per image max relative change of the map over ``n_samples`` noisy copies. Returns float (B,), NaN for
    an image whose map at ``x`` is all zero (its relative change is undefined).

    ``explain(x, target) -> (B, H, W)`` is any explainer's ``saliency``; ``maps`` may pass the
    already computed maps at ``x`` to save one call.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    check_positive_finite(radius, "radius")
    n_samples = check_positive_int(n_samples, "n_samples")
    seed = check_seed(seed)  # named here: torch's manual_seed refused 1.5 without naming the argument
    target = resolve_target(target, x.shape[0])
    expected = (x.shape[0], *x.shape[-2:])

    def checked(m: torch.Tensor, what: str) -> torch.Tensor:
        m = check_maps(m, what)
        if tuple(m.shape) != expected:  # a wrong batch broadcast silently against the others
            raise ValueError(f"{what} must have shape {expected}, got {tuple(m.shape)}")
        return m.double()

    base = checked(explain(x, target) if maps is None else maps, "maps" if maps is not None else "the explainer's maps")
    base_norm = base.flatten(1).norm(dim=1)
    span = (x.flatten(1).max(1).values - x.flatten(1).min(1).values).view(-1, 1, 1, 1)
    generators = [torch.Generator().manual_seed(_image_seed(image, seed)) for image in x]
    worst = torch.zeros(x.shape[0], dtype=torch.float64)
    for _ in range(n_samples):
        # drawn in float32 on the CPU whatever the input's dtype and device: the same samples everywhere
        noise = torch.stack([torch.rand(x.shape[1:], generator=g) for g in generators]) * 2 - 1
        noise = noise.to(device=x.device, dtype=x.dtype)
        moved = checked(explain(x + noise * radius * span, target), "the explainer's maps")
        change = (moved - base).flatten(1).norm(dim=1).cpu()
        worst = torch.maximum(worst, change)
    ratio = worst / base_norm.cpu()
    return torch.where(base_norm.cpu() > 0, ratio, torch.full_like(ratio, float("nan"))).float()
