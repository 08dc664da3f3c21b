"""Pictures of signed maps (numpy + PIL only, so the service and CLI need no plotting stack).

Colour rule (the same for saliency and iERF maps): a diverging blue–white–red scale, symmetric about
zero. A value v is shown as ``colour(clip(v / scale, -1, 1))``: pure white at exactly 0, red for
positive, blue for negative; colour(-v) is colour(v) with red and blue swapped. ``scale`` defaults to a high
percentile of |map| (99th: one hot pixel cannot wash out the rest; above it everything saturates);
pass ``scale=`` to compare several maps on one scale. The colours are blended over the greyscaled,
dimmed image, and a colour bar strip states the scale.

Size rule: a map is assumed to cover the same field of view as the image (e.g. the model's 224² crop).
If its size differs it is resized to the image size with PIL bilinear resampling (pixel centres
aligned, antialiased when shrinking) after the scale has been taken on the original map. Aspect
ratios more than 2 % apart are refused: that is almost always a map drawn over the wrong crop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ierf.images import ImageLike, to_rgb_array

# Positive half: ColorBrewer RdBu's reds, from the pure-white centre (0) to dark red (1). The negative
# half is the same scale with red and blue swapped, so +v and -v are exact mirror colours.
_POSITIVE_COLOURS = np.array(
    [(255, 255, 255), (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31)],
    dtype=np.float64,
)
_POSITIVE_VALUES = np.linspace(0.0, 1.0, len(_POSITIVE_COLOURS))
_ASPECT_TOLERANCE = 0.02
_BAR_HEIGHT = 12
_TEXT_HEIGHT = 16
_BAR_MARGIN = 4


def diverging_colours(normalised: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] (clipped) -> uint8 RGB (..., 3); 0 is exactly white."""
    values = np.clip(np.asarray(normalised, dtype=np.float64), -1.0, 1.0)
    magnitude = np.abs(values)
    channels = [np.interp(magnitude, _POSITIVE_VALUES, _POSITIVE_COLOURS[:, c]) for c in range(3)]
    colours = np.rint(np.stack(channels, axis=-1)).astype(np.uint8)
    negative = values < 0
    colours[negative] = colours[negative][:, ::-1]
    return colours


def symmetric_scale(values: np.ndarray, percentile: float = 99.0, support_only: bool = False) -> float:
    """The |value| mapped to full colour: ``percentile`` of |values| (of the non-zero ones if
    ``support_only``), falling back to max |values| when that is 0, and to 1 for an all-zero map."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    magnitudes = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    if support_only:
        magnitudes = magnitudes[magnitudes > 0]
    if magnitudes.size == 0:
        return 1.0
    scale = float(np.percentile(magnitudes, percentile))
    if scale <= 0.0:
        scale = float(magnitudes.max())
    return scale if scale > 0.0 else 1.0


def _as_map(signed_map: Any) -> np.ndarray:
    if hasattr(signed_map, "detach"):  # a tensor, also one SRD returns attached to autograd (x.requires_grad)
        signed_map = signed_map.detach().cpu()
        if signed_map.is_floating_point() and signed_map.element_size() < 4:  # numpy has no bfloat16
            signed_map = signed_map.float()
    values = np.asarray(signed_map, dtype=np.float64)
    while values.ndim > 2 and values.shape[0] == 1:  # (1, H, W) or (1, 1, H, W) from a batch
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"map must be 2-D (H, W), got shape {tuple(np.shape(signed_map))}")
    if values.size == 0:
        raise ValueError(f"map is empty, shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("map contains NaN or infinite values")
    return values


def resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map to (height, width) under the module's size rule."""
    map_h, map_w = values.shape
    if (map_h, map_w) == (height, width):
        return values
    map_aspect, image_aspect = map_w / map_h, width / height
    if abs(map_aspect / image_aspect - 1.0) > _ASPECT_TOLERANCE:
        raise ValueError(
            f"map {map_h}x{map_w} and image {height}x{width} have different aspect ratios; "
            "draw the map over the image it was computed on (the model's crop)"
        )
    resized = Image.fromarray(values.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float64)


def _background(rgb: np.ndarray, dim: float) -> np.ndarray:
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma
    return np.repeat((grey * dim)[..., None], 3, axis=-1)


def overlay_signed(
    image: ImageLike,
    signed_map: Any,
    alpha: float = 0.65,
    *,
    scale: float | None = None,
    percentile: float = 99.0,
    dim: float = 0.6,
    colorbar: bool = True,
    caption: str | None = None,
) -> Image.Image:
    """Signed map over an image: ``(1 - alpha) * dimmed grey image + alpha * colour(map / scale)``.

    ``signed_map`` is anything numpy can read as (H, W) (a CPU tensor too). With ``colorbar`` a strip
    under the picture shows the colours for -scale … 0 … +scale and ``caption``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")
    rgb = to_rgb_array(image)
    values = _as_map(signed_map)
    all_zero = scale is None and not values.any()  # no scale to state: the strip says the map is zero
    if scale is None:
        scale = symmetric_scale(values, percentile)
    elif not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    values = resize_map(values, rgb.shape[0], rgb.shape[1])
    colours = diverging_colours(values / scale).astype(np.float64)
    blended = (1.0 - alpha) * _background(rgb, dim) + alpha * colours
    picture = Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8))
    return _with_colorbar(picture, scale, caption, all_zero) if colorbar else picture


def render_ierf(
    image: ImageLike,
    ierf_map: Any,
    alpha: float = 0.75,
    *,
    mark: tuple[int, int, int, int] | None = None,
    scale: float | None = None,
    percentile: float = 99.0,
    colorbar: bool = True,
    caption: str | None = None,
) -> Image.Image:
    """An iERF over the image. iERFs sum to 1 but may hold negative entries, so they use the same
    signed colours; the default scale is taken over the map's support (its non-zero pixels), since
    an iERF is often zero on most of the image. ``mark`` = (top, left, bottom, right) outlines the
    PFV's own cell in image pixels (see :func:`feature_cell_box`)."""
    values = _as_map(ierf_map)
    all_zero = scale is None and not values.any()
    if scale is None:
        scale = symmetric_scale(values, percentile, support_only=True)
    picture = overlay_signed(image, values, alpha, scale=scale, colorbar=False)
    if mark is not None:
        top, left, bottom, right = mark
        draw = ImageDraw.Draw(picture)
        draw.rectangle((left - 1, top - 1, right, bottom), outline=(0, 0, 0), width=2)
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 0), width=1)
    return _with_colorbar(picture, scale, caption, all_zero) if colorbar else picture


def saliency_caption(method: str, target: int, name: str, contrast: str = "identity") -> str:
    """The caption under a class map: a contrastive map is another quantity (it sums to a logit gap, not to
    the logit), and the picture is read without the request beside it. ``contrast``: "identity", "mean", or
    what was subtracted (e.g. "minus 968 'cup'")."""
    caption = f"{method.upper()} {target} {name}"
    if contrast == "identity":
        return caption
    return f"{caption} minus its mean" if contrast == "mean" else f"{caption} {contrast}"


def feature_cell_box(
    position: tuple[int, int], feature_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The image pixels (top, left, bottom, right), end-exclusive, that a feature-map cell nominally
    covers when an (h, w) map is stretched over the image: rows row*H/h … (row+1)*H/h."""
    (row, col), (feat_h, feat_w), (img_h, img_w) = position, feature_hw, image_hw
    if not (0 <= row < feat_h and 0 <= col < feat_w):
        raise ValueError(f"position ({row}, {col}) is outside the {feat_h}x{feat_w} feature map")
    return (
        row * img_h // feat_h,
        col * img_w // feat_w,
        max((row + 1) * img_h // feat_h, row * img_h // feat_h + 1),
        max((col + 1) * img_w // feat_w, col * img_w // feat_w + 1),
    )


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Any, width: float) -> list[str]:
    """``text`` in lines no wider than ``width``: broken at spaces, a word wider than a line at characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and draw.textlength(line + char, font=font) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def _with_colorbar(picture: Image.Image, scale: float, caption: str | None, all_zero: bool = False) -> Image.Image:
    """The picture above a strip: the colour ramp, its scale (-scale, 0, +scale: side by side where they fit,
    else one per line) and the caption wrapped to the width. Text grows with wide pictures, so a large
    overlay shown at figure size keeps a legible scale; ``all_zero`` says the map is zero instead of
    stating a scale it does not have."""
    width, height = picture.size
    grow = max(1.0, width / 640)  # 10-px text up to 640 px wide, then ~1.6 % of the width (digits ~1.2 %)
    font = ImageFont.load_default(size=round(10 * grow))
    line_height = round(_TEXT_HEIGHT * grow)
    bar_height = round(_BAR_HEIGHT * grow)
    # at least two ramp columns inside the frame (its -1 and +1 ends), one for a 1-pixel-wide picture
    margin = max(min(round(_BAR_MARGIN * grow), (width - 2) // 2), 0)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    usable = max(width - 2 * margin, 1)
    if all_zero:
        labels = [("the map is 0 everywhere", "centre")]
    else:
        labels = [(f"-{scale:.3g}", "left"), ("0", "centre"), (f"+{scale:.3g}", "right")]
    side_by_side = sum(probe.textlength(t, font=font) for t, _ in labels) + 2 * probe.textlength(" ", font=font)
    label_rows = [labels] if side_by_side <= usable else [[label] for label in labels]
    caption_lines = _wrap(caption, probe, font, usable) if caption else []
    text_rows = len(label_rows) + len(caption_lines)
    strip = Image.new("RGB", (width, bar_height + text_rows * line_height + 2 * margin), (255, 255, 255))
    ramp = diverging_colours(np.linspace(-1.0, 1.0, max(width - 2 * margin, 2)))
    strip.paste(Image.fromarray(np.repeat(ramp[None], bar_height, axis=0)), (margin, margin))
    draw = ImageDraw.Draw(strip)
    draw.rectangle((margin - 1, margin - 1, width - margin, margin + bar_height), outline=(128, 128, 128))
    y = margin + bar_height + 2
    for row in label_rows:
        for text, where in row:
            length = draw.textlength(text, font=font)
            x = {"left": margin, "centre": (width - length) / 2, "right": width - margin - length}[where]
            draw.text((max(x, 0), y), text, fill=(0, 0, 0), font=font)
        y += line_height
    for line in caption_lines:
        draw.text((margin, y), line, fill=(0, 0, 0), font=font)
        y += line_height
    out = Image.new("RGB", (width, height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, height))
    return out
