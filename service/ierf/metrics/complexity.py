"""Sparseness: the Gini index of attribution magnitudes (Chalasani et al. 2020).

Taking |map| is part of this metric's definition: sparseness asks how concentrated the
attribution *magnitude* is, whatever its sign (strong negative evidence is as much "a few pixels
matter" as strong positive evidence). No other metric here uses absolute values.
"""

from __future__ import annotations

import torch

from ierf.metrics._checks import check_maps


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Per image Gini index of |map| in [0, 1): 0 for a uniform map, (n-1)/n for a single pixel.

    G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i)) with a_(1) <= ... <= a_(n). An all-zero map
    has no concentration and scores 0. Returns float (B,).
    """
    maps = check_maps(maps)
    values = maps.abs().flatten(1).double().sort(dim=1).values
    n = values.shape[1]
    index = torch.arange(1, n + 1, dtype=values.dtype, device=values.device)
    total = values.sum(1)
    weighted = ((2 * index - n - 1) * values).sum(1)
    return torch.where(total > 0, weighted / (n * total.clamp_min(1e-300)), torch.zeros_like(total)).float()
