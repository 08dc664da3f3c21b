"""SDK image inputs reach the server as the same canonical pixels whichever way they travel.

Checked against the server's own decoder (``ierf.serving.convert.decode_image``), no server running:
large float arrays (rounded to uint8 in the SDK, as the server would) and PIL images (EXIF
orientation and modes PNG cannot store, handled as the server handles the original file).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from ierf.images import apply_exif_orientation, to_rgb_array
from ierf.serving.convert import decode_image
from ierf.serving.errors import InvalidArgument
from ierf.serving.images import CanonicalImage, ImageLimits, canonicalise
from ierf_client import _core
from ierf_client._core import image_message
from ierf_proto.v1 import explainer_pb2 as pb
from PIL import Image

LIMITS = ImageLimits()


def _decoded(message: pb.Image, limits: ImageLimits = LIMITS) -> CanonicalImage:
    return decode_image(message, limits)


def _assert_same(got: CanonicalImage, want: CanonicalImage) -> None:
    np.testing.assert_array_equal(got.pixels, want.pixels)
    assert got.content_hash == want.content_hash


def _float_pixels(shape: tuple[int, ...], dtype: npt.DTypeLike, seed: int = 0) -> np.ndarray:
    """Random pixels in [0, 1] plus the edges and exact half-level ties, where rounding differs most."""
    values = np.random.default_rng(seed).random(shape).astype(dtype)
    flat = values.reshape(-1)
    ties = (np.arange(7) * 2 + 1) / 510  # (2k + 1) / 510: halfway between two uint8 levels
    flat[: 2 + len(ties)] = np.concatenate([[0.0, 1.0], ties]).astype(dtype)
    return values


# --------------------------------------------------------------------------------- float arrays
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ">f4"])
@pytest.mark.parametrize("shape", [(12, 10, 3), (12, 10, 1), (12, 10)])
def test_a_large_float_array_gives_the_pixels_the_server_gives_the_float_tensor(
    monkeypatch: pytest.MonkeyPatch, dtype: npt.DTypeLike, shape: tuple[int, ...]
) -> None:
    """Over the raw limit, floats become uint8 in the SDK (raw while that fits, PNG beyond)."""
    values = _float_pixels(shape, dtype)
    small = image_message(values)
    assert small.tensor.dtype in (
        pb.DATA_TYPE_FLOAT32,
        pb.DATA_TYPE_FLOAT16,
    )  # small float arrays still travel as they are
    want = _decoded(small)

    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", values.nbytes - 1)  # uint8 fits, floats do not
    as_uint8 = image_message(values)
    assert as_uint8.WhichOneof("source") == "tensor" and as_uint8.tensor.dtype == pb.DATA_TYPE_UINT8
    _assert_same(_decoded(as_uint8), want)

    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", 10)  # not even uint8 fits: lossless PNG
    as_png = image_message(values)
    assert as_png.WhichOneof("source") == "encoded"
    _assert_same(_decoded(as_png), want)


def test_a_full_hd_float32_photo_fits_under_the_server_cap() -> None:
    """The reviewer's case: 1920x1080x3 float32 is 24.9 MB, over the server's 20 MiB tensor cap."""
    values = _float_pixels((1080, 1920, 3), np.float32, seed=1)
    message = image_message(values)
    assert message.ByteSize() < LIMITS.max_bytes
    reference = pb.Image(tensor=pb.Tensor(data=values.tobytes(), dtype=pb.DATA_TYPE_FLOAT32, shape=[1080, 1920, 3]))
    _assert_same(_decoded(message), _decoded(reference, ImageLimits(max_bytes=64 * 1024 * 1024)))


@pytest.mark.parametrize(
    "bad",
    [np.nan, np.inf, -np.inf, -0.25, 1.5],
    ids=["nan", "inf", "-inf", "below-0", "above-1"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_large_float_array_the_server_would_refuse_fails_locally_with_its_words(
    monkeypatch: pytest.MonkeyPatch, bad: float, dtype: npt.DTypeLike
) -> None:
    values = _float_pixels((6, 5, 3), dtype)
    values[2, 3, 1] = bad
    small = image_message(values)  # small: sent as is, and the server refuses it
    assert small.WhichOneof("source") == "tensor"
    with pytest.raises(InvalidArgument) as server:
        _decoded(small)
    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", 10)
    with pytest.raises(ValueError) as local:
        image_message(values)
    # the server's words, less its byte-order hint: the SDK lays out an array's bytes itself
    expected = server.value.message.replace("float tensor", "float image array")
    assert expected.endswith(" (raw tensors are little-endian, row-major (H, W, C))")
    assert str(local.value) == expected.removesuffix(" (raw tensors are little-endian, row-major (H, W, C))")


@pytest.mark.parametrize("limit", [10, 10**9])
def test_float64_and_rgba_arrays_reach_the_server_as_their_float32_and_rgb_pixels(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    """skimage's img_as_float gives float64, and photos often carry alpha: both were refused, while the
    in-process CLI took them. Whatever their size, they decode to the pixels of the float32/RGB array."""
    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", limit)
    values = _float_pixels((6, 5, 3), np.float64)
    assert (
        _decoded(image_message(values)).content_hash == _decoded(image_message(values.astype(np.float32))).content_hash
    )
    rgba = np.random.default_rng(1).integers(0, 256, (6, 5, 4), np.uint8)
    assert _decoded(image_message(rgba)).content_hash == _decoded(image_message(rgba[:, :, :3].copy())).content_hash
    with pytest.raises(TypeError, match="float16/32/64"):
        image_message(np.zeros((4, 4, 3), np.int64))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_files_the_server_does_not_read_travel_as_their_pixels(tmp_path: Any, fmt: str) -> None:
    """The server reads PNG, JPEG and WebP; other files Pillow reads are sent as a lossless PNG of their
    pixels (they were refused by the server, while the in-process CLI read them)."""
    pixels = np.random.default_rng(2).integers(0, 256, (7, 9, 3), np.uint8)
    picture = Image.fromarray(pixels).convert("P") if fmt == "GIF" else Image.fromarray(pixels)
    path = tmp_path / f"x.{fmt.lower()}"
    picture.save(path, fmt)
    message = image_message(str(path))
    assert message.encoded.startswith(b"\x89PNG")
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(_decoded(message).pixels, expected)
    assert image_message(b"not an image").encoded == b"not an image"  # the server says what is wrong
    for cut in (20, 60, len(path.read_bytes()) // 2):  # damaged files Pillow fails on in its own ways
        damaged = path.read_bytes()[:cut]
        assert image_message(damaged).encoded == damaged


# ----------------------------------------------------------------------------------- PIL images
def _jpeg(picture: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    picture.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _gradient(width: int = 24, height: int = 16) -> Image.Image:
    """Not square and not symmetric, so every orientation gives different pixels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 10 % 256, y * 15 % 256, (x * y) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_opened_jpeg_is_turned_as_the_server_turns_its_file(orientation: int) -> None:
    data = _jpeg(_gradient(), orientation)
    from_file = _decoded(image_message(data))
    from_pil = _decoded(image_message(Image.open(io.BytesIO(data))))
    _assert_same(from_pil, from_file)
    if orientation >= 5:  # sanity: the server does turn the file
        assert from_file.shape == (24, 16)


def test_an_opened_cmyk_jpeg_is_converted_as_the_server_converts_its_file() -> None:
    cmyk = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 24, 4), dtype=np.uint8), mode="CMYK")
    data = _jpeg(cmyk, orientation=6)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "CMYK"
    _assert_same(_decoded(image_message(opened)), _decoded(image_message(data)))


def _server_view(picture: Image.Image) -> CanonicalImage:
    """What the server makes of a decoded picture: its orientation, then its RGB rule."""
    return canonicalise(to_rgb_array(apply_exif_orientation(picture)))


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "RGBX", "RGBa", "PA", "I;16L", "I;16N", "I;16B"])
def test_modes_png_cannot_store_reach_the_server_as_its_rgb_rule_says(mode: str) -> None:
    rng = np.random.default_rng(4)
    if mode.startswith("I;16"):
        # from the bytes: Pillow's convert() into these modes clips every value to 255
        values = rng.integers(0, 65536, (16, 24), dtype=np.uint16).astype(">u2" if mode == "I;16B" else "=u2")
        picture = Image.frombytes(mode, (24, 16), values.tobytes())
        assert int(np.asarray(picture).max()) > 255
    else:
        picture = _gradient().convert(mode) if mode != "PA" else _gradient().convert("P").convert("PA")
    assert picture.mode == mode
    _assert_same(_decoded(image_message(picture)), _server_view(picture))


@pytest.mark.parametrize("mode", ["I", "F", "La"])
def test_modes_the_server_refuses_fail_locally_with_its_words(mode: str) -> None:
    from ierf.serving.images import _to_rgb_array

    picture = _gradient().convert("L").convert(mode) if mode != "La" else _gradient().convert("LA").convert("La")
    with pytest.raises(InvalidArgument) as server:
        _to_rgb_array(picture)
    with pytest.raises(ValueError) as local:
        image_message(picture)
    assert str(local.value) == server.value.message


def test_a_file_too_large_for_pillow_to_convert_is_refused_by_what_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """A readable GIF past Pillow's bomb limit was sent as raw bytes and refused as "not a readable
    PNG/JPEG/WEBP file"."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).convert("P").save(buffer, "GIF")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px is past twice the limit
    with pytest.raises(ValueError, match="too large to convert to PNG for the server"):
        image_message(buffer.getvalue())
