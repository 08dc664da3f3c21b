"""Request image decoding: formats, canonicalisation, content hash and every rejection path."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from ierf.serving.errors import InvalidArgument, ResourceExhausted
from ierf.serving.images import ImageLimits, decode_encoded, decode_tensor
from PIL import Image, ImageFile, ImageOps

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=1_000_000, max_side=4000)


def _rgb(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(array: np.ndarray, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_and_raw_tensor_share_pixels_and_hash(fmt: str, kw: dict) -> None:
    pixels = _rgb()
    from_file = decode_encoded(_encode(pixels, fmt, **kw), LIMITS)
    from_tensor = decode_tensor(pixels.tobytes(), "uint8", [40, 60, 3], LIMITS)
    np.testing.assert_array_equal(from_file.pixels, pixels)
    assert from_file.content_hash == from_tensor.content_hash
    assert from_file.pixels.flags.c_contiguous and from_file.pixels.dtype == np.uint8


def test_jpeg_decodes_to_rgb() -> None:
    image = decode_encoded(_encode(_rgb(), "JPEG", quality=90), LIMITS)
    assert image.pixels.shape == (40, 60, 3)


def test_hash_depends_on_shape_not_only_bytes() -> None:
    flat = _rgb(4, 6)
    a = decode_tensor(flat.tobytes(), "uint8", [4, 6, 3], LIMITS)
    b = decode_tensor(flat.tobytes(), "uint8", [6, 4, 3], LIMITS)
    assert a.content_hash != b.content_hash


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_hash_covers_every_pixel_of_every_channel(channel: int) -> None:
    """Guards against a content hash over part of the pixels (one channel, a prefix): two images that
    differ only there would share every cache key, and one would be served the other's decomposition."""
    pixels = _rgb(8, 10)
    base = decode_tensor(pixels.tobytes(), "uint8", [8, 10, 3], LIMITS).content_hash
    for row, col in [(0, 0), (4, 5), (7, 9)]:
        other = pixels.copy()
        other[row, col, channel] ^= 1
        changed = decode_tensor(other.tobytes(), "uint8", [8, 10, 3], LIMITS).content_hash
        assert changed != base, (row, col, channel)


def test_an_image_of_exactly_max_bytes_is_accepted() -> None:
    """Guards against the byte cap refusing an image of exactly ``max_bytes`` (``>=`` for ``>``): the cap
    is the largest size accepted, as ModelInfo.input.max_image_bytes tells callers to size uploads by."""
    data = _encode(_rgb(16, 16), "PNG")
    image = decode_encoded(data, ImageLimits(max_bytes=len(data), max_pixels=1_000_000, max_side=4000))
    assert image.pixels.shape == (16, 16, 3)
    with pytest.raises(ResourceExhausted, match="over the cap"):
        decode_encoded(data, ImageLimits(max_bytes=len(data) - 1, max_pixels=1_000_000, max_side=4000))


def test_float_tensor_rounds_to_uint8_levels_and_grey_expands() -> None:
    grey = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    image = decode_tensor(grey.tobytes(), "float32", [3, 4], LIMITS)
    assert image.pixels.shape == (3, 4, 3)
    np.testing.assert_array_equal(image.pixels[..., 0], np.rint(grey * 255).astype(np.uint8))
    half = decode_tensor(grey.astype(np.float16).tobytes(), "float16", [3, 4, 1], LIMITS)
    assert half.pixels.shape == (3, 4, 3)


def test_sixteen_bit_png_and_rgba_are_canonicalised() -> None:
    grey16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    image = decode_encoded(_encode(grey16, "PNG"), LIMITS)
    np.testing.assert_array_equal(image.pixels[..., 0], (grey16 >> 8).astype(np.uint8))
    rgba = np.dstack([_rgb(), np.full((40, 60), 7, np.uint8)])
    np.testing.assert_array_equal(decode_encoded(_encode(rgba, "PNG"), LIMITS).pixels, rgba[..., :3])


def test_exif_orientation_is_applied() -> None:
    pixels = _rgb(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    assert decode_encoded(buffer.getvalue(), LIMITS).pixels.shape == (30, 20, 3)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable"),
        (b"GIF89a" + b"\x00" * 40, r"not a readable .* starting 47 49 46 38 39 61 00 00\)"),  # hex, not Python's b'…'
    ],
)
def test_unreadable_bytes_are_invalid_argument(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_encoded(data, LIMITS)


def test_truncated_png_is_invalid_argument() -> None:
    data = _encode(_rgb(200, 200), "PNG")
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        decode_encoded(data[: len(data) // 2], LIMITS)


def test_corrupt_jpeg_body_is_invalid_argument() -> None:
    data = bytearray(_encode(_rgb(64, 64), "JPEG"))
    data[len(data) // 2 : len(data) // 2 + 400] = b"\xff" * 400
    data = bytes(data[: len(data) - 200])
    with pytest.raises(InvalidArgument):
        decode_encoded(data, LIMITS)


def test_over_byte_cap_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match="over the cap"):
        decode_encoded(b"\x89PNG" + b"\x00" * 2_000_000, LIMITS)
    with pytest.raises(ResourceExhausted, match="over the cap"):
        decode_tensor(b"\x00" * 2_000_001, "uint8", [1, 2_000_001, 1], LIMITS)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height: a decompression bomb's calling card."""
    data = bytearray(_encode(np.zeros((1, 1), np.uint8), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_rejected_from_the_header() -> None:
    bomb = _png_claiming(50_000, 50_000)
    assert len(bomb) < 200
    with pytest.raises(ResourceExhausted, match=r"decompression bomb|50000x50000"):
        decode_encoded(bomb, LIMITS)
    with pytest.raises(ResourceExhausted, match="pixels"):
        decode_encoded(_png_claiming(2000, 1000), LIMITS)  # sides fine, area over 1e6
    # Past twice Pillow's own limit, Image.open refuses it before our check: still said with our cap
    with pytest.raises(
        ResourceExhausted, match=r"decompression bomb: the image declares 10000000000 pixels, over the cap of 1000000$"
    ):
        decode_encoded(_png_claiming(100_000, 100_000), LIMITS)


@pytest.mark.parametrize("kind,payload", [(b"zTXt", b"k\x00\x00"), (b"iCCP", b"icc\x00\x00")])
def test_png_chunk_inflating_past_pillows_limit_is_a_bomb(kind: bytes, payload: bytes) -> None:
    """A 50 KB text or colour-profile chunk that inflates to 50 MB: RESOURCE_EXHAUSTED, not "corrupt"."""
    png = _encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    data = payload + zlib.compress(bytes(50 << 20), 9)
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    bomb = png[:33] + chunk + png[33:]  # after the 8-byte signature and the 25-byte IHDR chunk
    with pytest.raises(ResourceExhausted, match=r"decompression bomb: a compressed chunk of the (PNG )?image inflates"):
        decode_encoded(bomb, LIMITS)


@pytest.mark.parametrize(
    "dtype,shape,size,message",
    [
        ("int16", [2, 2, 3], 24, "dtype"),
        ("uint8", [2, 2, 4], 16, "shape"),
        ("uint8", [2, 2, 3, 1], 12, "shape"),
        ("uint8", [2, 2, 3], 11, "needs 12 bytes"),
        ("uint8", [0, 0, 3], 0, "empty"),
        ("uint8", [0, 5, 3], 0, "empty"),
        ("uint8", [0, 5, 3], 5, "no pixels"),
        ("uint8", [-2, -2, 3], 12, "negative"),
    ],
)
def test_bad_raw_tensors_are_invalid_argument(dtype: str, shape: list[int], size: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_tensor(b"\x01" * size, dtype, shape, LIMITS)


def test_float_tensor_out_of_range_or_nan_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
        decode_tensor(np.full((2, 2, 3), 2.0, np.float32).tobytes(), "float32", [2, 2, 3], LIMITS)
    # One value a float32 step above 1 is named as it is (not rounded to "1") and where it is.
    values = np.full((4, 5, 3), 0.5, np.float32)
    values[3, 4, 1] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(InvalidArgument, match=r"from 0\.5 to 1\.0000001 \(first outside at \[3, 4, 1\]: 1\.0000001\)"):
        decode_tensor(values.tobytes(), "float32", [4, 5, 3], LIMITS)
    with pytest.raises(InvalidArgument, match="NaN"):
        decode_tensor(np.full((2, 2, 3), np.nan, np.float32).tobytes(), "float32", [2, 2, 3], LIMITS)


def test_a_big_endian_float_tensor_is_told_the_byte_order() -> None:
    """Java's ByteBuffer writes big-endian by default: the values read as NaN or far outside [0, 1]."""
    values = np.linspace(0.0, 1.0, 48, dtype=np.float32).reshape(4, 4, 3)  # (0.5 alone reads as a tiny float)
    with pytest.raises(InvalidArgument, match=r"\(raw tensors are little-endian, row-major \(H, W, C\)\)"):
        decode_tensor(values.astype(">f4").tobytes(), "float32", [4, 4, 3], LIMITS)


def test_sizes_name_width_and_height() -> None:
    """Said as HxW before, where image tools print WxH."""
    with pytest.raises(ResourceExhausted, match=r"is 4001 wide x 10 high; each side must be at most 4000"):
        decode_tensor(b"\x00" * 10 * 4001, "uint8", [10, 4001], LIMITS)
    with pytest.raises(ResourceExhausted, match=r"is 1001 wide x 1000 high = 1001000 pixels, over the cap"):
        decode_tensor(b"\x00" * 1001 * 1000, "uint8", [1000, 1001], LIMITS)


def test_tensor_over_pixel_cap_is_resource_exhausted_before_reading_data() -> None:
    with pytest.raises(ResourceExhausted, match="pixels"):
        decode_tensor(b"\x00" * 1001 * 1000, "uint8", [1001, 1000], LIMITS)


@pytest.mark.parametrize("shape", [[2**40, 1, 3], [5000, 5000, 3], [2**63 - 1, 2, 1]])
def test_tensor_whose_data_cannot_fill_its_shape_is_invalid_not_too_big(shape: list[int]) -> None:
    """A shape over the caps with a few bytes of data is a malformed request, not an oversized image."""
    with pytest.raises(InvalidArgument, match="tensor data is 3 bytes but shape"):
        decode_tensor(b"abc", "uint8", shape, LIMITS)


# --- structure bombs: refused by a linear walk before any decoding ---------------------------------


def _jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment with its entropy-coded data, in a well-formed JPEG."""
    pos, scans = 2, []
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            scans.append((pos, end))
        pos = end
    return scans


def _scan_bomb(side: int, scans: int) -> bytes:
    """A flat grey progressive JPEG whose smallest scan (a DC refinement) is repeated up to ``scans``."""
    data = _encode(np.full((side, side), 128, np.uint8), "JPEG", progressive=True, quality=50)
    own = _jpeg_scans(data)
    start, end = min(own, key=lambda s: s[1] - s[0])
    return data[:-2] + data[start:end] * (scans - len(own)) + data[-2:]


def test_progressive_jpeg_scan_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from ierf.serving import images

    bomb = _scan_bomb(1000, images.MAX_JPEG_SCANS + 600)
    assert len(bomb) < 30_000
    start = time.perf_counter()
    with pytest.raises(ResourceExhausted, match=r"decompression bomb: JPEG has over 256 scans"):
        decode_encoded(bomb, LIMITS)
    refused_in = time.perf_counter() - start
    # The same bytes with the cap lifted: libjpeg makes one pass over the image per scan.
    monkeypatch.setattr(images, "MAX_JPEG_SCANS", 10**6)
    start = time.perf_counter()
    assert decode_encoded(bomb, LIMITS).pixels.shape == (1000, 1000, 3)
    decoded_in = time.perf_counter() - start
    assert refused_in < decoded_in / 10, (refused_in, decoded_in)


def test_jpeg_scan_cap_is_exact() -> None:
    from ierf.serving.images import MAX_JPEG_SCANS

    assert decode_encoded(_scan_bomb(32, MAX_JPEG_SCANS), LIMITS).pixels.shape == (32, 32, 3)
    with pytest.raises(ResourceExhausted, match="scans"):
        decode_encoded(_scan_bomb(32, MAX_JPEG_SCANS + 1), LIMITS)


@pytest.mark.parametrize(
    "kind,message",
    [
        (b"\xff\xfe\x00\x02", "marker segments"),  # empty COM segments, parsed one by one in Python
        (b"\xff", "stray bytes"),  # fill bytes before a marker
        (b"\xff\xd0", "stray bytes"),  # restart markers outside any scan
    ],
)
def test_jpeg_header_padding_bombs_are_refused(kind: bytes, message: str) -> None:
    data = _encode(_rgb(16, 16), "JPEG")
    bomb = data[:2] + kind * 70_000 + data[2:]
    with pytest.raises(ResourceExhausted, match=message):
        decode_encoded(bomb, LIMITS)


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 48)).convert("CMYK").save(buffer, format="JPEG", progressive=True)
    return buffer.getvalue()


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "cam"
    exif[0x9286] = b"x" * 40_000  # UserComment: a large APP1 segment
    return _encode(_rgb(64, 48), "JPEG", exif=exif.tobytes(), icc_profile=b"\xff\xda" * 100_000)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_encode(_rgb(64, 48), "JPEG"), id="baseline"),
        pytest.param(_encode(_rgb(64, 48), "JPEG", progressive=True, optimize=True), id="progressive"),
        pytest.param(_encode(_rgb(64, 48)[..., 0], "JPEG", progressive=True), id="grey-progressive"),
        pytest.param(_encode(_rgb(64, 48), "JPEG", restart_marker_blocks=1), id="restart-every-block"),
        pytest.param(_encode(_rgb(64, 48), "JPEG", progressive=True, restart_marker_rows=1), id="progressive-restarts"),
        pytest.param(_exif_jpeg(), id="exif-and-multi-segment-icc"),
        pytest.param(_cmyk_jpeg(), id="cmyk-progressive"),
    ],
)
def test_ordinary_jpegs_pass_the_structure_walk(data: bytes) -> None:
    assert decode_encoded(data, LIMITS).pixels.shape == (64, 48, 3)


def test_real_photo_jpegs_decode() -> None:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), read as files: no sklearn import."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn is not installed")
    photos = sorted((Path(spec.origin).parent / "datasets" / "images").glob("*.jpg"))
    assert photos
    for path in photos:
        assert decode_encoded(path.read_bytes(), ImageLimits()).pixels.shape == (427, 640, 3)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with(extra: bytes, before_idat: bool = True) -> bytes:
    """A 16x16 grey PNG with ``extra`` chunks inserted before (or after) its image data."""
    data = _encode(np.full((16, 16), 9, np.uint8), "PNG")
    at = data.index(b"IDAT") - 4 if before_idat else data.index(b"IEND") - 4
    return data[:at] + extra + data[at:]


def test_png_made_of_tiny_text_chunks_is_refused_quickly() -> None:
    from ierf.serving.images import MAX_PNG_ANCILLARY_CHUNKS

    text = _chunk(b"tEXt", b"k\x00v")
    ok = _png_with(text * MAX_PNG_ANCILLARY_CHUNKS)
    assert decode_encoded(ok, LIMITS).pixels.shape == (16, 16, 3)
    for before_idat in (True, False):
        bomb = _png_with(text * 100_000, before_idat)
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="decompression bomb: PNG has over 1000 ancillary chunks"):
            decode_encoded(bomb, LIMITS)
        assert time.perf_counter() - start < 0.2  # the walk stops at chunk 1001; decoding takes seconds


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (b"\x00" * 800_000, r"PNG chunk 1 at byte 8 has type b'\\x00\\x00\\x00\\x00', not four ASCII letters"),
        (_chunk(b"IDAT", b"") * 10, "PNG starts with a b'IDAT' chunk, not IHDR"),
        (None, r"PNG chunk 2 at byte 33 has type b'ID\\x00T'"),
    ],
)
def test_png_with_a_malformed_chunk_is_corrupt_not_a_bomb(tail: bytes | None, message: str) -> None:
    """A run of zero bytes is not 200,000 empty chunks: the first chunk that is not a chunk ends the walk."""
    if tail is None:  # a valid header, then a damaged chunk type among zero padding
        data = _encode(np.full((16, 16), 9, np.uint8), "PNG")
        at = data.index(b"IDAT")
        data = data[:at] + b"ID\x00T" + data[at + 4 :] + b"\x00" * 800_000
    else:
        data = b"\x89PNG\r\n\x1a\n" + tail
    with pytest.raises(InvalidArgument, match="truncated or corrupt: " + message):
        decode_encoded(data, LIMITS)


def test_png_made_of_empty_idat_chunks_is_refused() -> None:
    from ierf.serving.images import MAX_PNG_CHUNKS

    data = _encode(np.full((16, 16), 9, np.uint8), "PNG")
    at = data.index(b"IDAT") - 4
    bomb = data[:at] + _chunk(b"IDAT", b"") * MAX_PNG_CHUNKS + data[at:]
    with pytest.raises(ResourceExhausted, match="PNG has over 65536 chunks"):
        decode_encoded(bomb, LIMITS)


def test_long_apng_is_not_an_ancillary_chunk_bomb() -> None:
    frames = [Image.fromarray(np.full((8, 8), i % 256, np.uint8)) for i in range(600)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert data.count(b"fcTL") + data.count(b"fdAT") > 1000
    np.testing.assert_array_equal(decode_encoded(data, LIMITS).pixels, np.zeros((8, 8, 3), np.uint8))


# --- EXIF orientation: read, never re-serialised ---------------------------------------------------


def _exif(orientation: int, retag_make: int | None = None) -> bytes:
    """An EXIF block with Orientation and Make; ``retag_make`` renames Make's tag, keeping its ASCII type."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "cam"
    raw = bytearray(exif.tobytes())
    if retag_make is not None:
        at = raw.index(b"\x0f\x01" if raw[:2] == b"II" else b"\x01\x0f")
        raw[at : at + 2] = retag_make.to_bytes(2, "little" if raw[:2] == b"II" else "big")
    return bytes(raw)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(fmt: str, orientation: int) -> None:
    data = _encode(_rgb(20, 30), fmt, exif=_exif(orientation))
    with Image.open(io.BytesIO(data)) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert expected.shape == ((30, 20, 3) if orientation >= 5 else (20, 30, 3))
    np.testing.assert_array_equal(decode_encoded(data, LIMITS).pixels, expected)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    "retag",
    [
        pytest.param(0x0142, id="TileWidth-as-ASCII"),  # exif_transpose: struct.error -> was INTERNAL
        pytest.param(0x011A, id="XResolution-as-ASCII"),  # exif_transpose: TypeError from abs()
    ],
)
def test_malformed_exif_still_rotates_the_image(fmt: str, retag: int) -> None:
    pixels = _rgb(6, 8)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    plain = decode_encoded(_encode(pixels, fmt, **kw), LIMITS).pixels
    image = decode_encoded(_encode(pixels, fmt, exif=_exif(6, retag), **kw), LIMITS)
    np.testing.assert_array_equal(image.pixels, np.rot90(plain, k=-1))  # 6: turn 90° clockwise


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "exif",
    [
        pytest.param(b"MM\x00\x2a\xff\xff\xff\xff", id="IFD-offset-past-the-end"),
        pytest.param(b"II\x2a\x00\x08\x00\x00\x00\xff\xff", id="IFD-count-past-the-end"),
        pytest.param(b"not tiff at all", id="not-TIFF"),
    ],
)
def test_unreadable_exif_block_means_upright(exif: bytes) -> None:
    pixels = _rgb(6, 8)
    image = decode_encoded(_encode(pixels, "PNG", exif=exif), LIMITS)
    np.testing.assert_array_equal(image.pixels, pixels)


@pytest.mark.parametrize(
    "error",
    [struct.error("required argument is not an integer"), TypeError("bad operand type for abs(): 'str'")],
)
def test_other_decoder_failures_are_invalid_argument_without_internal_text(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from ierf.serving.errors import to_status

    def broken_load(self: object) -> None:
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(InvalidArgument) as caught:
        decode_encoded(_encode(_rgb(), "JPEG"), LIMITS)
    code, message = to_status(caught.value)
    assert code.name == "INVALID_ARGUMENT"
    assert message.startswith("image bytes are truncated or corrupt: the JPEG image could not be decoded")
    assert str(error) not in message


def test_a_tensor_shape_of_millions_of_dims_is_refused_at_the_cost_of_a_short_one() -> None:
    """A 36 MB request whose ``Tensor.shape`` held 38 M dims kept the ingress's event loop busy 3-6 s (every
    other call waited: a cached Predict took 11.5 s instead of 0.03 s) and took it to 1.9 GB: the shape was
    copied into two Python lists, then every dim formatted into a 114 MB refusal, clipped to 2000 characters
    only afterwards. Refusing a shape that is not (H, W[, C]) must not cost memory by its length."""
    import tracemalloc

    from ierf.serving.convert import open_image
    from ierf.serving.errors import MAX_MESSAGE_CHARS
    from ierf_proto.v1 import explainer_pb2 as pb

    dims = 2_000_000
    packed = b"\x07" * dims  # shape [7, 7, ...] as a packed repeated int64 on the wire
    body = b"\x0a\x03abc" + b"\x10\x01" + b"\x1a" + _varint(len(packed)) + packed  # Tensor{data, dtype, shape}
    image = pb.Image.FromString(b"\x12" + _varint(len(body)) + body)
    assert len(image.tensor.shape) == dims
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as info:
            open_image(image, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "is not (H, W, 3)" in info.value.message
    assert len(info.value.message) <= MAX_MESSAGE_CHARS
    assert peak < 1_000_000, f"refusing a {dims}-dim shape allocated {peak / 1e6:.1f} MB"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_MIB_OF_TEXT = zlib.compress(b"a" * ((1 << 20) - 1), 9)  # ~1 KB that inflates to just under Pillow's 1 MiB chunk limit


def test_text_chunks_past_pillows_total_text_limit_are_a_bomb_not_corruption() -> None:
    """65 zTXt chunks of ~1 KB each, each under Pillow's 1 MiB chunk limit, inflate to 65 MiB, past its
    64 MiB total (MAX_TEXT_MEMORY): the README's "a PNG text ... chunk that inflates past Pillow's limit" is
    RESOURCE_EXHAUSTED, but this one came back INVALID_ARGUMENT "truncated or corrupt: Too much memory used
    in text chunks", sending the caller to look for a damaged file."""
    extra = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + _MIB_OF_TEXT) for i in range(65))
    with pytest.raises(ResourceExhausted, match="decompression bomb"):
        decode_encoded(_png_with(extra), LIMITS)


@pytest.mark.parametrize(
    "kind,header,count",
    [(b"zTXt", b"k%d\x00\x00", 63), (b"iTXt", b"k%d\x00\x01\x00\x00\x00", 63), (b"iCCP", b"p%d\x00\x00", 1000)],
)
def test_many_compressed_chunks_under_pillows_limits_are_not_all_inflated(
    monkeypatch: pytest.MonkeyPatch, kind: bytes, header: bytes, count: int
) -> None:
    """A 66 KB PNG of 63 text chunks, each just under Pillow's 1 MiB limit, made the header read inflate
    63 MiB of text and keep it with the image (the decode admission counts pixels only: 32 such requests
    took the ingress to 2.2 GB), inline on the event loop for files up to 256 KiB: every other call waited
    4.7-7 s. Colour profiles (iCCP) are not in Pillow's text budget at all: a 1 MB file of 1000 of them
    cost 2.1 s of inflating 1 GiB. Either refuse such a file or inflate a bounded amount; the spy counts
    what Pillow's PNG reader inflates (the file is 16x16 pixels)."""
    from PIL import PngImagePlugin

    inflated = [0]
    real = PngImagePlugin._safe_zlib_decompress

    def counting(data: bytes) -> bytes:
        out = real(data)
        inflated[0] += len(out)
        return out

    monkeypatch.setattr(PngImagePlugin, "_safe_zlib_decompress", counting)
    extra = b"".join(_chunk(kind, header % i + _MIB_OF_TEXT) for i in range(count))
    data = _png_with(extra)
    assert len(data) < 1_100_000
    with contextlib.suppress(ResourceExhausted):
        decode_encoded(data, LIMITS)
    assert inflated[0] <= 16 << 20, f"a {len(data)}-byte PNG had {inflated[0] / 2**20:.0f} MiB of chunks inflated"


# -- mutation round 9 --------------------------------------------------------------------------------------------
def test_a_png_with_exactly_the_cap_of_compressed_chunks_decodes() -> None:
    """Guards ``compressed > MAX_PNG_COMPRESSED_CHUNKS`` (release notes: "over 8 compressed PNG text/ICC chunks is
    a bomb"): a PNG with exactly 8 (a few text tags and a profile, as photo tools write) is an ordinary image,
    and the ninth makes it a bomb."""
    from ierf.serving.images import MAX_PNG_COMPRESSED_CHUNKS

    def tags(n: int) -> bytes:
        return b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"text")) for i in range(n))

    decoded = decode_encoded(_png_with(tags(MAX_PNG_COMPRESSED_CHUNKS)), LIMITS)
    assert decoded.pixels.shape == (16, 16, 3)
    with pytest.raises(ResourceExhausted, match=f"over {MAX_PNG_COMPRESSED_CHUNKS} compressed"):
        decode_encoded(_png_with(tags(MAX_PNG_COMPRESSED_CHUNKS + 1)), LIMITS)


def test_pillows_total_text_memory_refusal_is_a_bomb_not_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the "too much memory used in text chunks" branch of ``_PILLOW_CHUNK_BOMB``. The round-8 test of it
    (65 zTXt chunks) is now stopped earlier by the compressed-chunk cap, so it no longer reaches Pillow. Plain
    tEXt chunks count too: with a configured max_image_bytes over Pillow's 64 MiB (MAX_TEXT_MEMORY, made small
    here) the refusal must stay RESOURCE_EXHAUSTED, not "truncated or corrupt"."""
    from PIL import PngImagePlugin

    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 1000)
    extra = b"".join(_chunk(b"tEXt", b"k%d\x00" % i + b"a" * 600) for i in range(2))
    with pytest.raises(ResourceExhausted, match="decompression bomb"):
        decode_encoded(_png_with(extra), LIMITS)


@pytest.mark.parametrize("shape", [[], [12]], ids=["no-dims", "one-dim"])
def test_a_tensor_shape_of_fewer_than_two_dimensions_is_invalid_argument(shape: list[int]) -> None:
    """Guards ``len(shape) not in (2, 3)``: a shape of 0 or 1 dimensions is the caller's mistake. Checked only
    for "more than 3", it reached ``shape[2]`` and failed as an IndexError (INTERNAL, a server bug)."""
    with pytest.raises(InvalidArgument, match=r"has \d dimensions: it is not \(H, W, 3\)"):
        decode_tensor(b"\x00" * 12, "uint8", shape, LIMITS)
