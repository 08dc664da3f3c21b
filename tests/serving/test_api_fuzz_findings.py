"""Findings of fuzzing the gRPC API with raw requests: inputs the caps let through that cost far more than
they weigh, and malformed images answered as if they were whole. The ingress alone, over fake worker
handles (no Ray runtime, no model); each test runs in well under a second."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from ierf.images import PIPELINE_VERSION

from serving.fakes import Method as _Method
from serving.test_ingress import _Capture, _full_outcome, _ingress

# a preprocessing version of this build (the ingress cuts views only for its own pipeline version)
PREP = f"v{PIPELINE_VERSION}-test"

# What the ingress's default cap lets an image decode to (16 Mpx): no step of preprocessing should ask for more.
_MAX_PIXELS = 4096 * 4096


class _Oversized(Exception):
    """Raised instead of letting Pillow allocate a resize past the pixel cap (the test stays fast)."""


def _guard_resizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    from PIL import Image

    asked: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def guarded(self: Any, size: Any, *args: Any, **kwargs: Any) -> Any:
        width, height = int(size[0]), int(size[1])
        if width * height > _MAX_PIXELS:
            asked.append((width, height))
            raise _Oversized(f"resize of a {self.size[0]}x{self.size[1]} image to {width}x{height}")
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)
    return asked


def _described_like_a_224_model(ingress: Any) -> None:
    from ierf.serving.jobs import LayerShape, ModelDescription

    ingress._descriptions["m"] = ModelDescription(
        id="m",
        weights_digest="digest",
        input_height=224,
        input_width=224,
        preprocess_version=PREP,
        class_names=[str(i) for i in range(10)],
        layers=[LayerShape("l", 4, 7, 7)],
        methods=["srd"],
        default_method="srd",
        device="cpu",
        resize=256,
    )


def _tensor(pixels: np.ndarray) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(pixels.shape)))


def _png(pixels: np.ndarray) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return pb.Image(encoded=buffer.getvalue())


@pytest.mark.parametrize(
    "shape, encode",
    [
        ((16384, 1, 3), _tensor),  # 48 KiB: travels to the worker whole, which resizes it
        ((16384, 7, 3), _tensor),  # 336 KiB: over twice the view's size, so the ingress cuts the view itself
        ((16384, 1, 3), _png),  # the same as a PNG of ~100 bytes
    ],
    ids=["tensor-16384x1-worker", "tensor-16384x7-ingress", "png-16384x1"],
)
def test_a_tall_thin_image_within_the_caps_is_not_resized_to_a_gigapixel(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int], encode: Any
) -> None:
    """A 16384x1 image passes every cap (side 16384, 16 Kpx, 48 KiB; as a PNG ~100 bytes), but preprocessing
    resizes a portrait image *whole* so its short side is 256: 256 x 4,194,304 = 1.07 Gpx. Measured: 24 s
    and 4.4 GB RSS for ``ierf.images.resize_crop`` alone; through a live service an 8192x1 Predict took
    13.5 s and held an unrelated 32x32 Predict 12.5 s behind it on the worker's one compute thread; four
    concurrent 16384x7 Predicts (344 KB each) took the ingress from 0.37 to 2.2 GB and held a 600x600
    Predict 7.8 s. Either refuse such an aspect ratio (INVALID_ARGUMENT / RESOURCE_EXHAUSTED, with the
    field named) or resample only the crop's rows, as the landscape path already does; no step may
    allocate more pixels than the service's pixel cap."""
    from ierf.images import resize_crop
    from ierf.serving.errors import InvalidArgument, ResourceExhausted, ServiceError
    from ierf_proto.v1 import explainer_pb2 as pb

    asked = _guard_resizes(monkeypatch)
    worker = _Capture(_full_outcome())

    async def predict(job: Any) -> Any:  # the worker's preprocessing (ModelHost: model.resize_crop)
        if not job.view_version:
            resize_crop(job.pixels, 256, 224)
        worker.jobs.append(job)
        return _full_outcome()

    worker.predict = _Method(predict)
    ingress = _ingress({"m": worker})
    _described_like_a_224_model(ingress)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    refused: ServiceError | None = None
    try:
        asyncio.run(ingress.Predict(pb.PredictRequest(image=encode(pixels), top_k=1)))
    except ServiceError as exc:
        refused = exc
    assert not asked, f"preprocessing asked Pillow for a {asked[0][0]}x{asked[0][1]} image (cap {_MAX_PIXELS} px)"
    assert refused is None or isinstance(refused, InvalidArgument | ResourceExhausted), refused


def _png_with_rows(width: int, height: int, rows: int) -> bytes:
    """A well-formed RGB PNG whose IHDR says ``height`` rows but whose (complete) zlib stream holds ``rows``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    scanlines = b"".join(b"\x00" + bytes([200]) * (3 * width) for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("rows", [1, 4, 63])
def test_a_png_missing_most_of_its_rows_is_refused_not_explained_with_black_rows(rows: int) -> None:
    """README: a corrupt or truncated image is INVALID_ARGUMENT. A PNG whose pixel data ends after ``rows`` of
    its 64 rows (a complete zlib stream, then IEND) decodes in Pillow 13 without error, the missing rows
    black; the service then explains (and caches, under that hash) an image the caller never sent. With no
    row at all Pillow does say "image file is truncated", and the service refuses it. The decoded data's
    length should be checked against IHDR's (width, height, bit depth, interlace)."""
    from ierf.serving.errors import InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    image = pb.Image(encoded=_png_with_rows(64, 64, rows))
    with pytest.raises(InvalidArgument, match="truncated"):
        asyncio.run(ingress.Predict(pb.PredictRequest(image=image, top_k=1)))
    assert worker.jobs == []


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(13, 7), (1, 1), (64, 3)])
def test_whole_pngs_of_every_colour_type_and_depth_pass_the_row_count(mode: str, size: tuple[int, int]) -> None:
    """The declared length counts a filter byte per row and packs 1-bit rows to whole bytes: a whole PNG of
    any kind Pillow writes is never refused as truncated."""
    from ierf.serving.images import _check_png_rows
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").convert(mode).save(buffer, "PNG")
    _check_png_rows(buffer.getvalue())


def _interlaced_png(width: int, height: int, passes: int) -> bytes:
    """An 8-bit grey Adam7 PNG holding the scanlines of its first ``passes`` passes."""
    from ierf.serving.images import _ADAM7

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b""
    for x0, y0, dx, dy in _ADAM7[:passes]:
        cols, rows = max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)
        if cols and rows:
            raw += (b"\x00" + bytes(range(cols))) * rows
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_an_interlaced_png_is_counted_pass_by_pass() -> None:
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import _check_png_rows, decode_encoded
    from ierf.serving.settings import ImageLimits

    whole = _interlaced_png(11, 9, 7)
    _check_png_rows(whole)
    assert decode_encoded(whole, ImageLimits()).pixels.shape == (9, 11, 3)
    with pytest.raises(InvalidArgument, match=r"pixel data ends after \d+ of the \d+ bytes"):
        _check_png_rows(_interlaced_png(11, 9, 6))
