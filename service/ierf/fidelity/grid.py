"""Grid pointing game on real photos with a real pretrained model (Böhle et al. 2022 style).

No annotated data exists offline, so localisation ground truth is built from what the model itself
classifies confidently: each offline photo the model assigns a top-1 probability >= ``min_prob``
becomes one 224² cell; four such photos with four *different* top-1 classes are tiled into a 448²
2x2 grid (every 4-subset, each in ``orders`` arrangements). For each cell, the target is that
photo's class and the ground-truth region is the cell. A faithful map for class c puts its
positive evidence in c's cell; chance is 0.25. Convolutional models with global pooling take the
448² input directly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ierf.images import demo_image, demo_images

#: Extra offline RGB photos tried besides the demo images (kept only if classified confidently).
EXTRA_SKIMAGE = ("hubble_deep_field", "immunohistochemistry", "retina", "colorwheel")


@dataclass(frozen=True)
class GridImage:
    name: str
    pixels: torch.Tensor  # normalised (3, S, S)
    label: int
    prob: float


@dataclass
class GridCases:
    """``grids`` (G, 3, 2S, 2S); per (grid, cell) case: grid index, target class, cell box."""

    grids: torch.Tensor
    grid_index: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) y0, x0, y1, x1 (end exclusive)
    names: list[tuple[str, ...]]  # per grid: image name in cells 0..3 (row-major)
    images: list[GridImage]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def candidate_photos() -> dict[str, np.ndarray]:
    """Every real offline photo considered: the bundled demo images plus a few more skimage photos."""
    import skimage.data

    photos = {name: demo_image(name) for name in demo_images()}
    for name in EXTRA_SKIMAGE:
        photos[name] = np.asarray(getattr(skimage.data, name)())[..., :3]
    return photos


@torch.no_grad()
def confident_images(
    model: nn.Module,
    preprocess: Callable[[np.ndarray], torch.Tensor],
    photos: dict[str, np.ndarray] | None = None,
    min_prob: float = 0.25,
) -> list[GridImage]:
    """Photos whose top-1 probability is >= ``min_prob``; among photos sharing a top-1 class the most
    confident one is kept (cells of a grid must have distinct classes)."""
    photos = candidate_photos() if photos is None else photos
    best: dict[int, GridImage] = {}
    for name, photo in photos.items():
        pixels = preprocess(photo)
        probs = model(pixels[None]).softmax(1)[0]
        prob, label = float(probs.max()), int(probs.argmax())
        if prob >= min_prob and (label not in best or prob > best[label].prob):
            best[label] = GridImage(name=name, pixels=pixels, label=label, prob=prob)
    return sorted(best.values(), key=lambda image: image.name)


def build_grids(images: list[GridImage], orders: int = 2) -> GridCases:
    """All 4-subsets of ``images``, each in ``orders`` cyclic arrangements (order k shifts cells by k).

    With 6 images and 2 orders: 15 x 2 = 30 grids, 120 (grid, cell) cases.
    """
    if len(images) < 4:
        raise ValueError(f"need at least 4 confidently classified images, got {len(images)}")
    if not 1 <= orders <= 4:
        raise ValueError(f"orders must be in 1..4, got {orders}")
    size = images[0].pixels.shape[-1]
    grids, grid_index, targets, boxes, names = [], [], [], [], []
    cell_origin = [(0, 0), (0, size), (size, 0), (size, size)]
    for subset in itertools.combinations(images, 4):
        for shift in range(orders):
            cells = subset[shift:] + subset[:shift]
            grid = torch.empty(3, 2 * size, 2 * size)
            for (y, x), image in zip(cell_origin, cells, strict=True):
                grid[:, y : y + size, x : x + size] = image.pixels
                grid_index.append(len(grids))
                targets.append(image.label)
                boxes.append((y, x, y + size, x + size))
            grids.append(grid)
            names.append(tuple(image.name for image in cells))
    return GridCases(
        grids=torch.stack(grids),
        grid_index=torch.tensor(grid_index),
        targets=torch.tensor(targets),
        boxes=torch.tensor(boxes),
        names=names,
        images=list(images),
    )
