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
  (decompression bombs are refused cheaply), and so is the work a file would
  cost (:class:`DecodeLimits`): the memory its decoded pixels and
  intermediates need, estimated from the header for every format and mode,
  and for JPEG the number of scans (a progressive JPEG of thousands of scans
  costs a full pass over the image per scan) and arithmetic or lossless
  coding, which the decoder does not support (415, not 422);
* a deadline is checked between the decoding stages, so a request that has
  already been answered (504) stops costing work at the next stage;
* EXIF orientation is applied, so a rotated phone photo is upright;
* modes L, LA, P (with transparency), RGBA, CMYK, I;16 and friends become RGB;
  transparent areas are composited onto white (the slide background);
* multi-frame files (TIFF stacks) use their first frame;
* JPEGs are decoded at reduced scale (libjpeg DCT scaling via ``draft``) when
  the target is much smaller than the image, which is several times faster;
* the last step, to the model input, is :func:`models.resampling.resample`:
  the whole image resized, or, given the upload's pixel size and the model's
  field of view, resampled to the model's pixel size (the slide path's step).

Errors are distinct types so the service can map them to HTTP statuses:
:class:`EmptyImageError` (400), :class:`ImageTooLargeError` (413),
:class:`UnsupportedImageError` (415), :class:`CorruptImageError` (422).

A little over 400 lines on purpose: every check above sits beside the decode
step it guards, so one reader sees the whole contract an upload crosses.
"""

from __future__ import annotations

import io
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.resampling import ModelScale, resample

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "TIFF"})
DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: well above whole-slide tiles, far below bombs
_WHITE = (255, 255, 255)

# Bytes per pixel while decoding, by PIL mode: the decoded frame itself; conversion to RGB and the
# resized output come on top (see estimated_decode_bytes).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "I": 4, "F": 4}
# Modes whose conversion goes through a wider array (16-bit and float grey: uint32/float32, then uint8).
_WIDE_CONVERSION = {"I;16": 5, "I;16L": 5, "I;16B": 5, "I;16N": 5, "I": 5, "F": 5}
# JPEG start-of-frame markers the decoder cannot read: lossless (C3, C7, CB, CF), arithmetic coding
# (C9-CB, CD-CF) and hierarchical frames (C5-C7, CD-CF).
_UNSUPPORTED_JPEG_FRAMES = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "lossless",
                            0xC9: "arithmetic-coded", 0xCA: "arithmetic-coded", 0xCB: "lossless",
                            0xCD: "arithmetic-coded", 0xCE: "arithmetic-coded", 0xCF: "lossless"}
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, *_UNSUPPORTED_JPEG_FRAMES}
_BOMB = "the image has more pixels than the decoder's bomb guard allows"


@dataclass(frozen=True)
class DecodeLimits:
    """What one upload may cost to decode; over any limit it is refused before its pixels are decoded.

    The defaults bound one decode to about 160 MiB and, measured here, well under a second of CPU;
    the service sets them from its settings (HISTO_MAX_PIXELS, HISTO_MAX_DECODE_BYTES, ...).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decoded_bytes: int = 160 * 1024 * 1024
    max_jpeg_scans: int = 32  # libjpeg's progressive script has 10 scans; other encoders stay under 20
    max_scan_pixels: int = 250_000_000  # scans x pixels (each scan is a pass over the image): about 1 s here


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one file would cost, from its header alone."""

    format: str
    width: int  # as decoded (after JPEG DCT scaling)
    height: int
    estimated_bytes: int
    scans: int  # JPEG scans (1 for everything else)
    source_pixels: int  # in the file, before any scaling

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def scan_pixels(self) -> int:
        """The decoding work: every scan is a pass over the file's pixels."""
        return self.scans * self.source_pixels


@dataclass(frozen=True)
class PreparedDecode:
    """An upload whose header passed every limit, ready to decode (see :func:`prepare_decode`)."""

    image: Image.Image  # opened, pixels not decoded yet
    format: str
    size: int | None
    cost: DecodeCost
    mpp: float | None = None  # the file's microns per pixel, when the sender gave it
    field_microns: float | None = None  # the model's field of view (see models.resampling.ModelScale)


class DecodeAbandonedError(RuntimeError):
    """The decode's deadline passed between two stages (its request has been answered already)."""


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


# Premultiplied alpha (a TIFF's "associated alpha"), undone first: PIL converts La to nothing else.
_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any supported PIL mode as RGB: an RGB image as it is, 16- and 32-bit grey scaled (not clipped) to
    8 bits, floats in 0-1 stretched to 0-255, transparency composited onto white; UnsupportedImageError
    for a mode PIL cannot convert."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: PIL's convert("RGB") would clip at 255, so scale instead. 32-bit ("I") values
        # that fit in 8 bits are kept as they are; negative ones are black, ones past 16 bits white.
        grey = np.asarray(image)
        top = 65535 if grey.max(initial=0) > 255 or mode != "I" else 255
        grey8 = (grey.clip(0, top).astype(np.uint32) * 255 // top).astype(np.uint8)  # no overflow: top < 2**24
        return Image.fromarray(grey8, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray((values * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _STRAIGHT_ALPHA:
        image = image.convert(_STRAIGHT_ALPHA[mode])
        mode = image.mode
    if mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, RGBX, ...
    except ValueError as exc:
        raise UnsupportedImageError(f"unsupported image mode {mode!r}") from exc


def jpeg_frame_and_scans(data: bytes) -> tuple[int | None, int]:
    """(start-of-frame marker, number of scans) of a JPEG, from its marker segments.

    Walks the header segments up to the first scan (a handful), then counts scan markers
    in the rest: in entropy-coded data a 0xFF byte is always stuffed (FF 00) or a restart
    marker, so FF DA can only be a scan header.
    """
    position, frame = 2, None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return frame, 0
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            position += 2
            continue
        if marker == 0xDA:
            return frame, data.count(b"\xff\xda", position)
        if marker in _JPEG_FRAMES and frame is None:
            frame = marker
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return frame, 0


def estimated_decode_bytes(mode: str, width: int, height: int, size: int | None) -> int:
    """Peak bytes to decode a frame of `mode` and make the RGB model input from it.

    Twice the frame: PIL's decoders fill a buffer of their own before the image's (measured: a
    6000x6000 lossless WebP peaked at 217 MB for a 108 MB RGB frame).
    """
    pixels = width * height
    frame = 2 * _MODE_BYTES.get(mode, 4) * pixels
    rgb = 0 if mode == "RGB" else 3 * pixels  # the converted copy
    wide = _WIDE_CONVERSION.get(mode, 0) * pixels
    output = 3 * size * size if size is not None else 2 * 3 * pixels  # at full size: the image and its array
    return frame + rgb + wide + output


def _check_deadline(deadline: float | None, stage: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DecodeAbandonedError(f"deadline passed before {stage}")


def _open(data: bytes, fmt: str) -> Image.Image:
    try:
        # Restricting `formats` stops PIL from trying every other parser.
        return Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(_BOMB) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error,
            EOFError) as exc:
        # PIL's messages can name internal objects (<_io.BytesIO object at 0x...>): say it plainly.
        raise CorruptImageError(f"cannot read the {fmt} header: the file is damaged or not really {fmt}") from exc


def _draft_size(width: int, height: int, size: int, scale: float | None) -> tuple[int, int]:
    """The smallest size JPEG DCT scaling may reduce to: the model input, or, resampling by `scale`
    (input pixels per file pixel), every pixel the resampled crop needs."""
    if scale is None:
        return size, size
    return max(1, math.ceil(width * min(scale, 1.0))), max(1, math.ceil(height * min(scale, 1.0)))


def _plan(image: Image.Image, data: bytes, fmt: str, size: int | None, limits: DecodeLimits,
          scale: float | None = None) -> DecodeCost:
    """Check an opened (header-only) image against the limits; sets JPEG DCT scaling. Raises the 413/415."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"{fmt} image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    scans = 1
    coefficients = 0
    if fmt == "JPEG":
        frame, scans = jpeg_frame_and_scans(data)
        if frame in _UNSUPPORTED_JPEG_FRAMES:
            raise UnsupportedImageError(
                f"{_UNSUPPORTED_JPEG_FRAMES[frame]} JPEG is not supported; send a baseline or progressive JPEG, "
                "PNG, WebP or TIFF"
            )
        if scans > limits.max_jpeg_scans:
            raise ImageTooLargeError(f"JPEG has {scans} scans; the limit is {limits.max_jpeg_scans}")
        if scans * width * height > limits.max_scan_pixels:
            raise ImageTooLargeError(
                f"JPEG of {width}x{height} pixels in {scans} scans is too much decoding work "
                f"({scans * width * height} scan-pixels; the limit is {limits.max_scan_pixels})"
            )
        if frame == 0xC2:  # progressive: libjpeg keeps every DCT coefficient of the full frame (2 bytes each)
            coefficients = 2 * len(image.getbands()) * width * height
        if size is not None and image.mode in ("RGB", "L", "CMYK"):
            # DCT-domain downscaling to the smallest scale that keeps the pixels the model input needs
            image.draft(image.mode, _draft_size(width, height, size, scale))
    decoded_width, decoded_height = image.size
    estimated = coefficients + estimated_decode_bytes(image.mode, decoded_width, decoded_height, size)
    if estimated > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            f"decoding this {width}x{height} {image.mode} {fmt} would need about {estimated >> 20} MiB; "
            f"the limit is {limits.max_decoded_bytes >> 20} MiB"
        )
    return DecodeCost(fmt, decoded_width, decoded_height, estimated, scans, width * height)


def _sniffed(data: bytes) -> str:
    if not data:
        raise EmptyImageError("the file is empty")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise UnsupportedImageError("not a supported image; send JPEG, PNG, WebP or TIFF")
    return fmt


def prepare_decode(
    source: bytes | bytearray | memoryview | str | Path, size: int | None, limits: DecodeLimits,
    mpp: float | None = None, field_microns: float | None = None,
) -> PreparedDecode:
    """Read the header and check it against `limits`: the cheap first half of a decode.

    With the file's pixel size (`mpp`) and the model's field of view (`field_microns`, both known),
    the image is resampled to the model's pixel size instead of resized whole (see
    :mod:`models.resampling`); the limits are the same.

    Raises the same errors as :func:`decode_image` for everything the header shows. Pass the
    result to :func:`finish_decode` (possibly on another thread, e.g. one for expensive decodes).
    """
    data = _read_source(source)
    fmt = _sniffed(data)
    image = _open(data, fmt)
    rescaled = size is not None and mpp is not None and field_microns is not None
    scale = mpp / (field_microns / size) if rescaled else None  # type: ignore[operator]
    try:
        cost = _plan(image, data, fmt, size, limits, scale)
        return PreparedDecode(image, fmt, size, cost, mpp if rescaled else None, field_microns)
    except BaseException:
        image.close()
        raise


def decode_cost(
    source: bytes | bytearray | memoryview | str | Path, size: int | None, limits: DecodeLimits | None = None
) -> DecodeCost:
    """What decoding `source` for a model of input `size` would cost, from the header alone."""
    prepared = prepare_decode(source, size, limits or DecodeLimits())
    prepared.image.close()
    return prepared.cost


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
        max_pixels: refuse images with more pixels than this (the other limits at their defaults).

    Raises:
        EmptyImageError, UnsupportedImageError, CorruptImageError,
        ImageTooLargeError (all subclasses of :class:`ImageDecodeError`).
    """
    return decode_upload(source, size, DecodeLimits(max_pixels=max_pixels))[0]


def decode_upload(
    source: bytes | bytearray | memoryview | str | Path,
    size: int | None,
    limits: DecodeLimits,
    deadline: float | None = None,
) -> tuple[np.ndarray, DecodeCost]:
    """:func:`decode_image` under explicit `limits`, also returning what the decode cost.

    Args:
        deadline: a `time.monotonic()` value; past it, the next stage raises DecodeAbandonedError.
    """
    prepared = prepare_decode(source, size, limits)
    return finish_decode(prepared, deadline), prepared.cost


def finish_decode(prepared: PreparedDecode, deadline: float | None = None) -> np.ndarray:
    """Decode a prepared upload into the RGB uint8 array (see :func:`decode_image`); closes its image."""
    fmt, size, cost = prepared.format, prepared.size, prepared.cost
    with prepared.image as image:
        try:
            _check_deadline(deadline, "decoding")
            image.load()
            _check_deadline(deadline, "conversion")
            upright = ImageOps.exif_transpose(image)
            rgb = to_rgb(upright)
            _check_deadline(deadline, "resizing")
            # DCT scaling made the pixels larger by the share of the file's pixels that were decoded.
            mpp = None if prepared.mpp is None else prepared.mpp * math.sqrt(cost.source_pixels / cost.pixels)
            resized = rgb if size is None else resample(rgb, ModelScale(size, prepared.field_microns), mpp)
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(_BOMB) from exc
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error, EOFError, IndexError,
                ZeroDivisionError) as exc:
            # PIL reports truncation and damaged streams through these (a TIFF tag of the wrong type reaches
            # its loader as a TypeError: found by the mutation test); its own message (chained as the
            # cause) can name internal objects, so the client gets a plain one.
            raise CorruptImageError(f"cannot decode the {fmt} image: it is truncated or damaged") from exc
    array = resized if isinstance(resized, np.ndarray) else np.asarray(resized, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or (size is not None and array.shape[:2] != (size, size)):
        raise CorruptImageError(f"decoded to unexpected shape {array.shape}")
    return array
