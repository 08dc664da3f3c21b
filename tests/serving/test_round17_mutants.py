"""Mutation round 17 (request images): tests killing mutants of the image caps and checks that survived."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from ierf.serving.errors import InvalidArgument, ResourceExhausted
from ierf.serving.images import ImageLimits, decode_encoded, decode_tensor

from serving.test_request_images import _chunk

WIDE = ImageLimits(max_bytes=1 << 24, max_pixels=1 << 24, max_side=4096)


def test_an_image_whose_side_is_exactly_max_side_is_accepted() -> None:
    """max_side is the longest side accepted (ModelInfo advertises it as such), in either direction."""
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_side=64)
    for shape in ([64, 2, 3], [2, 64, 3]):
        image = decode_tensor(bytes(int(np.prod(shape))), "uint8", shape, limits)
        assert image.pixels.shape == tuple(shape)
    for shape in ([65, 2, 3], [2, 65, 3]):
        with pytest.raises(ResourceExhausted, match="at most 64 pixels"):
            decode_tensor(bytes(int(np.prod(shape))), "uint8", shape, limits)


def test_a_tensor_of_exactly_max_bytes_is_accepted() -> None:
    """The byte cap is the largest tensor accepted, as for encoded images."""
    data = bytes(8 * 8 * 3)
    image = decode_tensor(data, "uint8", [8, 8, 3], ImageLimits(max_bytes=len(data), max_pixels=1 << 20, max_side=64))
    assert image.pixels.shape == (8, 8, 3)
    with pytest.raises(ResourceExhausted, match="over the cap"):
        decode_tensor(data, "uint8", [8, 8, 3], ImageLimits(max_bytes=len(data) - 1, max_pixels=1 << 20, max_side=64))


def test_a_tensor_shape_with_a_minus_one_is_named_a_negative_dimension() -> None:
    """-1 is numpy's "infer this dimension", which the API does not do: the message says what is wrong
    rather than quoting a negative byte count."""
    with pytest.raises(InvalidArgument, match="negative dimension"):
        decode_tensor(bytes(12), "uint8", [-1, 4, 3], WIDE)


def test_a_float_tensor_a_hair_below_zero_is_refused() -> None:
    """Float pixels are in [0, 1]: a value just below 0 (a normalised tensor, a mean left subtracted) is
    refused, not clipped into a picture the caller did not send."""
    values = np.full((2, 2, 3), 0.5, dtype=np.float32)
    values[0, 0, 0] = -1e-4
    with pytest.raises(InvalidArgument):
        decode_tensor(values.tobytes(), "float32", [2, 2, 3], WIDE)


def test_a_png_one_byte_short_of_its_rows_is_refused() -> None:
    """Pillow fills missing rows with black: a PNG whose pixel data ends even one byte before what its header
    declares is refused as truncated (4 x 4 RGB: 4 rows of 1 filter byte + 12 bytes = 52)."""
    header = struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0)
    rows = bytes(52)

    def png(data: bytes) -> bytes:
        return (
            b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")
        )

    assert decode_encoded(png(rows), WIDE).pixels.shape == (4, 4, 3)
    with pytest.raises(InvalidArgument, match="51 of the 52 bytes"):
        decode_encoded(png(rows[:-1]), WIDE)
