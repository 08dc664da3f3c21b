"""Overlays read by someone who puts them in a paper: text that is whole, a scale that is not invented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ierf.models import imagenet_class_names
from ierf.viz import overlay_signed, saliency_caption
from PIL import Image, ImageDraw, ImageFont

_RAMP_BOTTOM = 17  # strip rows 0..16 hold the colour ramp and its outline; the text is below


def _ink_of(texts: list[str]) -> float:
    """Darkness of each text drawn alone, in full, with the overlay's font."""
    font = ImageFont.load_default()
    total = 0.0
    for text in texts:
        canvas = Image.new("L", (3000, 40), 255)
        ImageDraw.Draw(canvas).text((10, 10), text, fill=0, font=font)
        total += float((255 - np.asarray(canvas, dtype=np.float64)).sum())
    return total


def _text_ink(picture: Image.Image, picture_height: int) -> np.ndarray:
    return 255 - np.asarray(picture.convert("L"), dtype=np.float64)[picture_height + _RAMP_BOTTOM :]


_NAMES = imagenet_class_names()


@pytest.mark.parametrize(
    "caption",
    [
        saliency_caption("srd", 180, _NAMES[180], "mean"),  # "... American Staffordshire terrier minus its mean"
        saliency_caption("srd", 180, _NAMES[180], f"minus 72 {_NAMES[72]!r}"),  # the server's contrast_class caption
    ],
)
def test_a_long_caption_is_drawn_whole_not_cut_at_the_picture_edge(caption: str) -> None:
    """Guards against a caption running off the 224-px picture: "SRD 180 American Staffordshire terrier minus its
    mean" was drawn as "... terrier minus it" (the quantity shown, the mean subtraction, cut away), and the server's
    contrast caption "... minus 72 'black and gold garden spider'" lost a third of its text. 12 ImageNet classes cut
    their "minus its mean" caption, 139 their "minus 285 'Egyptian cat'" one. Wrap it (or widen the strip)."""
    picture = overlay_signed(np.full((224, 224, 3), 128, np.uint8), np.zeros((224, 224)), scale=0.5, caption=caption)
    ink = _text_ink(picture, 224)
    assert ink[:, -2:].max() < 55, "caption text runs into the picture's right edge"
    assert ink.sum() >= 0.97 * _ink_of(["-0.5", "0", "+0.5", caption]), "part of the caption is missing"


@pytest.mark.parametrize(("side", "scale"), [(64, 0.0123), (96, 0.000384)])
def test_scale_labels_of_a_thumbnail_are_not_drawn_over_each_other(side: int, scale: float) -> None:
    """Guards against the fixed-size labels colliding on small pictures: on a 64-px picture (a thumbnail, a
    dashboard tile) "-0.0123", "0" and "+0.0123" were drawn on top of one another ("-0.01‡0123"), and an iERF's
    typical "±0.000384" collides below ~100 px, so the picture no longer states its scale. (At 32 px, CIFAR's
    size, the labels also run off both edges.)"""
    picture = overlay_signed(np.full((side, side, 3), 128, np.uint8), np.zeros((side, side)), scale=scale)
    ink = _text_ink(picture, side)
    assert ink[:, :1].max() < 55 and ink[:, -1:].max() < 55, "label text runs off the picture"
    assert ink.sum() >= 0.97 * _ink_of([f"-{scale:.3g}", "0", f"+{scale:.3g}"]), "labels overlap or are cut"


def test_an_all_zero_map_does_not_claim_a_unit_scale() -> None:
    """Guards against inventing a scale: an all-zero map (a dead PFV, a class with no evidence) is drawn with the
    colour bar "-1 0 +1", the same picture as a map whose values reach ±1 drawn on an explicit scale of 1, so a
    reader cannot tell "nothing here" from "small values". The picture should say the map is zero."""
    image = np.full((224, 224, 3), 128, np.uint8)
    default = np.asarray(overlay_signed(image, np.zeros((224, 224))))
    explicit_unit = np.asarray(overlay_signed(image, np.zeros((224, 224)), scale=1.0))
    assert not np.array_equal(default[224:], explicit_unit[224:]), "a zero map's colour bar reads -1 … +1"


def test_a_bfloat16_tensor_map_is_drawn() -> None:
    """Guards against a crash on a documented input: maps may be "a CPU tensor too", models run in bfloat16 (README),
    but a bfloat16 tensor raised ``TypeError: Got unsupported ScalarType BFloat16`` from numpy."""
    values = torch.linspace(-1, 1, 224 * 224).reshape(224, 224)
    image = np.full((224, 224, 3), 128, np.uint8)
    drawn = overlay_signed(image, values.to(torch.bfloat16), scale=1.0)
    expected = overlay_signed(image, values.to(torch.bfloat16).float(), scale=1.0)
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_the_readme_states_the_scale_rule_the_ierf_pictures_use() -> None:
    """Guards against documenting one scale rule and drawing another: the README says maps are drawn at "the 99th
    percentile of |map|", but iERF pictures (CLI --layer/--position, ComputeIERF overlays) take the percentile over
    the map's non-zero pixels only; for a resnet18 layer1 iERF (3.7 % non-zero) that is 0.0069 where the README's
    rule gives 0.00026, 26x apart, so a reader checking the colour bar against the documented rule is misled."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    at = readme.index("99th percentile of |map|")
    nearby = readme[max(0, at - 400) : at + 400].lower()
    assert "non-zero" in nearby or "support" in nearby or "nonzero" in nearby, nearby


def test_the_scale_labels_of_a_large_picture_stay_legible_when_it_is_shown_at_figure_size() -> None:
    """Guards against a fixed-pixel colour bar on large pictures: a 2000x1500 photo overlay gets the same 12-px bar
    and 10-px labels as a 224-px crop, so once the figure is scaled to a page or dashboard width (~800 px) the
    labels are 2-4 px tall and the scale cannot be read. The labels should grow with the picture (here: text at
    least 1 % of the picture's width tall, i.e. 8 px at 800 px)."""
    side_w, side_h = 2000, 1500
    picture = overlay_signed(np.full((side_h, side_w, 3), 128, np.uint8), np.zeros((30, 40)), scale=0.5)
    strip = 255 - np.asarray(picture.convert("L"), dtype=np.float64)[side_h:]
    # dark rows in the middle half: the "0" label (the ramp is near-white there, its grey outline lighter than 128)
    text_rows = np.flatnonzero(strip[:, side_w // 4 : 3 * side_w // 4].max(1) > 128)
    assert text_rows.size and text_rows.max() - text_rows.min() + 1 >= side_w // 100, text_rows
