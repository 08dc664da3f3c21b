"""Localisation metrics: pointing game and energy-in-box (attribution localisation).

Both compare a signed (B, H, W) map with a ground-truth region, given as boolean masks (B, H, W)
or boxes (B, 4) ``(y0, x0, y1, x1)`` with exclusive ends.
"""

from __future__ import annotations

import torch

from ierf.metrics._checks import check_maps


def boxes_to_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 4) boxes (y0, x0, y1, x1), end exclusive -> (B, H, W) bool masks."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
    h, w = size
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"boxes must hold pixel coordinates, got dtype {boxes.dtype}")
    # whole-number floats are pixel coordinates too; 3.7 or NaN is not
    if boxes.is_floating_point() and not (bool(torch.isfinite(boxes).all()) and bool((boxes == boxes.round()).all())):
        raise ValueError(f"boxes must be whole pixel coordinates, got {boxes.tolist()[:2]}")
    b = boxes.to(torch.long)
    if (b[:, 0] >= b[:, 2]).any() or (b[:, 1] >= b[:, 3]).any():
        raise ValueError("every box needs y0 < y1 and x0 < x1")
    # A box wholly outside the image would score 0 for every map, as if the method had missed
    outside = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= h) | (b[:, 1] >= w)
    if bool(outside.any()):
        raise ValueError(f"box {b[outside][0].tolist()} lies outside the {h}x{w} map")
    rows = torch.arange(h, device=b.device)[None, :, None]
    cols = torch.arange(w, device=b.device)[None, None, :]
    return (
        (rows >= b[:, 0, None, None])
        & (rows < b[:, 2, None, None])
        & (cols >= b[:, 1, None, None])
        & (cols < b[:, 3, None, None])
    )


def _regions(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    if not isinstance(regions, torch.Tensor):
        raise TypeError(
            f"regions must be a torch.Tensor of (B, 4) boxes or (B, H, W) bool masks, got {type(regions).__name__}"
        )
    if (
        regions.dim() == 2
        and (regions.dtype == torch.bool or regions.shape == maps.shape[-2:])
        and regions.shape[1] != 4
    ):
        raise ValueError(
            f"masks must be (B, H, W), one per map; got one {tuple(regions.shape)} mask: give each of the "
            f"{maps.shape[0]} maps its own (e.g. mask.expand({maps.shape[0]}, *mask.shape))"
        )
    if regions.dim() == 2:
        if regions.shape != (maps.shape[0], 4):
            raise ValueError(f"boxes must have shape ({maps.shape[0]}, 4), got {tuple(regions.shape)}")
        return boxes_to_masks(regions, tuple(maps.shape[-2:])).to(maps.device)
    if regions.shape != maps.shape:
        raise ValueError(f"masks must match maps {tuple(maps.shape)}, got {tuple(regions.shape)}")
    if regions.dtype != torch.bool:
        raise TypeError(f"masks must be bool, got {regions.dtype}")
    empty = ~regions.flatten(1).any(1)
    if bool(empty.any()):
        raise ValueError(f"mask {int(empty.nonzero()[0])} is empty: there is no region to point at")
    return regions.to(maps.device)


def pointing_game(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Per image: 1 if the map's maximum lies in the region, else 0 (Zhang et al. 2016, but with no
    tolerance: they count a hit within 15 px of the region; callers average over images, not per class).

    The maximum of the *signed* map is used (the most positive evidence). When several pixels
    share the maximum (e.g. a constant or ReLU-flattened map), the score is the fraction of those
    pixels inside the region - the expected hit of a random tie-break - so ties neither help nor
    hurt systematically. Returns float (B,).
    """
    maps = check_maps(maps)
    masks = _regions(maps, regions)
    flat = maps.flatten(1)
    at_max = flat == flat.max(dim=1, keepdim=True).values
    return (at_max & masks.flatten(1)).sum(1).float() / at_max.sum(1).float()


def energy_in_box(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Per image: positive attribution mass inside the region / total positive mass.

    Uses the positive part max(map, 0) (the evidence *for* the class; negative evidence is not
    "energy" in this metric, and taking |map| would reward strong counter-evidence in the box).
    A map with no positive mass scores 0. Returns float (B,) in [0, 1].
    """
    maps = check_maps(maps)
    masks = _regions(maps, regions)
    positive = maps.double().clamp_min(0.0).flatten(1)  # float64 sums: float16 maps overflowed to NaN
    total = positive.sum(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)).float()
