"""Seeded synthetic localisation set: real digit glyphs pasted onto real photos and textures.

Why synthetic: fidelity metrics need ground truth (where the class evidence is) and a model whose
only class evidence is that object. Public annotated sets (ImageNet-S) are not available offline, so
the project generates its own from material that ships inside installed packages:

* objects: the 8x8 handwritten glyphs of scikit-learn's ``load_digits`` (1797 glyphs, 10 classes),
  upsampled to ``object_size`` pixels, given a random hue with luminance contrast to the local
  background, and alpha-blended at a random position;
* backgrounds: crops of 18 real photos and textures from ``skimage.data`` / scikit-learn
  (images that show text, digits or clock faces are left out, so the background carries no class
  evidence);
* distractors: filled rectangles and ellipses of similar size and colour statistics, placed away
  from the digit. They are salient but carry no class evidence, so a map that merely highlights
  "colourful blobs" does not score on the pointing game.

Ground truth per image: the tight box ``(y0, x0, y1, x1)`` (end exclusive) and the pixel mask of the
glyph. The train/test split is by glyph (a fixed stratified 20 % of glyphs never appears in
training), and the test split uses a different RNG seed. Objects are small next to the canvas
(16-24 px on 96 px) and uniformly placed, so a fixed centre guess hits the box only ~6 % of the time
(measured by :func:`centre_point_hit_rate`: 6.2 % on the 500 test images).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from skimage import data as skdata
from skimage import draw
from skimage.color import gray2rgb
from skimage.transform import rescale, resize

#: Mean and std used to turn uint8 images into model inputs: x = (u8 / 255 - MEAN) / STD.
INPUT_MEAN = 0.5
INPUT_STD = 0.25
#: Seeds: the glyph split is fixed for all time; train and test draw from different generators.
GLYPH_SPLIT_SEED = 2024
TRAIN_SEED = 0
TEST_SEED = 1
HELD_OUT_FRACTION = 0.2
#: Alpha above which a glyph pixel counts as object (mask and box).
MASK_ALPHA = 0.3

_BACKGROUND_LOADERS: tuple[str, ...] = (
    "grass",
    "gravel",
    "brick",
    "moon",
    "coins",
    "cell",
    "camera",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "colorwheel",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Geometry of the generated images. Changing it changes the data set (and invalidates the model)."""

    canvas: int = 96
    object_size: tuple[int, int] = (16, 24)
    max_distractors: int = 2
    distractor_size: tuple[int, int] = (8, 18)

    def __post_init__(self) -> None:
        lo, hi = self.object_size
        if not 4 <= lo <= hi <= self.canvas:
            raise ValueError(f"object_size {self.object_size} must satisfy 4 <= lo <= hi <= canvas")
        if self.max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {self.max_distractors}")


@dataclass
class SyntheticSet:
    """A generated split. Images are uint8 (N, 3, H, W); use :meth:`inputs` for model inputs."""

    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)
    boxes: torch.Tensor  # int64 (N, 4): y0, x0, y1, x1 (end exclusive)
    masks: torch.Tensor  # bool (N, H, W): glyph pixels
    glyph_ids: torch.Tensor  # int64 (N,): index into load_digits
    background_ids: torch.Tensor  # int64 (N,): index into BACKGROUND_NAMES
    split: str
    seed: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Normalised float32 model inputs for ``index`` (all images when None)."""
        images = self.images if index is None else self.images[index]
        return normalize(images)

    def subset(self, index: slice | torch.Tensor) -> SyntheticSet:
        return SyntheticSet(
            images=self.images[index],
            labels=self.labels[index],
            boxes=self.boxes[index],
            masks=self.masks[index],
            glyph_ids=self.glyph_ids[index],
            background_ids=self.background_ids[index],
            split=self.split,
            seed=self.seed,
        )


BACKGROUND_NAMES = _BACKGROUND_LOADERS


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 model input (the TinyResNet's preprocessing)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
    return (images_uint8.float() / 255.0 - INPUT_MEAN) / INPUT_STD


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, as float in [0, 1] (for display)."""
    return (x * INPUT_STD + INPUT_MEAN).clamp(0.0, 1.0)


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


@cache
def glyph_split() -> dict[str, np.ndarray]:
    """Fixed stratified split of the 1797 glyph indices: 80 % train, 20 % held out for test."""
    _, labels = _digits()
    rng = np.random.default_rng(GLYPH_SPLIT_SEED)
    train, test = [], []
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(idx.size)]
        n_test = round(idx.size * HELD_OUT_FRACTION)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _load_background(name: str) -> np.ndarray:
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name.split(":", 1)[1])
    else:
        image = getattr(skdata, name)()
        if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
            image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = gray2rgb(image)
    image = image[..., :3].astype(np.float32)
    return image / 255.0 if image.max() > 1.0 else image


@cache
def _background_pyramid(canvas: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """Each background at 3 scales whose short side is 1.25x, 2x and 3.5x the canvas."""
    pyramid = []
    for name in _BACKGROUND_LOADERS:
        image = _load_background(name)
        levels = []
        for factor in (1.25, 2.0, 3.5):
            scale = min(1.0, factor * canvas / min(image.shape[:2]))
            levels.append(
                rescale(image, scale, channel_axis=-1, anti_aliasing=True).astype(np.float32) if scale < 1.0 else image
            )
        pyramid.append(tuple(levels))
    return tuple(pyramid)


def _random_background(rng: np.random.Generator, canvas: int) -> tuple[np.ndarray, int]:
    pyramid = _background_pyramid(canvas)
    bg_id = int(rng.integers(len(pyramid)))
    level = pyramid[bg_id][int(rng.integers(3))]
    y = int(rng.integers(level.shape[0] - canvas + 1))
    x = int(rng.integers(level.shape[1] - canvas + 1))
    tile = level[y : y + canvas, x : x + canvas].copy()
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    if rng.random() < 0.3:
        tile = tile[::-1]
    # grey textures get a random tint so colour is not a background giveaway
    if np.allclose(tile[..., 0], tile[..., 1]) and np.allclose(tile[..., 1], tile[..., 2]):
        tile = tile * rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    mean = tile.mean()
    contrast = rng.uniform(0.5, 1.2)
    brightness = rng.uniform(-0.15, 0.15)
    tile = (tile - mean) * contrast + mean + brightness
    return np.clip(tile, 0.0, 1.0), bg_id


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting_colour(rng: np.random.Generator, patch_mean: np.ndarray) -> np.ndarray:
    """Random hue whose luminance is about 0.4 or more away from the local background's (before clipping).

    Luminance contrast (not just any RGB distance) keeps the glyph's shape visible to a small CNN
    on every background; with arbitrary colour pairs the model needed several times the steps.
    """
    lum = float(patch_mean @ _LUMA)
    level = rng.uniform(0.0, max(lum - 0.4, 0.0)) if lum > 0.5 else rng.uniform(min(lum + 0.4, 1.0), 1.0)
    hue = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    colour = hue * level / max(float(hue @ _LUMA), 1e-3)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    h, w = alpha.shape
    region = canvas[y : y + h, x : x + w]
    region[:] = region * (1.0 - alpha[..., None]) + colour * alpha[..., None]


def _distractor_alpha(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    alpha = np.zeros((h, w), dtype=np.float32)
    if rng.random() < 0.5:
        rr, cc = draw.rectangle((0, 0), end=(h - 1, w - 1), shape=alpha.shape)
    else:
        rr, cc = draw.ellipse(h / 2 - 0.5, w / 2 - 0.5, h / 2, w / 2, shape=alpha.shape)
    alpha[rr, cc] = rng.uniform(0.7, 1.0)
    return alpha


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def generate(
    split: str,
    n: int,
    seed: int | None = None,
    config: SyntheticConfig | None = None,
) -> SyntheticSet:
    """Generate ``n`` images of ``split`` ("train" or "test"); deterministic given the seed.

    ``seed`` defaults to :data:`TRAIN_SEED` / :data:`TEST_SEED`. Test images only use held-out
    glyphs, so a model can never have memorised a test object.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    config = config or SyntheticConfig()
    seed = (TRAIN_SEED if split == "train" else TEST_SEED) if seed is None else seed
    rng = np.random.default_rng(seed)
    glyphs, glyph_labels = _digits()
    pool = glyph_split()[split]
    size = config.canvas

    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    boxes = np.empty((n, 4), dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    glyph_ids = np.empty(n, dtype=np.int64)
    bg_ids = np.empty(n, dtype=np.int64)
    lo, hi = config.object_size
    for i in range(n):
        canvas, bg_ids[i] = _random_background(rng, size)
        gid = int(pool[rng.integers(pool.size)])
        gh = int(rng.integers(lo, hi + 1))
        gw = int(np.clip(round(gh * rng.uniform(0.8, 1.15)), lo, hi))
        alpha = resize(glyphs[gid], (gh, gw), order=1, mode="edge", anti_aliasing=False)
        alpha = np.clip(alpha * 1.3, 0.0, 1.0).astype(np.float32)
        gy = int(rng.integers(size - gh + 1))
        gx = int(rng.integers(size - gw + 1))
        glyph_box = (gy, gx, gy + gh, gx + gw)

        for _ in range(int(rng.integers(config.max_distractors + 1))):
            dh, dw = (int(v) for v in rng.integers(config.distractor_size[0], config.distractor_size[1] + 1, 2))
            for _attempt in range(10):
                dy, dx = int(rng.integers(size - dh + 1)), int(rng.integers(size - dw + 1))
                if not _boxes_overlap((dy, dx, dy + dh, dx + dw), glyph_box, gap=2):
                    patch_mean = canvas[dy : dy + dh, dx : dx + dw].reshape(-1, 3).mean(0)
                    _blend(canvas, _distractor_alpha(rng, dh, dw), _contrasting_colour(rng, patch_mean), dy, dx)
                    break

        patch_mean = canvas[gy : gy + gh, gx : gx + gw].reshape(-1, 3).mean(0)
        _blend(canvas, alpha, _contrasting_colour(rng, patch_mean), gy, gx)
        mask = alpha > MASK_ALPHA
        masks[i, gy : gy + gh, gx : gx + gw] = mask
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes[i] = (gy + rows[0], gx + cols[0], gy + rows[-1] + 1, gx + cols[-1] + 1)
        images[i] = np.round(canvas * 255.0).astype(np.uint8)
        labels[i] = glyph_labels[gid]
        glyph_ids[i] = gid
    return SyntheticSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels),
        boxes=torch.from_numpy(boxes),
        masks=torch.from_numpy(masks),
        glyph_ids=torch.from_numpy(glyph_ids),
        background_ids=torch.from_numpy(bg_ids),
        split=split,
        seed=seed,
    )


def centre_point_hit_rate(dataset: SyntheticSet) -> float:
    """Pointing-game score of a map whose maximum is always the canvas centre (a layout bias check)."""
    h, w = dataset.images.shape[-2:]
    cy, cx = h // 2, w // 2
    b = dataset.boxes
    hits = (b[:, 0] <= cy) & (cy < b[:, 2]) & (b[:, 1] <= cx) & (cx < b[:, 3])
    return float(hits.float().mean())
