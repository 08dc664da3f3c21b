"""Mutation round 25 on ``ierf.images`` (EXIF orientation, pixel formats, file reading, resize/crop, demo images),
``ierf.viz`` (signed colours, overlays, iERF pictures, colour bar) and ``ierf.methods`` (the method registry and
the shared input/target checks).

Each test fails on a plausible slip that the suite let through: a non-integer EXIF orientation applied, a broken
EXIF block that raises, every orientation's transpose (checked against Pillow's own), 16-bit greys scaled by the
wrong shift or big-endian ones clipped, 32-bit integer images converted, non-uint8 arrays accepted, the wrong
three of four channels kept, zero-width arrays, non-contiguous results, bytearray/memoryview input, read-only crops,
the wrong stereo view or sklearn names listed without sklearn; truncated colours and blends, a loose aspect
tolerance, an infinite scale, the iERF percentile, zero-map label and cell mark, the narrow colour bar, caption
wrapping and centring; and in the method registry a traced model let through, input and target checks (layout,
rank, empty axes, dtype, infinities, bools, negatives, complex, numpy integers, 0-d and wrong-length tensors,
inference tensors) and plugin methods' versions and refusals. Small synthetic arrays or skimage's bundled photos;
each test < 10 s.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps


def _pattern(h: int = 5, w: int = 7) -> np.ndarray:
    """An asymmetric RGB picture: every transpose of it is a different array."""
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(picture: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _orientation_exif(tiff_type: int, value: bytes) -> bytes:
    """A raw EXIF block with one Orientation entry of the given TIFF type (value inline or after the IFD)."""
    inline = len(value) <= 4
    entry = struct.pack("<HHI", 0x0112, tiff_type, 1) + (value.ljust(4, b"\x00") if inline else struct.pack("<I", 26))
    return (
        b"Exif\x00\x00II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", 1)
        + entry
        + b"\x00" * 4
        + (b"" if inline else value)
    )


# ---- EXIF orientation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_picture_as_pillow_does(orientation: int) -> None:
    """Guards I02-I04 (and swaps like them): each orientation 2..8 names one transpose; a swapped pair (5/7,
    6/8) or a flip about the wrong axis turns a phone photo the wrong way, and only 6 had a test."""
    from ierf.images import load_image, to_rgb_array

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _png(Image.fromarray(_pattern()), exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(load_image(data), expected)
    np.testing.assert_array_equal(to_rgb_array(Image.open(io.BytesIO(data))), expected)


@pytest.mark.parametrize("tiff_type, value", [(5, struct.pack("<II", 6, 1)), (11, struct.pack("<f", 6.0))])
def test_a_non_integer_orientation_is_read_as_none(tiff_type: int, value: bytes) -> None:
    """Guards I01: an Orientation tag stored as a RATIONAL or FLOAT (6.0) is malformed; the server and the SDK
    both read it as no orientation, so the engine must too (``6.0 in {6: ...}`` is true without the type check)."""
    from ierf.images import exif_orientation, load_image

    data = _png(Image.fromarray(_pattern()), exif=_orientation_exif(tiff_type, value))
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6.0  # Pillow does read the value
    assert exif_orientation(Image.open(io.BytesIO(data))) == 1
    np.testing.assert_array_equal(load_image(data), _pattern())


def test_an_exif_block_pillow_cannot_parse_counts_as_no_orientation() -> None:
    """Guards I07: ``getexif()`` raises SyntaxError on an EXIF block that is not TIFF data; the image itself
    decodes fine, so it is read unturned rather than refused as unreadable."""
    from ierf.images import load_image, to_rgb_array

    data = _png(Image.fromarray(_pattern()), exif=b"Exif\x00\x00garbage!!")
    np.testing.assert_array_equal(load_image(data), _pattern())
    np.testing.assert_array_equal(to_rgb_array(Image.open(io.BytesIO(data))), _pattern())


# ---- pixel formats ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_sixteen_bit_greys_keep_their_high_byte(mode: str) -> None:
    """Guards I09/I10: a 16-bit grey v becomes v >> 8 (65535 -> 255, 32768 -> 128, 255 -> 0) in every byte
    order; a shift by 7 wraps bright pixels round to dark, and a mode left out of the list is clipped by
    Pillow's convert (every v >= 255 -> 255)."""
    from ierf.images import to_rgb_array

    grey = np.array([[0, 255, 256, 511], [4660, 32768, 65280, 65535]], dtype=np.uint16)
    order = ">u2" if mode == "I;16B" else "<u2"  # Pillow's convert() to these modes clips at 255: build from bytes
    picture = Image.frombytes(mode, (4, 2), grey.astype(order).tobytes())
    assert picture.mode == mode
    rgb = to_rgb_array(picture)
    expected = (grey >> 8).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected[:, :, None], 3, axis=2))


def test_thirty_two_bit_integer_images_are_refused_not_clipped() -> None:
    """Guards I11: mode "I" (32-bit integers) has no 8-bit scale; converting it to RGB clips every value over
    255, so a depth map or a 12-bit scan would be explained as a white blob."""
    from ierf.images import to_rgb_array

    picture = Image.fromarray(np.array([[0, 1000], [70000, 5]], dtype=np.int32))
    assert picture.mode == "I"
    with pytest.raises(ValueError, match="no defined 8-bit scale"):
        to_rgb_array(picture)


@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.bool_, np.float32])
def test_arrays_of_other_dtypes_are_refused(dtype: type) -> None:
    """Guards I14: only uint8 arrays hold 0..255 pixels; a uint16 array let through is returned as uint16 (the
    model then sees 0..65535) and a bool array as 0/1."""
    from ierf.images import to_rgb_array

    with pytest.raises(TypeError, match="must have dtype uint8"):
        to_rgb_array(np.ones((4, 4, 3), dtype=dtype))


def test_an_rgba_array_keeps_its_colour_channels_and_drops_alpha() -> None:
    """Guards I15: (H, W, 4) is RGBA as Pillow stores it; the colour channels are the first three."""
    from ierf.images import to_rgb_array

    rgba = np.random.default_rng(1).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_array(rgba), rgba[:, :, :3])


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 3), (4, 0), (0, 4, 4)])
def test_arrays_with_no_rows_or_no_columns_are_refused(shape: tuple[int, ...]) -> None:
    """Guards I16: an image with no columns is as empty as one with no rows."""
    from ierf.images import to_rgb_array

    with pytest.raises(ValueError, match="image is empty"):
        to_rgb_array(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[:, :, :3],
        lambda a: a[:, ::-1, :3],
        lambda a: np.asfortranarray(a[:, :, :3]),
        lambda a: a[::2, :, :3],
    ],
)
def test_rgb_arrays_come_back_c_contiguous(view: Callable[[np.ndarray], np.ndarray]) -> None:
    """Guards I17: the docstring promises a C-contiguous array (torch.from_numpy, hashing and the PNG encoder
    read the buffer); an RGBA slice, a flipped or Fortran-ordered view must be copied, with the same pixels."""
    from ierf.images import to_rgb_array

    rgba = np.random.default_rng(2).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgb = to_rgb_array(view(rgba))
    assert rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, view(rgba)[:, :, :3])


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_load_image_reads_bytearray_and_memoryview(wrap: type) -> None:
    """Guards I19: encoded bytes arrive as bytearray (a socket buffer) or memoryview as often as bytes; without
    the wider check they are refused as neither a path nor bytes."""
    from ierf.images import load_image

    data = _png(Image.fromarray(_pattern()))
    np.testing.assert_array_equal(load_image(wrap(data)), _pattern())
    with pytest.raises(ValueError, match="empty bytes"):
        load_image(wrap(b""))


# ---- resize/crop and demo images --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (300, 300), (5000, 100)])
def test_resize_crop_returns_a_writable_array(shape: tuple[int, int]) -> None:
    """Guards I35: ``np.asarray`` of a PIL image is read-only; torch.from_numpy warns on it and an in-place
    normalisation of the crop fails. Landscape, portrait, square and strip paths all return a writable copy."""
    from ierf.images import resize_crop

    crop = resize_crop(np.zeros((*shape, 3), dtype=np.uint8), 256, 224)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    assert crop.flags.writeable
    crop[0, 0, 0] = 1  # would raise on a read-only buffer


def test_the_motorcycle_demo_is_the_left_stereo_view() -> None:
    """Guards I36: the documented class (665 moped) and every recorded map of the motorcycle demo are of the
    left view of skimage's stereo pair; the right view has the same shape, so only the pixels tell them apart."""
    import skimage.data
    from ierf.images import demo_image

    left, right, _ = skimage.data.stereo_motorcycle()
    picture = demo_image("motorcycle")
    np.testing.assert_array_equal(picture, left)
    assert not np.array_equal(picture, right)


def test_without_scikit_learn_its_photos_are_neither_listed_nor_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards I37/I38: ``demo_images()`` lists only names that load here, and asking for china or flower without
    scikit-learn says what is missing instead of calling the name unknown."""
    import ierf.images as images

    monkeypatch.setattr(images, "_sklearn_available", lambda: False)
    assert images.demo_images() == ["coffee", "chelsea", "rocket", "astronaut", "motorcycle"]
    with pytest.raises(ValueError, match=r"unknown demo image 'china' \(china and flower need scikit-learn\)"):
        images.demo_image("china")
    with pytest.raises(ValueError) as unknown:
        images.demo_image("teapot")
    assert "scikit-learn" not in str(unknown.value)


# ---- signed colours and overlays --------------------------------------------------------------------------------
def test_colours_between_the_ramps_stops_are_rounded_not_truncated() -> None:
    """Guards V03: 0.13 lies 65 % of the way from white to the first pink stop (253, 219, 199): (253.7, 231.6,
    218.6) rounds to (254, 232, 219); truncation darkens every in-between colour by a level."""
    from ierf.viz import diverging_colours

    np.testing.assert_array_equal(diverging_colours(np.array([0.13, -0.13])), [[254, 232, 219], [219, 232, 254]])


@pytest.mark.parametrize(
    "image_hw, refused", [((100, 103), True), ((100, 97), True), ((100, 101), False), ((99, 100), False)]
)
def test_maps_more_than_two_percent_off_the_images_aspect_are_refused(image_hw: tuple[int, int], refused: bool) -> None:
    """Guards V14: the size rule refuses aspect ratios more than 2 % apart (a map drawn over the wrong crop); a
    looser tolerance silently stretches a 3 %-off map over the picture."""
    from ierf.viz import overlay_signed

    image = np.zeros((*image_hw, 3), dtype=np.uint8)
    signed = np.linspace(-1, 1, 100 * 100).reshape(100, 100)
    if refused:
        with pytest.raises(ValueError, match="different aspect ratios"):
            overlay_signed(image, signed, colorbar=False)
    else:
        assert overlay_signed(image, signed, colorbar=False).size == (image_hw[1], image_hw[0])


@pytest.mark.parametrize("alpha, level", [(0.0, 60), (0.65, 187), (1.0, 255)])
def test_the_blend_is_rounded_and_alpha_spans_zero_to_one(alpha: float, level: int) -> None:
    """Guards V18/V19: over a grey-100 image (dimmed to 60) a zero map (white) blends to 0.35 * 60 + 0.65 * 255
    = 186.75, shown as 187 (truncation gives 186); alpha = 0 is allowed and shows the dimmed image alone."""
    from ierf.viz import overlay_signed

    picture = overlay_signed(np.full((4, 6, 3), 100, np.uint8), np.zeros((4, 6)), alpha, colorbar=False)
    np.testing.assert_array_equal(np.asarray(picture), np.full((4, 6, 3), level, np.uint8))


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -1.0])
def test_an_explicit_scale_must_be_positive_and_finite(scale: float) -> None:
    """Guards V35: ``inf > 0`` holds, so without the finiteness check ``scale=inf`` draws every map white and the
    colour bar reads ``-inf … +inf``."""
    from ierf.viz import overlay_signed

    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        overlay_signed(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4)), scale=scale)


def test_render_ierf_takes_its_scale_at_the_percentile_asked_for() -> None:
    """Guards V25: ``percentile`` is the iERF picture's only say in its default scale; dropped, every picture is
    scaled at the 99th percentile of the support whatever the caller asked."""
    from ierf.viz import overlay_signed, render_ierf, symmetric_scale

    image = np.full((8, 8, 3), 120, np.uint8)
    ierf_map = np.zeros((8, 8))
    ierf_map[2:6, 2:6] = np.linspace(0.01, 0.16, 16).reshape(4, 4)
    asked = np.asarray(render_ierf(image, ierf_map, percentile=50, colorbar=False))
    scale = symmetric_scale(ierf_map, 50, support_only=True)
    np.testing.assert_array_equal(asked, np.asarray(overlay_signed(image, ierf_map, 0.75, scale=scale, colorbar=False)))
    assert not np.array_equal(asked, np.asarray(render_ierf(image, ierf_map, colorbar=False)))


def test_an_all_zero_ierf_says_so_under_the_picture() -> None:
    """Guards V38: an iERF that is zero everywhere has no scale; its strip must read "the map is 0 everywhere"
    as an all-zero saliency map's does, not state a scale of 1."""
    from ierf.viz import overlay_signed, render_ierf

    image = np.full((40, 200, 3), 90, np.uint8)
    zero = np.zeros((40, 200))
    ierf_strip = np.asarray(render_ierf(image, zero))[40:]
    np.testing.assert_array_equal(ierf_strip, np.asarray(overlay_signed(image, zero))[40:])
    assert not np.array_equal(ierf_strip, np.asarray(overlay_signed(image, zero, scale=1.0))[40:])


def test_the_cell_mark_is_yellow_inside_a_black_frame_on_every_side() -> None:
    """Guards V39: ``mark`` is end-exclusive; the yellow line runs on the cell's own edge pixels (rows top and
    bottom - 1, columns left and right - 1) and the black frame just outside them on all four sides."""
    from ierf.viz import render_ierf

    top, left, bottom, right = 10, 12, 20, 26
    pixels = np.asarray(
        render_ierf(
            np.full((32, 40, 3), 128, np.uint8), np.zeros((32, 40)), mark=(top, left, bottom, right), colorbar=False
        )
    )
    yellow, black = [255, 255, 0], [0, 0, 0]
    mid_row, mid_col = (top + bottom) // 2, (left + right) // 2
    assert pixels[mid_row, [left, right - 1]].tolist() == [yellow, yellow]
    assert pixels[mid_row, [left - 1, right]].tolist() == [black, black]
    assert pixels[[top, bottom - 1], mid_col].tolist() == [yellow, yellow]
    assert pixels[[top - 1, bottom], mid_col].tolist() == [black, black]


# ---- the colour bar ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [2, 3, 4, 5, 6, 7, 8, 9, 11, 17])
def test_a_narrow_pictures_bar_still_shows_both_ends_of_the_ramp(width: int) -> None:
    """Guards V34: the bar's margin leaves at least two ramp columns inside its grey frame; a margin of
    width // 2 on an even width puts the frame over the whole ramp, and (width - 1) // 2 on an odd width
    leaves one column, the blue end."""
    from ierf.viz import diverging_colours, overlay_signed

    picture = np.asarray(overlay_signed(np.zeros((3, width, 3), np.uint8), np.zeros((3, width)), colorbar=True))
    ends = diverging_colours(np.array([-1.0, 1.0])).tolist()
    bar_row = picture[3 + 6].tolist()  # the picture's 3 rows, then the middle of the bar
    assert ends[0] in bar_row and ends[1] in bar_row


def test_a_long_caption_word_is_broken_without_an_empty_line() -> None:
    """Guards V33/V37: a word wider than a line is cut into pieces that fit, never starting with an empty line;
    text exactly as wide as the line still fits on it."""
    from ierf.viz import _wrap
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=10)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert _wrap("ab", draw, font, 1) == ["a", "b"]
    assert _wrap("ab cd", draw, font, draw.textlength("ab cd", font=font)) == ["ab cd"]


def test_a_centred_label_is_centred_on_the_picture() -> None:
    """Guards V40: the centre label's left edge is (width - its length) / 2; starting it at width / 2 moves the
    "the map is 0 everywhere" line half its length to the right."""
    from ierf.viz import overlay_signed

    picture = np.asarray(overlay_signed(np.zeros((10, 400, 3), np.uint8), np.zeros((10, 400))))
    text = picture[10 + 4 + 12 + 2 :].min(axis=2) < 100  # below the bar: the label's dark pixels
    columns = np.flatnonzero(text.any(axis=0))
    assert columns.size > 0
    assert abs((columns[0] + columns[-1]) / 2 - 199.5) <= 2


def test_captions_name_what_was_subtracted() -> None:
    """Guards V29: a map contrasted with the mean logit is captioned "minus its mean", not "mean", and the
    identity contrast adds nothing."""
    from ierf.viz import saliency_caption

    assert saliency_caption("srd", 967, "espresso") == "SRD 967 espresso"
    assert saliency_caption("srd", 967, "espresso", "mean") == "SRD 967 espresso minus its mean"
    assert saliency_caption("gradcam", 967, "espresso", "minus 968 'cup'") == "GRADCAM 967 espresso minus 968 'cup'"


# ---- the method registry and the shared checks ------------------------------------------------------------------
def test_a_traced_model_is_refused_like_a_scripted_one() -> None:
    """Guards M05: ``torch.jit.trace`` returns a TracedModule, a ScriptModule that is not a RecursiveScriptModule;
    torch.fx cannot trace either, and the refusal names both ways TorchScript is made."""
    import warnings

    from ierf.errors import UnsupportedModelError
    from ierf.methods import refuse_wrapped
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated, not gone
        traced = torch.jit.trace(model, torch.zeros(1, 3, 8, 8))
    with pytest.raises(
        UnsupportedModelError, match=r"the model is TorchScript \(torch.jit.script or torch.jit.trace\)"
    ):
        refuse_wrapped(traced, "SRD")
    with pytest.raises(UnsupportedModelError, match=r"submodule '1' is TorchScript"):
        refuse_wrapped(nn.Sequential(nn.Identity(), traced), "SRD")


_X = (1, 3, 4, 4)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: torch.zeros(_X).to_mkldnn(), TypeError, "must be a dense tensor"),
        (lambda: torch.empty(_X, device="meta"), ValueError, "on the meta device"),
        (lambda: torch.zeros(1, *_X), ValueError, r"must have shape \(B, C, H, W\); got \(1, 1, 3, 4, 4\)"),
        (lambda: torch.zeros(0, 3, 4, 4), ValueError, "an empty batch"),
        (lambda: torch.zeros(1, 0, 4, 4), ValueError, r"an empty dimension: shape \(1, 0, 4, 4\)"),
        (lambda: torch.full(_X, float("inf")), ValueError, "NaN or infinite"),
    ],
)
def test_check_input_refuses_each_bad_input_with_its_own_error(
    make: Callable[[], torch.Tensor], error: type, message: str
) -> None:
    """Guards M06, M08 and M10-M12: every method validates x through ``check_input``; a layout check that knows
    only COO, a 5-D x let through, an empty batch or channel axis, or an infinite pixel each reach the model (or a
    confusing error from deep inside it) instead of this message. (The meta case, M07, is also pinned elsewhere.)"""
    from ierf.methods import check_input

    with pytest.raises(error, match=message):
        check_input(make())


def test_check_input_refuses_another_dtype_than_the_models() -> None:
    """Guards M09: a float64 x for a float32 model is refused by name, not promoted or cast silently."""
    from ierf.methods import check_input

    x = torch.zeros(_X, dtype=torch.float64)
    assert check_input(x) is x
    with pytest.raises(TypeError, match=r"x has dtype torch\.float64 but the model's parameters are torch\.float32"):
        check_input(x, torch.float32)


@pytest.mark.parametrize(
    "target, error, message",
    [
        (True, TypeError, "got bool"),
        (-1, ValueError, r"classes 0 and up, got -1$"),
        (torch.tensor([1, -1]), ValueError, r"classes 0 and up, got \[1, -1\]$"),
        (torch.tensor([1 + 0j, 2 + 0j]), TypeError, "integer dtype, got torch.complex64"),
        (torch.tensor([1, 2, 3]), ValueError, r"shape \(2,\), got \(3,\)"),
    ],
)
def test_resolve_target_refuses_each_bad_target(target: object, error: type, message: str) -> None:
    """Guards M13/M15/M18/M25/M26: bools, negative classes (as an int or in a tensor, with the value the caller
    gave), complex tensors and a (B,) tensor of the wrong length are refused, not cast or broadcast."""
    from ierf.methods import resolve_target

    with pytest.raises(error, match=message):
        resolve_target(target, 2)


def test_resolve_target_takes_numpy_integers_and_0d_tensors_for_the_whole_batch() -> None:
    """Guards M14/M16: labels read from arrays are numpy integers, and a 0-d tensor names one class for every
    image; both become a LongTensor of shape (B,)."""
    from ierf.methods import resolve_target

    for target in (np.int64(3), np.uint8(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        resolved = resolve_target(target, 2)
        assert resolved.dtype == torch.long and resolved.tolist() == [3, 3], target


def test_a_target_made_under_inference_mode_can_be_saved_by_autograd() -> None:
    """Guards M19: a target built inside the caller's ``torch.inference_mode`` is an inference tensor, which
    autograd refuses to save for backward; the resolved target is an ordinary tensor."""
    from ierf.methods import resolve_target

    with torch.inference_mode():
        made = torch.tensor([1, 0])
    resolved = resolve_target(made, 2)
    assert not resolved.is_inference()
    logits = torch.zeros(2, 3, requires_grad=True)
    logits.gather(1, resolved[:, None]).sum().backward()  # gather saves the index for backward
    assert logits.grad is not None


def test_a_method_registered_at_run_time_is_checked_not_called_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards M21/M22: a method registered by a plugin (not in the static table) has a version and no up-front
    refusal; ``why_unsupported`` must not call it unknown."""
    from ierf import methods

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    @methods.register_method("plugin_method")
    def make(model: torch.nn.Module) -> object:
        return model

    make.version = "7"  # type: ignore[attr-defined]
    assert methods.method_version("plugin_method") == "7"
    assert methods.why_unsupported("plugin_method", torch.nn.Identity()) is None
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.why_unsupported("nope", torch.nn.Identity())


def test_method_versions_are_known_before_the_methods_module_is_imported() -> None:
    """Guards M21: cache keys and provenance ask a method's version before anything used it; reading the registry
    without importing the method's module answers None (a key without the version)."""
    import subprocess
    import sys

    from ierf import methods

    code = "import sys, ierf.methods as m; assert 'ierf.srd' not in sys.modules; print(m.method_version('srd'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert methods.method_version("srd") is not None
    assert out == [methods.method_version("srd")]
