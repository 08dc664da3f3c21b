"""Images in, uint8 RGB out: one canonical pixel format for every model, cache key and overlay.

Everything the engine, CLI and service accept as an image passes through :func:`to_rgb_array`, so
greyscale, palette and RGBA inputs behave the same whether they arrive as a file, bytes, a PIL image
or a numpy array. Alpha is dropped (not composited): the model sees the colour channels as stored.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | np.ndarray

# PIL modes holding more than 8 bits per channel: scaled down to 8 bits instead of clipped.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# EXIF Orientation (tag 0x0112) -> the transpose that shows the image upright, as ImageOps.exif_transpose.
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1..8 (Pillow also reads it from XMP); 1 when absent or unreadable.

    A broken EXIF block (wrong types, bad offsets) counts as no orientation rather than a bad image.
    """
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return 1
    return value if type(value) is int and value in _ORIENTATION_TRANSPOSE else 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """``image`` turned the way its EXIF orientation says it is displayed.

    Unlike ImageOps.exif_transpose this never re-serialises the EXIF block, which raises on malformed
    tags (struct.error, TypeError) in files that otherwise decode fine.
    """
    image.load()  # Pillow turns a TIFF upright as it loads it (and drops the tag): read the tag after
    method = _ORIENTATION_TRANSPOSE.get(exif_orientation(image))
    if method is None:
        return image
    turned = image.transpose(method)
    for key in ("exif", "xmp", "XML:com.adobe.xmp"):  # the copy is upright: no orientation to apply again
        turned.info.pop(key, None)
    return turned


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 array of shape (H, W, 3).

    Accepts PIL images of any 8- or 16-bit mode and uint8 numpy arrays shaped (H, W), (H, W, 1),
    (H, W, 3) or (H, W, 4). Greyscale is replicated to three channels; alpha is dropped. A PIL image is
    turned upright by its EXIF orientation, as the SDK and the server turn it, so a phone photo gives the
    same map in-process and through the service.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(apply_exif_orientation(image))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"expected a PIL.Image or a uint8 numpy array, got {type(image).__name__}")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image is empty ({image.width}x{image.height})")
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return _array_to_rgb(grey)
    if image.mode in ("I", "F"):
        raise ValueError(
            f"image mode {image.mode!r} (32-bit integer/float pixels) has no defined 8-bit scale; "
            "convert it to 8-bit RGB or greyscale first"
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise TypeError(
            f"image array must have dtype uint8 (0..255 pixel values), got {array.dtype}; "
            "convert floats with (x * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        raise ValueError(
            f"image array must be shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty ({array.shape[1]}x{array.shape[0]})")
    return np.ascontiguousarray(array)


def load_image(source: str | os.PathLike[str] | bytes) -> np.ndarray:
    """Decode an image file (PNG, JPEG, WebP, BMP, GIF first frame, TIFF, …) to uint8 (H, W, 3).

    ``source`` is a path or the encoded bytes. EXIF orientation is applied, so a phone photo is
    explained the way it is displayed. Missing files raise FileNotFoundError; anything that does not
    decode raises ValueError naming the source.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        label = f"<{len(source)} bytes>"
        if len(source) == 0:
            raise ValueError("cannot read image from empty bytes")
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        stream = Path(source)
        label = repr(str(stream))
        if not stream.exists():
            raise FileNotFoundError(f"image file {label} does not exist")
        if stream.is_dir():
            raise ValueError(f"image path {label} is a directory, not an image file")
    else:
        raise TypeError(f"expected a path or bytes, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as opened:
                opened.load()  # force a full decode now: truncated files fail here, not later
                image = apply_exif_orientation(opened)
                return to_rgb_array(image)
    except UnidentifiedImageError:
        raise ValueError(f"cannot read image {label}: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.1f} Mpx" if found else "too large"
        raise ValueError(
            f"cannot read image {label}: it is {size}, over the {Image.MAX_IMAGE_PIXELS / 1e6:.1f} Mpx that Pillow "
            "decodes (its guard against decompression bombs); downscale it first"
        ) from None
    except (OSError, SyntaxError, EOFError) as exc:  # PIL reports corrupt data with these
        raise ValueError(f"cannot read image {label}: {exc}") from None


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file_name)

    return load


# Real photographs bundled inside installed wheels (nothing downloads). The EfficientNet-Lite0
# top-1 classes in the comments were checked with the bundled weights.
_DEMO_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "coffee": _skimage("coffee"),  # 967 espresso
    "chelsea": _skimage("chelsea"),  # 282 tiger cat / 285 Egyptian cat / 281 tabby
    "rocket": _skimage("rocket"),  # 657 missile
    "astronaut": _skimage("astronaut"),  # no confident class
    "motorcycle": _motorcycle,  # 665 moped
}
_SKLEARN_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "china": _sklearn("china.jpg"),  # 698 palace
    "flower": _sklearn("flower.jpg"),  # 985 daisy
}


def _sklearn_available() -> bool:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        return False
    return True


def demo_images() -> list[str]:
    """Names accepted by :func:`demo_image` in this environment (sklearn ones only if installed)."""
    names = list(_DEMO_IMAGES)
    if _sklearn_available():
        names += list(_SKLEARN_IMAGES)
    return names


def demo_image(name: str) -> np.ndarray:
    """A bundled real photograph as uint8 (H, W, 3), e.g. ``demo_image("coffee")``."""
    loader = _DEMO_IMAGES.get(name) or (_SKLEARN_IMAGES.get(name) if _sklearn_available() else None)
    if loader is None:
        hint = " (china and flower need scikit-learn)" if name in _SKLEARN_IMAGES else ""
        raise ValueError(f"unknown demo image {name!r}{hint}; available: {', '.join(demo_images())}")
    return to_rgb_array(np.asarray(loader()))


# Bump on any change to resize/crop/normalise arithmetic (here or in ierf.models.preprocessing): cached activations
# keyed by the old value must not be reused, and an ingress cuts a worker's view only under its own version.
PIPELINE_VERSION = 3  # 2: portrait images resized whole (torchvision's pixels exactly); 3: not strips over 16:1

# Largest whole resize of a portrait image (resize x its resized height): 16 times a 256^2 view, so any photo's
# aspect ratio (a 1:4 panorama is 256 x 1024) keeps torchvision's exact pixels.
WHOLE_RESIZE_MAX_PIXELS = 16 * 256 * 256


def resize_crop(image: ImageLike, resize: int, crop: int) -> np.ndarray:
    """uint8 (crop, crop, 3): short side resized to ``resize`` (PIL bilinear, antialiased), then the
    centre ``crop``² (see :meth:`ierf.models.Preprocessing.resize_crop`). Torch-free, so the serving
    ingress computes the very pixels a worker would. Any change to the arithmetic here must bump
    :data:`PIPELINE_VERSION` (cached activations are keyed by it)."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if height <= width:
        new_h, new_w = resize, int(resize * width / height)
    else:
        new_h, new_w = int(resize * height / width), resize
    if min(new_h, new_w) < crop:
        raise ValueError(f"resize {resize} is smaller than crop {crop}")
    top = round((new_h - crop) / 2)
    left = round((new_w - crop) / 2)
    if height > width and new_h * new_w <= WHOLE_RESIZE_MAX_PIXELS:
        # A box of rows: Pillow places the vertical filter from the box's float offset, whose rounding
        # moved a third to a half of a portrait photo's pixels by one level against torchvision's whole
        # resize. Resizing the whole image (~1.5 ms more for a phone photo) gives its pixels exactly. Not
        # for a strip far taller than wide: a 16384x1 image would become 256 x 4,194,304 pixels (24 s, 4 GB)
        # for one 224x224 crop, so past the cap its rows are a box like a panorama's columns.
        whole = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR)
        return np.array(whole.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    scale_y, scale_x = height / new_h, width / new_w
    box = (
        left * scale_x,
        top * scale_y,
        (left + crop) * scale_x,
        (top + crop) * scale_y,
    )
    resampled = Image.fromarray(rgb).resize((crop, crop), Image.Resampling.BILINEAR, box=box)
    return np.array(resampled, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one
