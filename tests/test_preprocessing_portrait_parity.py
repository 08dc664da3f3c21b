"""Preprocessing parity with torchvision for portrait photos (phone pictures are mostly portrait)."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms as T
from ierf.images import demo_image, resize_crop
from PIL import Image


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_portrait_photos_get_torchvisions_pixels_as_landscape_ones_do(name: str) -> None:
    """Guards against the box resize drifting from torchvision's Resize(256) + CenterCrop(224) on portrait images:
    the same photo turned upright (600x400 -> 400 wide x 600 high) differed by one level on ~45 % of the crop's
    pixels (chelsea ~47 %), against 0-0.05 % in landscape, while ``Preprocessing.resize_crop`` says "portrait ones
    on up to ~20 %". Pillow's box resize recomputes the vertical filter from the box's float offset, which a crop
    of rows (portrait) meets and a crop of columns (landscape) does not: whole-image resize then crop gives
    torchvision's pixels exactly. The models' weights were evaluated on torchvision's pixels; the landscape test
    in test_models.py holds it to under 1 %."""
    portrait = np.ascontiguousarray(demo_image(name).transpose(1, 0, 2))
    assert portrait.shape[0] > portrait.shape[1]
    ours = resize_crop(portrait, 256, 224).astype(int)
    reference = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.fromarray(portrait))).astype(int)
    differ = (np.abs(ours - reference).max(-1) > 0).mean()
    assert np.abs(ours - reference).max() <= 1
    assert differ < 0.01, f"{differ:.1%} of the crop's pixels differ from torchvision's"
