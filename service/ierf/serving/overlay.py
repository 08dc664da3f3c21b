"""Rendered overlays for responses: the same pictures as the CLI (:mod:`ierf.viz`), as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # speed over size: the overlay is a preview
    return buffer.getvalue()


def saliency_png(view: np.ndarray, saliency: np.ndarray, caption: str) -> bytes:
    from ierf.viz import overlay_signed

    return png_bytes(overlay_signed(view, saliency, caption=caption))


def ierf_png(
    view: np.ndarray, erf: np.ndarray, position: tuple[int, int], feature_hw: tuple[int, int], caption: str
) -> bytes:
    from ierf.viz import feature_cell_box, render_ierf

    box = feature_cell_box(position, feature_hw, (view.shape[0], view.shape[1]))
    return png_bytes(render_ierf(view, erf, mark=box, caption=caption))
