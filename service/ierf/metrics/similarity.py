"""Similarity of two signed maps (B, H, W), per image: Pearson, SSIM and top-k intersection.

Used by the manipulation attack to say how far a map moved. All three are scale-invariant, so maps
of different methods need no common normalisation.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ierf.metrics._checks import check_fraction, check_maps, check_same_shape


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the signed pixel values; 0 where either map is constant."""
    a, b = check_maps(a, "a"), check_maps(b, "b")
    check_same_shape(a, b)  # before flattening: a transposed map has the same pixel count, not the same pixels
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom)).float()


SSIM_WINDOW = 7  # scikit-image's default window side


def check_ssim_size(size: tuple[int, ...] | torch.Size) -> None:
    """SSIM needs maps at least as large as its window in both directions."""
    if min(size) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (its window), got {size[0]}x{size[1]}"
        )


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (scikit-image, 7x7 window) after scaling each map by its own max |value| into [-1, 1].

    data_range = 2 (the span of [-1, 1]); an all-zero map stays zero. Negating a map flips SSIM's structure
    term, but its luminance term flips too only where local means are large next to its constant
    (0.01 x 2)^2: a map and its exact negation, where Pearson says -1, may score high (a smooth positive blob:
    0.65 in a test) or near zero (real SRD maps, small means: -0.07 to 0.22). SSIM does not reliably see the
    sign: read it with :func:`pearson`, which does. Maps smaller than the window (7x7) are refused.
    """
    a, b = check_maps(a, "a"), check_maps(b, "b")
    check_same_shape(a, b)
    check_ssim_size(a.shape[-2:])

    def unit(m: torch.Tensor) -> np.ndarray:
        peak = float(m.abs().max())
        return (m / peak).double().cpu().numpy() if peak > 0 else m.double().cpu().numpy()

    scores = [structural_similarity(unit(x), unit(y), data_range=2.0) for x, y in zip(a, b, strict=True)]
    return torch.tensor(scores, dtype=torch.float32)


def top_k_intersection(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Share of the k most positive pixels of ``a`` that are also among the k most positive of ``b``.

    k = round(fraction x H x W). Signed: "most positive" = strongest evidence for the class. Pixels tied
    at a map's k-th value count fractionally (each is in its top k with the probability a random tie
    break would give), as in the pointing game: picking tied pixels in index order put the same ones in
    both sets, so two maps with disjoint positive pixels, or two all-zero maps, overlapped by chance.
    """
    a, b = check_maps(a, "a"), check_maps(b, "b")
    check_same_shape(a, b)
    if not 0.0 < check_fraction(fraction, "fraction") <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = a[0].numel()
    k = max(1, round(fraction * n))
    return (_top_k_weights(a, k) * _top_k_weights(b, k)).sum(1).float() / k


def _top_k_weights(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) probability that each pixel is among the k largest under a uniformly random tie break."""
    flat = maps.flatten(1).double()
    kth = flat.topk(k, dim=1).values[:, -1:]  # the k-th largest value
    above = flat > kth
    tied = flat == kth
    free = k - above.sum(1, keepdim=True)  # places left for the tied pixels
    share = free / tied.sum(1, keepdim=True)
    return above.double() + tied.double() * share
