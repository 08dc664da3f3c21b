"""resize_crop's cost must follow the crop it returns, not the image's aspect ratio."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

_MAX_PIXELS = 4096 * 4096  # the service's default pixel cap


def test_a_tall_thin_image_is_not_resized_whole_to_a_gigapixel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16384x1 portrait image is resized *whole* to 256 x 4,194,304 (1.07 Gpx) before its 224x224 centre
    crop is cut: 24 s and 4.4 GB RSS, from a 48 KiB array (the worker and the ingress both call this). The
    landscape path already resamples only the crop box ("wide panoramas cost no memory"); a tall one should
    cost no more, or be refused with ValueError."""
    from ierf.images import resize_crop
    from PIL import Image

    asked: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def guarded(self: Any, size: Any, *args: Any, **kwargs: Any) -> Any:
        if int(size[0]) * int(size[1]) > _MAX_PIXELS:
            asked.append((int(size[0]), int(size[1])))
            raise MemoryError(f"test guard: resize to {size}")
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)
    tall = np.random.default_rng(0).integers(0, 256, (16384, 1, 3), dtype=np.uint8)
    try:
        view = resize_crop(tall, 256, 224)
    except ValueError:
        return  # refusing such an image is fine
    except MemoryError:
        pass
    else:
        assert view.shape == (224, 224, 3)
    assert not asked, f"asked Pillow for a {asked[0][0]}x{asked[0][1]} image to cut a 224x224 crop"
