"""The image preprocessing contract shared by training and serving.

One function, :func:`decode_image`, turns image bytes or a file path into the
RGB ``uint8`` array of shape ``(size, size, 3)`` that models take. Training
decodes every tile through it and the service decodes every upload through it,
so the two paths cannot drift apart. Scaling to [0, 1] and any further resizing
live inside the Keras model.

What it guarantees:

* the format is sniffed from the bytes (never from a file name or a declared
  content type) and must be one of :data:`ALLOWED_FORMATS`;
* dimensions are checked against a pixel cap *before* pixels are decoded
  (decompression bombs are refused cheaply);
* EXIF orientation is applied, so a rotated phone photo is upright;
* modes L, LA, P (with transparency), RGBA, CMYK, I;16 and friends become RGB;
  transparent areas are composited onto white (the slide background);
* multi-frame files (TIFF stacks) use their first frame;
* JPEGs are decoded at reduced scale (libjpeg DCT scaling via ``draft``) when
  the target is much smaller than the image, which is several times faster.

Errors are distinct types so the service can map them to HTTP statuses:
:class:`EmptyImageError` (400), :class:`ImageTooLargeError` (413),
:class:`UnsupportedImageError` (415), :class:`CorruptImageError` (422).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "TIFF"})
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: well above whole-slide tiles, far below bombs
_WHITE = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Base class: the input cannot become a model input."""


class EmptyImageError(ImageDecodeError):
    """The input has no bytes at all."""


class UnsupportedImageError(ImageDecodeError):
    """Not an image, or a format/mode outside the allowlist."""


class CorruptImageError(ImageDecodeError):
    """Claims to be an allowed format but cannot be decoded (truncated, damaged)."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the configured cap (decompression-bomb guard)."""


def sniff_format(head: bytes) -> str | None:
    """Return the allowed format named by the file's magic bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _read_source(source: bytes | bytearray | memoryview | str | Path) -> bytes:
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    return bytes(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to RGB (transparency onto white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: PIL's convert("RGB") would clip at 255, so scale instead.
        grey = np.asarray(image, dtype=np.uint32)
        top = 65535 if grey.max(initial=0) > 255 or mode != "I" else 255
        grey8 = (grey * 255 // max(top, 1)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(grey8, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray((values * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, ...
    except ValueError as exc:
        raise UnsupportedImageError(f"unsupported image mode {mode!r}") from exc


def decode_image(
    source: bytes | bytearray | memoryview | str | Path,
    size: int | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode an image into the model's RGB uint8 input of shape (size, size, 3).

    Args:
        source: the encoded file, as bytes or a path.
        size: target width and height in pixels (the model's input size);
            None keeps the upright image at its own size, shape (height, width, 3).
        max_pixels: refuse images with more pixels than this.

    Raises:
        EmptyImageError, UnsupportedImageError, CorruptImageError,
        ImageTooLargeError (all subclasses of :class:`ImageDecodeError`).
    """
    data = _read_source(source)
    if not data:
        raise EmptyImageError("the file is empty")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise UnsupportedImageError("not a supported image; send JPEG, PNG, WebP or TIFF")
    try:
        # Restricting `formats` stops PIL from trying every other parser.
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        raise CorruptImageError(f"cannot read {fmt} image: {exc}") from exc

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"{fmt} image has no pixels")
        if width * height > max_pixels:
            raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
        try:
            if size is not None and fmt == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
                # DCT-domain downscaling to the smallest scale >= size.
                image.draft(image.mode, (size, size))
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = _to_rgb(upright)
            resized = rgb if size is None else rgb.resize((size, size), Image.Resampling.BILINEAR)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc)) from exc
        except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, ZeroDivisionError) as exc:
            # PIL reports truncation and damaged streams through these.
            raise CorruptImageError(f"cannot decode {fmt} image: {exc}") from exc
    array = np.asarray(resized, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or (size is not None and array.shape[:2] != (size, size)):
        raise CorruptImageError(f"decoded to unexpected shape {array.shape}")
    return array
