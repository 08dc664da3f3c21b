"""Overlays: colour rule, scale rule, size rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ierf.images import demo_image
from ierf.viz import (
    diverging_colours,
    feature_cell_box,
    overlay_signed,
    render_ierf,
    resize_map,
    symmetric_scale,
)
from PIL import Image


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return demo_image("coffee")[:224, 100:324]


def _blend(image: np.ndarray, colour, alpha: float, dim: float = 0.6) -> np.ndarray:
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.rint((1 - alpha) * grey[..., None] * dim + alpha * np.asarray(colour, dtype=np.float64))


def test_zero_is_exactly_white_and_ends_are_saturated():
    colours = diverging_colours(np.array([-5.0, -1.0, 0.0, 1.0, 5.0]))
    assert colours[2].tolist() == [255, 255, 255]
    assert colours[0].tolist() == colours[1].tolist() == [31, 0, 103]  # clipped to -1
    assert colours[3].tolist() == colours[4].tolist() == [103, 0, 31]


def test_colours_are_mirror_symmetric_and_monotone():
    values = np.linspace(0.0, 1.0, 101)
    positive, negative = diverging_colours(values), diverging_colours(-values)
    assert np.array_equal(negative, positive[:, ::-1])
    assert (positive[1:, 0] >= positive[1:, 2]).all()  # red side is red
    lightness = positive.astype(int).sum(axis=1)
    assert (np.diff(lightness) <= 0).all()  # stronger values are darker, never lighter


def test_scale_rule():
    values = np.concatenate([np.linspace(-1, 1, 999), [100.0]])
    assert symmetric_scale(values) == pytest.approx(np.percentile(np.abs(values), 99))
    assert symmetric_scale(values, percentile=100) == 100.0
    sparse = np.zeros(1000)
    sparse[3] = -2.0
    assert symmetric_scale(sparse) == 2.0  # 99th percentile is 0: fall back to the max
    assert symmetric_scale(np.zeros(10)) == 1.0
    assert symmetric_scale(np.array([0, 0, 0, 4.0, 2.0]), percentile=50, support_only=True) == 3.0
    with pytest.raises(ValueError, match="percentile"):
        symmetric_scale(values, percentile=0)


def test_zero_map_is_white_blended_over_the_dimmed_image(image):
    picture = overlay_signed(image, np.zeros((224, 224)), alpha=0.5, colorbar=False)
    assert picture.size == (224, 224)
    expected = _blend(image, (255, 255, 255), 0.5)
    assert np.abs(np.asarray(picture).astype(int) - expected).max() <= 1


def test_signed_map_is_red_where_positive_blue_where_negative(image):
    signed = np.zeros((224, 224))
    signed[:, :112] = 1.0
    signed[:, 112:] = -1.0
    picture = np.asarray(overlay_signed(image, signed, alpha=1.0, colorbar=False)).astype(int)
    assert (picture[:, :112] == [103, 0, 31]).all()
    assert (picture[:, 112:] == [31, 0, 103]).all()


def test_mirrored_map_gives_mirrored_colours(image):
    rng = np.random.default_rng(0)
    signed = rng.normal(size=(224, 224))
    plus = np.asarray(overlay_signed(np.zeros_like(image), signed, alpha=1.0, colorbar=False))
    minus = np.asarray(overlay_signed(np.zeros_like(image), -signed, alpha=1.0, colorbar=False))
    assert np.array_equal(plus, minus[:, :, ::-1])


def test_small_map_is_resized_bilinearly_to_the_image(image):
    coarse = np.zeros((7, 7))
    coarse[3, 3] = 1.0
    picture = overlay_signed(image, coarse, alpha=1.0, scale=1.0, colorbar=False)
    assert picture.size == (224, 224)
    upsampled = resize_map(coarse, 224, 224)
    assert upsampled.shape == (224, 224)
    peak = np.unravel_index(upsampled.argmax(), upsampled.shape)
    assert peak in {(111, 111), (111, 112), (112, 111), (112, 112)}
    assert upsampled[0, 0] == 0.0
    pixels = np.asarray(picture)
    assert pixels[112, 112, 0] > pixels[112, 112, 2] and pixels[0, 0].tolist() == [255, 255, 255]


def test_map_formats_and_errors(image):
    as_tensor = torch.zeros(1, 224, 224)
    assert overlay_signed(image, as_tensor, colorbar=False).size == (224, 224)
    with pytest.raises(ValueError, match="2-D"):
        overlay_signed(image, np.zeros((2, 224, 224)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        overlay_signed(image, np.full((224, 224), np.nan))
    with pytest.raises(ValueError, match="aspect ratios"):
        overlay_signed(image, np.zeros((224, 300)))
    with pytest.raises(ValueError, match="alpha"):
        overlay_signed(image, np.zeros((224, 224)), alpha=1.5)
    with pytest.raises(ValueError, match="scale"):
        overlay_signed(image, np.zeros((224, 224)), scale=0.0)


def test_colorbar_strip_shows_the_ramp(image):
    noise = np.random.default_rng(1).normal(size=(56, 56))
    picture = overlay_signed(image, noise, caption="SRD 967 espresso")
    width, height = picture.size
    assert width == 224 and height > 224
    strip = np.asarray(picture)[224:]
    ramp_row = strip[8]  # inside the bar
    assert ramp_row[10, 2] > ramp_row[10, 0]  # blue end on the left
    assert ramp_row[-10, 0] > ramp_row[-10, 2]  # red end on the right
    assert ramp_row[112].min() >= 250  # white at the centre


def test_render_ierf_uses_the_support_scale_and_marks_the_cell(image):
    erf = np.zeros((224, 224))
    erf[96:128, 96:128] = 1.0 / 1024
    box = feature_cell_box((3, 3), (7, 7), (224, 224))
    assert box == (96, 96, 128, 128)
    picture = render_ierf(image, erf, alpha=1.0, mark=box, colorbar=False)
    pixels = np.asarray(picture)
    assert pixels[110, 110].tolist() == [103, 0, 31]  # full colour inside the support
    assert pixels[10, 10].tolist() == [255, 255, 255]
    assert pixels[95, 110].tolist() == [0, 0, 0]  # outline just outside the cell
    assert isinstance(render_ierf(image, erf), Image.Image)


def test_feature_cell_box_bounds():
    assert feature_cell_box((0, 0), (14, 14), (224, 224)) == (0, 0, 16, 16)
    assert feature_cell_box((0, 6), (7, 7), (224, 300)) == (0, 257, 32, 300)
    with pytest.raises(ValueError, match="outside the 7x7"):
        feature_cell_box((7, 0), (7, 7), (224, 224))


def test_non_square_map_is_resized_to_height_by_width() -> None:
    """PIL sizes are (width, height): a landscape map over a landscape image keeps its orientation."""
    wide = demo_image("coffee")[:200, :300]
    coarse = np.zeros((20, 30))
    coarse[:, :15] = 1.0  # left half positive
    assert resize_map(coarse, 200, 300).shape == (200, 300)
    pixels = np.asarray(overlay_signed(wide, coarse, alpha=1.0, scale=1.0, colorbar=False))
    assert pixels.shape == (200, 300, 3)
    assert pixels[100, 10].tolist() == [103, 0, 31] and pixels[100, 290].tolist() == [255, 255, 255]


def test_default_scale_is_taken_on_the_map_before_resizing(image: np.ndarray) -> None:
    """As the module says: the scale comes from the original map; bilinear upsampling smooths peaks and
    would lower the 99th percentile, saturating more of the picture than the colour bar says."""
    coarse = np.random.default_rng(2).normal(size=(14, 14))
    default = overlay_signed(image, coarse, colorbar=False)
    explicit = overlay_signed(image, coarse, scale=symmetric_scale(coarse), colorbar=False)
    assert np.array_equal(np.asarray(default), np.asarray(explicit))


def test_render_ierf_scale_ignores_the_zero_pixels(image: np.ndarray) -> None:
    """An iERF's default scale is the percentile of its *non-zero* pixels; over all pixels it differs as
    soon as the support covers more than 1 % of the image with uneven values."""
    erf = np.zeros((224, 224))
    erf[:, :112] = np.linspace(0.1, 1.0, 112)[None, :]  # half the image, a ramp
    support = symmetric_scale(erf, support_only=True)
    assert support != symmetric_scale(erf)  # the case really tells the two rules apart
    expected = overlay_signed(image, erf, alpha=0.75, scale=support, colorbar=False)
    assert np.array_equal(np.asarray(render_ierf(image, erf, colorbar=False)), np.asarray(expected))


def test_service_ierf_overlay_marks_the_row_col_cell() -> None:
    """ierf_png outlines PFV (row, col): read back from the picture, not only its size."""
    from ierf.serving.overlay import ierf_png

    view = np.full((224, 224, 3), 128, np.uint8)
    erf = np.zeros((224, 224), np.float32)
    png = ierf_png(view, erf, (1, 5), (7, 7), "caption")
    pixels = np.asarray(Image.open(io.BytesIO(png)))[:224]
    top, left, _bottom, right = feature_cell_box((1, 5), (7, 7), (224, 224))
    assert (top, left) == (32, 160)
    assert pixels[top - 1, (left + right) // 2].tolist() == [0, 0, 0]  # outline above the (1, 5) cell
    assert pixels[top, (left + right) // 2].tolist() == [255, 255, 0]  # its yellow inner line
    assert pixels[5 * 32, 32 + 16].tolist() != [255, 255, 0]  # not the (5, 1) cell


def test_feature_cell_box_is_never_empty_when_the_map_is_finer_than_the_image() -> None:
    """Guards against dropping the one-pixel floor: a 14x14 cell drawn over a 7x7 thumbnail had top == bottom,
    an empty box (no outline to see)."""
    top, left, bottom, right = feature_cell_box((2, 4), (14, 14), (7, 7))
    assert (top, left) == (1, 2)
    assert bottom - top == 1 and right - left == 1


def test_feature_cell_box_scales_rows_and_cols_by_their_own_grid_sides() -> None:
    """Guards against dividing the columns by the grid's height (or rows by its width): every test grid was
    square, so an outline drawn at the wrong column on a non-square layer (e.g. a landscape input) went unseen."""
    assert feature_cell_box((1, 3), (4, 8), (224, 224)) == (56, 84, 112, 112)
    assert feature_cell_box((3, 1), (8, 4), (224, 224)) == (84, 56, 112, 112)


def test_colorbar_labels_read_minus_scale_at_the_blue_end_and_plus_at_the_red_end(image: np.ndarray) -> None:
    """Guards against swapped labels: the ramp is blue on the left, so the left label must be -scale and the right
    +scale, or a reader takes every red region for a negative contribution."""
    from PIL import ImageDraw, ImageFont

    picture = overlay_signed(image, np.zeros((224, 224)), scale=0.5)
    strip = picture.crop((0, 224, picture.width, picture.height))
    font = ImageFont.load_default()
    text_y = 4 + 12 + 2  # margin, bar, gap

    def labelled(left: str, right: str) -> np.ndarray:
        canvas = Image.new("RGB", strip.size, (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, text_y), left, fill=(0, 0, 0), font=font)
        draw.text((strip.width - 4 - draw.textlength(right, font=font), text_y), right, fill=(0, 0, 0), font=font)
        return np.asarray(canvas)[text_y:, list(range(0, 60)) + list(range(strip.width - 60, strip.width))]

    drawn = np.asarray(strip)[text_y:, list(range(0, 60)) + list(range(strip.width - 60, strip.width))]
    assert np.array_equal(drawn, labelled("-0.5", "+0.5"))
    assert not np.array_equal(drawn, labelled("+0.5", "-0.5"))


def test_an_ierf_straight_from_the_engine_batch_is_drawn(image: np.ndarray) -> None:
    """Guards against unwrapping only one leading batch axis: ``decomposition.ierf(layer, positions)`` is
    (N, P, H, W), and its (1, 1, H, W) result must draw as the (H, W) map, not be refused as 3-D."""
    erf = torch.zeros(1, 1, 224, 224)
    erf[0, 0, 100:120, 100:120] = 1 / 400
    drawn = render_ierf(image, erf, colorbar=False)
    assert np.array_equal(np.asarray(drawn), np.asarray(render_ierf(image, erf[0, 0].numpy(), colorbar=False)))


def test_the_caption_gets_its_own_row_under_the_scale_labels(image: np.ndarray) -> None:
    """Guards against not reserving the caption's row: the caption ("SRD 967 espresso", the class the map is of)
    was drawn below the strip's bottom edge and cut off, leaving a picture that does not say what it shows."""
    plain = overlay_signed(image, np.zeros((224, 224)), scale=1.0)
    captioned = overlay_signed(image, np.zeros((224, 224)), scale=1.0, caption="SRD 967 espresso")
    assert captioned.height == plain.height + 16
    caption_row = np.asarray(captioned)[plain.height - 4 :, :120]  # below the labels, where the caption is written
    assert caption_row.min() < 128  # dark text is there
