"""Image decoding and the bundled demo photographs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ierf.images import demo_image, demo_images, load_image, to_rgb_array
from PIL import Image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return demo_image("chelsea")


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_png_round_trips_exactly_from_path_and_bytes(photo, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(_encode(photo, "PNG"))
    assert np.array_equal(load_image(path), photo)
    assert np.array_equal(load_image(str(path)), photo)
    assert np.array_equal(load_image(path.read_bytes()), photo)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats_decode_to_rgb(photo, fmt):
    decoded = load_image(_encode(photo, fmt))
    assert decoded.shape == photo.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - photo).mean() < 25  # lossy formats stay close


def test_grey_and_rgba_files_become_rgb(photo):
    grey = photo[:, :, 0]
    assert np.array_equal(load_image(_encode(grey, "PNG")), np.repeat(grey[:, :, None], 3, axis=2))
    rgba = np.concatenate([photo, np.zeros((*photo.shape[:2], 1), np.uint8)], axis=2)
    assert np.array_equal(load_image(_encode(rgba, "PNG")), photo)  # alpha dropped, not composited


def test_exif_orientation_is_applied(photo):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    decoded = load_image(_encode(photo, "JPEG", exif=exif))
    assert decoded.shape == (photo.shape[1], photo.shape[0], 3)


def test_unreadable_inputs_raise_clear_errors(photo, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read image .*notes\.png.*not a recognised image format"):
        load_image(text)
    truncated = _encode(photo, "PNG")[:2000]
    with pytest.raises(ValueError, match="cannot read image <2000 bytes>"):
        load_image(truncated)
    with pytest.raises(ValueError, match="empty bytes"):
        load_image(b"")
    with pytest.raises(TypeError, match="path or bytes"):
        load_image(42)


def test_decompression_bombs_are_refused(monkeypatch):
    """A 108 Mpx phone photo read "could be decompression bomb DOS attack": the size and the way out are said."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(
        ValueError, match=r"cannot read image .*: it is 0\.0 Mpx, over the 0\.0 Mpx that Pillow decodes"
    ):
        load_image(_encode(np.zeros((40, 40, 3), np.uint8), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    with pytest.raises(ValueError, match=r"downscale it first"):
        load_image(_encode(np.zeros((40, 40, 3), np.uint8), "PNG"))


def test_to_rgb_array_modes():
    palette = Image.new("P", (5, 4), 3)
    assert to_rgb_array(palette).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="32-bit"):
        to_rgb_array(Image.new("F", (5, 4)))
    with pytest.raises(ValueError, match="empty"):
        to_rgb_array(Image.new("RGB", (0, 4)))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("coffee", (400, 600, 3)),
        ("chelsea", (300, 451, 3)),
        ("rocket", (427, 640, 3)),
        ("astronaut", (512, 512, 3)),
        ("motorcycle", (500, 741, 3)),
        ("china", (427, 640, 3)),
        ("flower", (427, 640, 3)),
    ],
)
def test_demo_images_are_real_bundled_photos(name, shape):
    if name in ("china", "flower"):
        pytest.importorskip("sklearn")
    image = demo_image(name)
    assert image.shape == shape and image.dtype == np.uint8
    assert image.std() > 20  # a photograph, not a flat placeholder


def test_unknown_demo_image_lists_the_choices():
    assert {"coffee", "chelsea", "motorcycle"} <= set(demo_images())
    with pytest.raises(ValueError, match=r"unknown demo image 'dog'.*coffee"):
        demo_image("dog")


def test_malformed_exif_does_not_stop_orientation(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "cam"
    raw = exif.tobytes()
    make = b"\x0f\x01" if raw[:2] == b"II" else b"\x01\x0f"
    tile_width = b"\x42\x01" if raw[:2] == b"II" else b"\x01\x42"
    raw = raw.replace(make, tile_width, 1)  # Make -> TileWidth, still ASCII: re-saving this EXIF raises
    decoded = load_image(_encode(photo, "PNG", exif=raw))
    assert np.array_equal(decoded, np.rot90(photo, k=-1))  # 6: turn 90° clockwise to display


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_a_pil_image_is_turned_upright_once_as_the_sdk_and_server_turn_it(photo, fmt):
    """The SDK and the server turn a PIL image / file upright by its EXIF orientation; ``preprocess`` of the
    same ``Image.open`` result did not, so a phone photo gave another map in-process (300x451 vs 451x300).
    Turned once only: Pillow turns a TIFF itself as it loads it, and ierf's own upright copy keeps no tag."""
    from ierf.images import apply_exif_orientation

    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(photo, fmt, exif=exif)
    expected = load_image(data)
    assert expected.shape == (photo.shape[1], photo.shape[0], 3)
    opened = Image.open(io.BytesIO(data))
    assert np.array_equal(to_rgb_array(opened), expected)
    upright = apply_exif_orientation(Image.open(io.BytesIO(data)))
    assert np.array_equal(to_rgb_array(upright), expected)
    assert np.array_equal(to_rgb_array(upright.copy()), expected)


# -- mutation round 9 --------------------------------------------------------------------------------------------
_XMP_ROTATE_90_CW = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def test_an_upright_copy_of_an_xmp_oriented_image_is_not_turned_again(photo: np.ndarray) -> None:
    """Guards the XMP keys dropped from the upright copy: Pillow reads the orientation from XMP too (no EXIF
    block here, as some editors save it), so a copy that kept its XMP was turned a second time by
    ``to_rgb_array``/``preprocess`` (the docstring: "ierf's own upright copy keeps no tag")."""
    from ierf.images import apply_exif_orientation
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _XMP_ROTATE_90_CW)
    data = _encode(photo, "PNG", pnginfo=info)
    expected = np.rot90(photo, k=-1)  # 6: turn 90° clockwise to display
    assert np.array_equal(load_image(data), expected)
    upright = apply_exif_orientation(Image.open(io.BytesIO(data)))
    assert np.array_equal(to_rgb_array(upright), expected)


@pytest.mark.parametrize(
    ("shape", "resize", "crop"),
    [((107, 100), 100, 100), ((100, 107), 100, 100), ((90, 140), 240, 224), ((300, 451), 256, 224)],
)
def test_resize_crop_is_the_resized_images_centre_rounded_as_torchvision_rounds(shape, resize, crop) -> None:
    """``resize_crop`` (the worker's preprocessing, and the ingress's view) is the short side resized to
    ``resize`` then the centre ``crop``², its offset rounded (torchvision's CenterCrop: a 7-pixel margin puts
    4 above, 3 below). Cached activations are keyed by PIPELINE_VERSION, so the arithmetic is pinned here:
    resampling only the crop's box gives the whole resize's pixels (to 1 level of rounding)."""
    from ierf.images import resize_crop

    height, width = shape
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if height <= width:
        new_h, new_w = resize, int(resize * width / height)
    else:
        new_h, new_w = int(resize * height / width), resize
    whole = np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.int16)
    top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
    expected = whole[top : top + crop, left : left + crop]
    cut = resize_crop(image, resize, crop)
    assert cut.shape == (crop, crop, 3) and cut.dtype == np.uint8
    difference = np.abs(cut.astype(np.int16) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
