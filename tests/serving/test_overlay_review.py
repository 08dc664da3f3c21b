"""Server overlays read as figures: the caption the worker writes must be whole in the PNG it returns."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def host():
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    return ModelHost(config.models[0], config.cache)


def test_a_contrast_class_overlay_caption_is_not_cut_at_the_png_edge(host) -> None:
    """Guards against the server's caption running off its own 224-px overlay: an Explain with target 180 and
    contrast_class 72 is captioned "SRD 180 American Staffordshire terrier minus 72 'black and gold garden spider'"
    (~410 px of text), drawn on one line and cut after "...terrier minus 7", so the saved PNG no longer says which
    class was subtracted: the very thing the caption exists to state."""
    from ierf.serving.images import canonicalise
    from ierf.serving.worker import ExplainJob

    image = canonicalise(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    outcome = host.explain(ExplainJob(image.pixels, image.content_hash, target=180, contrast=72, overlay=True))
    picture = np.asarray(Image.open(io.BytesIO(outcome.overlays[0])).convert("L"), dtype=np.float64)
    strip_text = 255 - picture[224 + 17 :]  # below the colour ramp: the scale labels and the caption
    assert strip_text[:, -2:].max() < 55, "caption text runs into the overlay's right edge"
