"""Decode request images safely and canonicalise them to uint8 RGB with a content hash.

Why here: every cache key downstream hangs off the content hash of the *decoded* image, so PNG and
JPEG re-encodings of the same pixels (and raw tensors) share cached work. Decoding is where hostile
input bites, so caps are checked before any pixel is allocated: encoded byte size, then the file's
structure (a linear walk over JPEG markers / PNG chunks that bounds how many times the decoder goes
over the image), then the header's dimensions (decompression bombs), then the decoded frame.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ierf.images import apply_exif_orientation
from ierf.serving.errors import InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
TENSOR_DTYPES = ("uint8", "float16", "float32")

# Structure caps, checked by a linear walk over the bytes before Pillow sees them. Each bounds work
# that costs far more than the bytes that ask for it. JPEG: every progressive scan is a pass over the
# whole coefficient buffer (~2 ms at 16 Mpx for a 33-byte scan), so a file repeating one tiny scan
# costs minutes; libjpeg's standard progression has 6 scans (grey), 10 (YCbCr) or 18 (CMYK), and 256
# is nvImageCodec's default cap for this attack. Segments and the stray bytes before the first scan
# (fill 0xFF, junk, RSTn) are walked one at a time by Pillow's Python header parser. PNG: Pillow
# reads every chunk in Python (text chunks are decoded and kept); fcTL/fdAT are APNG frames, which
# Pillow stops at after the first frame, so they count only towards the total.
MAX_JPEG_SCANS = 256
MAX_JPEG_SEGMENTS = 4096
MAX_JPEG_STRAY_BYTES = 65536
MAX_PNG_ANCILLARY_CHUNKS = 1000
MAX_PNG_CHUNKS = 65536
# zTXt/iTXt/iCCP are inflated as the header is read (text up to 1 MiB a chunk, 64 MiB in all; a colour
# profile without any limit), before a pixel is admitted: a 66 KB file of 63 of them cost 63 MiB.
MAX_PNG_COMPRESSED_CHUNKS = 8
_PNG_COMPRESSED_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The next JPEG marker as libjpeg finds it: 0xFF then a code that is not a stuffed zero (0x00), a fill
# byte (0xFF), TEM (0x01) or RST0-7 (0xD0-0xD7); those are data or no-ops to libjpeg and are skipped.
# One 0xFF, not 0xFF+: fill bytes before a marker are skipped by the search, and a long run of 0xFF
# cannot make the search quadratic.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_JPEG_SOI, _JPEG_EOI, _JPEG_SOS = 0xD8, 0xD9, 0xDA
_APNG_FRAME_CHUNKS = (b"fcTL", b"fdAT")


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied before decoding. Pixel cap = height x width of the decoded frame."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 16384


@dataclass(frozen=True)
class CanonicalImage:
    """uint8 RGB (H, W, 3), C-contiguous; ``content_hash`` = sha256 over shape and pixels."""

    pixels: np.ndarray
    content_hash: str

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass(frozen=True)
class PendingImage:
    """An image whose caps, structure and header are checked and whose pixels are not decoded yet.

    Why two steps: the header is cheap and says how many pixels decoding will cost, so a server can
    admit the expensive step by that cost (``ierf.serving.admission.DecodeGate``)."""

    pixels: int  # height x width of the frame decoding will produce
    _decode: Callable[[], CanonicalImage]
    kind: str = "image"  # "PNG", "JPEG", "WEBP" or "tensor": decoding costs differ by kind

    def decode(self) -> CanonicalImage:
        return self._decode()


def content_hash(pixels: np.ndarray) -> str:
    """sha256 of the canonical array; the shape is hashed too so equal bytes in other shapes differ."""
    h = hashlib.sha256()
    h.update(f"uint8:{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}|".encode())
    h.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))
    return h.hexdigest()


def canonicalise(pixels: np.ndarray) -> CanonicalImage:
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return CanonicalImage(pixels=pixels, content_hash=content_hash(pixels))


# Said with the float errors a wrong byte order or layout produces (a big-endian float32 reads as NaN or huge).
_LAYOUT = "(raw tensors are little-endian, row-major (H, W, C))"


def _size(height: int, width: int) -> str:
    """Width x height, as image tools print sizes, with the axes named (tensors are (H, W, C))."""
    return f"{width} wide x {height} high"


def _check_dimensions(height: int, width: int, limits: ImageLimits, what: str) -> None:
    if height <= 0 or width <= 0:
        raise InvalidArgument(f"{what} has no pixels ({_size(height, width)})")
    if height > limits.max_side or width > limits.max_side:
        raise ResourceExhausted(f"{what} is {_size(height, width)}; each side must be at most {limits.max_side} pixels")
    if height * width > limits.max_pixels:
        raise ResourceExhausted(
            f"{what} is {_size(height, width)} = {height * width} pixels, over the cap of {limits.max_pixels}"
        )


# Pillow's words for the bombs it stops itself (PIL.Image._decompression_bomb_check, PngImagePlugin).
_PILLOW_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")
_PILLOW_CHUNK_BOMB = re.compile(r"decompressed data too large|too much memory used in text chunks", re.IGNORECASE)


def _bomb(what: str) -> ResourceExhausted:
    return ResourceExhausted(f"image rejected as a decompression bomb: {what}")


def _check_jpeg_structure(data: bytes) -> None:
    """Count scans and segments the way libjpeg meets them, without decoding anything.

    Walks marker segments by their length fields; after SOS the entropy-coded data runs to the next
    marker (stuffed 0xFF00 and RSTn do not end it). Stops at EOI, where libjpeg stops, or where the
    bytes run out. A malformed file may count more than libjpeg would read (it fails there), never less.
    """
    pos, size = 2, len(data)  # after SOI
    scans = segments = stray = 0
    while (found := _JPEG_MARKER.search(data, pos)) is not None:
        if scans == 0:
            stray += found.start() - pos
            if stray > MAX_JPEG_STRAY_BYTES:
                raise _bomb(
                    f"JPEG has over {MAX_JPEG_STRAY_BYTES} stray bytes (fill, junk or restart markers) "
                    "between its header segments"
                )
        code = data[found.start() + 1]
        if code == _JPEG_EOI:
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _bomb(f"JPEG has over {MAX_JPEG_SEGMENTS} marker segments (an ordinary JPEG has under 100)")
        pos = found.end()
        if code == _JPEG_SOI:  # a second SOI has no length; libjpeg refuses it, counting on is harmless
            continue
        if pos + 2 > size:
            return
        length = (data[pos] << 8) | data[pos + 1]
        pos += max(length, 2)
        if code == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _bomb(
                    f"JPEG has over {MAX_JPEG_SCANS} scans (an ordinary progressive JPEG has about 10), "
                    "and each scan is another pass over the whole image"
                )


def _check_png_structure(data: bytes) -> None:
    """Count chunks up to IEND by their length fields; stops early once a cap is passed. A chunk type
    that is not four ASCII letters, or a first chunk other than IHDR, is corruption (Pillow refuses it
    too): said so at once, so a run of zero bytes is not counted as chunks and taken for a bomb."""
    pos, size = len(_PNG_SIGNATURE), len(data)
    chunks = ancillary = compressed = 0
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if not kind.isalpha():
            raise InvalidArgument(
                f"image bytes are truncated or corrupt: PNG chunk {chunks + 1} at byte {pos} has type {kind!r}, "
                "not four ASCII letters"
            )
        if chunks == 0 and kind != b"IHDR":
            raise InvalidArgument(f"image bytes are truncated or corrupt: PNG starts with a {kind!r} chunk, not IHDR")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _bomb(f"PNG has over {MAX_PNG_CHUNKS} chunks")
        if kind in _PNG_COMPRESSED_CHUNKS:
            compressed += 1
            if compressed > MAX_PNG_COMPRESSED_CHUNKS:
                raise _bomb(
                    f"PNG has over {MAX_PNG_COMPRESSED_CHUNKS} compressed text or colour-profile chunks, each "
                    "inflated (up to 1 MiB, a profile without limit) as the header is read; an ordinary PNG has a few"
                )
        if kind[0] & 0x20 and kind not in _APNG_FRAME_CHUNKS:  # lower-case first letter: ancillary
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                raise _bomb(
                    f"PNG has over {MAX_PNG_ANCILLARY_CHUNKS} ancillary chunks (text, metadata); "
                    "an ordinary PNG has a handful"
                )
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, data, CRC


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_bytes(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    """Bytes of filtered scanlines (a filter byte per row) that a PNG's header declares."""
    bits = _PNG_CHANNELS.get(colour, 4) * depth
    if not interlace:
        return height * (1 + (width * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        cols, rows = max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy)
        if cols and rows:
            total += rows * (1 + (cols * bits + 7) // 8)
    return total


def _check_png_rows(data: bytes) -> None:
    """A PNG whose compressed pixel data ends (a complete zlib stream, then IEND) before the rows its header
    declares: Pillow fills the missing rows with black and says nothing, so the image the caller never sent
    would be explained (and cached). The data is inflated once more, counted in 1 MiB pieces (called after
    the pixel caps, so at most their size), and only up to the declared length."""
    pos = len(_PNG_SIGNATURE)
    inflate = zlib.decompressobj()
    expected = got = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            expected = _png_data_bytes(*struct.unpack_from(">IIBB", body), body[12])
        elif kind == b"IDAT":
            try:
                while body and got < expected and not inflate.eof:
                    got += len(inflate.decompress(body, 1 << 20))
                    body = inflate.unconsumed_tail
            except zlib.error:
                return  # corrupt data: Pillow's own decoder says so, in its words
        elif kind == b"IEND":
            break
        if got >= expected > 0:
            return
        pos += 12 + length
    if expected and got < expected:
        raise InvalidArgument(
            f"image bytes are truncated or corrupt: the PNG's pixel data ends after {got} of the {expected} bytes "
            "its header declares (rows missing)"
        )


def _check_structure(data: bytes) -> None:
    """Refuse JPEG/PNG files whose structure would make decoding cost far more than their size."""
    if data[:3] == b"\xff\xd8\xff":  # what Pillow accepts as JPEG
        _check_jpeg_structure(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png_structure(data)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any decoded mode -> uint8 RGB, by the same rule as the CLI (:func:`ierf.images.to_rgb_array`):
    16-bit greys scaled to 8 bits, alpha dropped, palettes expanded. Same pixels -> same cache key."""
    from ierf.images import to_rgb_array

    try:
        return to_rgb_array(im)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"image cannot be converted to 8-bit RGB: {exc}") from None


@contextlib.contextmanager
def _pillow_errors(data: bytes, limits: ImageLimits, what: str) -> Iterator[None]:
    """Pillow's ways of failing, as the caller's mistakes they are (``what`` names the image)."""
    try:
        with warnings.catch_warnings():
            # PIL warns (and past 2x raises) on huge images; our own cap is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except (ResourceExhausted, InvalidArgument):
        raise
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"image bytes are not a readable {'/'.join(ACCEPTED_FORMATS)} file ({len(data)} bytes, "
            f"starting {data[:8].hex(' ')})"
        ) from None
    except Image.DecompressionBombError as exc:  # a header past twice Pillow's own limit, before ours runs
        declared = _PILLOW_BOMB_PIXELS.search(str(exc))
        pixels = int(declared.group(1)) if declared else None
        if pixels is not None and pixels > limits.max_pixels:
            raise _bomb(f"the {what} declares {pixels} pixels, over the cap of {limits.max_pixels}") from None
        raise _bomb(f"the {what} declares more pixels than the decoder reads ({exc})") from None  # a cap raised past it
    except ValueError as exc:
        if _PILLOW_CHUNK_BOMB.search(str(exc)):  # a PNG text or ICC chunk that inflates past Pillow's limit
            raise _bomb(f"a compressed chunk of the {what} inflates past Pillow's limit ({exc})") from None
        raise InvalidArgument(f"image bytes are truncated or corrupt: {exc}") from None
    except (OSError, SyntaxError, EOFError) as exc:  # how Pillow reports bad data
        raise InvalidArgument(f"image bytes are truncated or corrupt: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # anything else out of Pillow (struct.error, TypeError, IndexError, ...)
        logger.debug("decoding a %d-byte %s failed: %r", len(data), what, exc)
        raise InvalidArgument(
            f"image bytes are truncated or corrupt: the {what} could not be decoded ({len(data)} bytes)"
        ) from None


def open_encoded(data: bytes, limits: ImageLimits) -> PendingImage:
    """PNG / JPEG / WebP bytes, checked up to the header. Raises InvalidArgument / ResourceExhausted."""
    if not data:
        raise InvalidArgument("image is empty: no encoded bytes and no tensor")
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(f"encoded image is {len(data)} bytes, over the cap of {limits.max_bytes}")
    _check_structure(data)  # before Image.open: Pillow's header parser is part of the cost
    with _pillow_errors(data, limits, "image"):
        im = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    what = f"{im.format} image"
    # Header only so far: check the announced size before decoding any pixel.
    width, height = im.size
    _check_dimensions(height, width, limits, what)

    def decode() -> CanonicalImage:
        with _pillow_errors(data, limits, what):
            if im.format == "PNG":
                _check_png_rows(data)
            im.load()
            upright = apply_exif_orientation(im)
        pixels = _to_rgb_array(upright)
        _check_dimensions(pixels.shape[0], pixels.shape[1], limits, "decoded image")
        return canonicalise(pixels)

    return PendingImage(height * width, decode, str(im.format))


def decode_encoded(data: bytes, limits: ImageLimits) -> CanonicalImage:
    """PNG / JPEG / WebP bytes -> canonical image. Raises InvalidArgument / ResourceExhausted."""
    return open_encoded(data, limits).decode()


def decode_tensor(data: bytes, dtype: str, shape: list[int], limits: ImageLimits) -> CanonicalImage:
    """Raw HWC tensor -> canonical image.

    Accepted: (H, W, 3) RGB or (H, W) / (H, W, 1) grey; uint8 0..255 or float16/float32 in [0, 1]
    (rounded to the nearest uint8 level), little-endian row-major.
    """
    return open_tensor(data, dtype, shape, limits).decode()


def open_tensor(data: bytes, dtype: str, shape: Sequence[int], limits: ImageLimits) -> PendingImage:
    """A raw tensor checked up to its shape and size (see :func:`decode_tensor`); values are read later."""
    if dtype not in TENSOR_DTYPES:
        raise InvalidArgument(f"tensor dtype {dtype!r} is not accepted; use one of {', '.join(TENSOR_DTYPES)}")
    if len(shape) not in (2, 3):  # said before anything is copied: a shape of millions of dims costs nothing
        head = ", ".join(str(int(s)) for s in shape[:4]) + (", …" if len(shape) > 4 else "")
        raise InvalidArgument(
            f"tensor shape [{head}] has {len(shape)} dimensions: it is not (H, W, 3), (H, W, 1) or (H, W)"
        )
    shape = [int(s) for s in shape]
    if len(shape) == 2:
        shape = [*shape, 1]
    if shape[2] not in (1, 3):
        raise InvalidArgument(f"tensor shape {shape} is not (H, W, 3), (H, W, 1) or (H, W)")
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"tensor shape {shape} has a negative dimension")
    if len(data) > limits.max_bytes:
        raise ResourceExhausted(f"tensor is {len(data)} bytes, over the cap of {limits.max_bytes}")
    if shape[0] * shape[1] == 0:
        if not data:
            raise InvalidArgument("image is empty: the tensor has no data")
        raise InvalidArgument(f"tensor image has no pixels ({_size(shape[0], shape[1])})")
    # Data that does not fill its shape is a malformed request, whatever the shape claims: said before
    # the pixel caps, whose RESOURCE_EXHAUSTED would send the caller looking for a smaller image.
    np_dtype = np.dtype(dtype).newbyteorder("<")
    expected = shape[0] * shape[1] * shape[2] * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(f"tensor data is {len(data)} bytes but shape {shape} of {dtype} needs {expected} bytes")
    _check_dimensions(shape[0], shape[1], limits, "tensor image")
    return PendingImage(shape[0] * shape[1], lambda: _tensor_pixels(data, dtype, np_dtype, shape), "tensor")


def _tensor_pixels(data: bytes, dtype: str, np_dtype: np.dtype, shape: list[int]) -> CanonicalImage:
    array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if dtype != "uint8":
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise InvalidArgument(f"float tensor contains NaN or infinity {_LAYOUT}")
        outside = (values < 0.0) | (values > 1.0)
        if outside.any():
            first = np.unravel_index(int(np.argmax(outside)), values.shape)
            where = ", ".join(str(int(i)) for i in first)
            # str of a float32: the shortest digits that name the value (1.0000001, not 1)
            raise InvalidArgument(
                f"float tensor values must lie in [0, 1]; got values from {values.min()!s} to {values.max()!s} "
                f"(first outside at [{where}]: {values[first]!s}) {_LAYOUT}"
            )
        array = np.rint(values * 255.0).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return canonicalise(array)
