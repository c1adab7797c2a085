"""The shared decode function: formats, modes, orientation, and every rejection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocessing import (
    CorruptImageError,
    EmptyImageError,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    sniff_format,
    to_rgb,
)
from tests.helpers import encode, gradient_image, png_header_only

SIZE = 32


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_allowed_formats_decode_to_rgb_uint8(make_image, fmt):
    array = decode_image(make_image("RGB", fmt), SIZE)
    assert array.dtype == np.uint8
    assert array.shape == (SIZE, SIZE, 3)
    assert array.std() > 10  # the gradient survived, not a blank image


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("1", "PNG"),
        ("I;16", "PNG"),
        ("L", "JPEG"),
        ("RGBA", "WEBP"),
    ],
)
def test_every_mode_becomes_rgb(make_image, mode, fmt):
    array = decode_image(make_image(mode, fmt), SIZE)
    assert array.shape == (SIZE, SIZE, 3)
    assert array.dtype == np.uint8
    # The content, not just the shape: what the gradient looks like in that mode, computed from the
    # source pixels without the decoder (JPEG and WebP are lossy: a few levels of slack on average).
    expected = np.asarray(_in_mode(gradient_image(), mode).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    assert np.abs(array.astype(int) - expected).mean() < (6 if fmt in ("JPEG", "WEBP") else 1.5), mode
    assert expected.std() > 10 or mode == "I;16"  # the comparison is not between two blank images


def _in_mode(rgb: Image.Image, mode: str) -> Image.Image:
    """The RGB source as a file in `mode` shows it, back in RGB (transparency: none in the source)."""
    if mode == "I;16":  # 8-bit values stored in 16 bits: 255 of 65535 is nearly black
        grey = np.asarray(rgb.convert("L"), dtype=np.uint32) * 255 // 65535
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK":  # PIL's naive conversion, inverted by hand
        cmyk = np.asarray(rgb.convert("CMYK")).astype(int)
        return Image.fromarray((255 - cmyk[..., :3]).clip(0, 255).astype(np.uint8), "RGB")
    if mode == "1":  # dithered: every pixel black or white
        bits = np.asarray(rgb.convert("1"), dtype=np.uint8) * 255
        return Image.fromarray(np.repeat(bits[..., None], 3, axis=2), "RGB")
    if mode in ("L", "LA"):
        grey = np.asarray(rgb.convert("L"))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "P":
        return rgb.convert("P").convert("RGB")
    return rgb


def test_grayscale_gives_equal_channels(make_image):
    array = decode_image(make_image("L", "PNG"), SIZE)
    assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])
    assert array.std() > 10  # the gradient, not a flat grey


def test_sixteen_bit_is_scaled_not_clipped():
    # A 16-bit ramp over the full range must span the full 8-bit range (PIL's
    # plain convert would clip everything above 255 to white).
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I;16")
    data = encode(image, "PNG")
    array = decode_image(data, 64)
    assert array.min() < 10 and array.max() > 245
    assert 100 < array.mean() < 155


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (200, 0, 0, 0))  # fully transparent red
    assert decode_image(encode(rgba, "PNG"), 16).min() == 255
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    transparent = encode(palette, "PNG", transparency=0)
    assert decode_image(transparent, 16).min() == 255


def test_exif_orientation_six_is_applied(tile_image):
    upright = decode_image(encode(tile_image, "PNG"), 64)
    # Orientation 6 means "rotate 90 clockwise to view": store it rotated the other way.
    stored = tile_image.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_image(encode(stored, "PNG", exif=exif), 64)
    ignored = decode_image(encode(stored, "PNG"), 64)
    assert np.abs(turned.astype(int) - upright).mean() < 1.0
    assert np.abs(ignored.astype(int) - upright).mean() > 10.0


def test_multi_frame_tiff_uses_first_frame():
    first, second = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    assert tuple(decode_image(data, 8)[0, 0]) == (255, 0, 0)


def test_bytes_and_path_give_identical_arrays(tmp_path, tile_image):
    path = tmp_path / "tile.jpeg"
    tile_image.save(path, format="JPEG", quality=90)
    assert np.array_equal(decode_image(path, 64), decode_image(path.read_bytes(), 64))


def test_jpeg_draft_decoding_is_close_to_full_decode(tile_image):
    data = encode(tile_image, "JPEG", quality=95)
    fast = decode_image(data, 64)
    with Image.open(io.BytesIO(data)) as full:
        reference = np.asarray(full.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(fast.astype(int) - reference).mean() < 4.0


def test_empty_input_is_rejected():
    with pytest.raises(EmptyImageError):
        decode_image(b"", SIZE)


@pytest.mark.parametrize(
    "payload",
    [
        b"hello, this is text",
        b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",  # a pickle
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b'{"image": "not really"}',
        b"https://example.org/tile.jpeg",
    ],
    ids=["text", "pickle", "svg", "pdf", "json", "url"],
)
def test_non_images_are_unsupported(payload):
    with pytest.raises(UnsupportedImageError):
        decode_image(payload, SIZE)


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_formats_outside_the_allowlist_are_unsupported(make_image, fmt):
    with pytest.raises(UnsupportedImageError):
        decode_image(make_image("RGB", fmt), SIZE)


def test_truncated_jpeg_is_corrupt(tile_image):
    data = encode(tile_image, "JPEG", quality=90)
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2], SIZE)


def test_damaged_png_is_corrupt(make_image):
    data = bytearray(make_image("RGB", "PNG"))
    data[40:80] = b"\x00" * 40  # smash the compressed stream
    with pytest.raises(CorruptImageError):
        decode_image(bytes(data), SIZE)


def test_decompression_bomb_is_too_large():
    bomb = png_header_only(10_000, 10_000)  # 100 megapixels in < 100 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, SIZE)


def test_pixel_cap_is_configurable(make_image):
    data = make_image("RGB", "PNG", size=(100, 100))
    assert decode_image(data, SIZE, max_pixels=10_000).shape == (SIZE, SIZE, 3)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, SIZE, max_pixels=9_999)


def test_all_errors_share_one_base_class():
    for error in (EmptyImageError, UnsupportedImageError, CorruptImageError, ImageTooLargeError):
        assert issubclass(error, ImageDecodeError)


def test_sniffing_ignores_names_and_declared_types(make_image):
    assert sniff_format(make_image("RGB", "JPEG")[:16]) == "JPEG"
    assert sniff_format(make_image("RGB", "WEBP")[:16]) == "WEBP"
    assert sniff_format(b"GIF89a") is None


_VALID_FILES = {
    fmt: encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)), fmt)
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF")
}


def _decode_or_documented_error(data: bytes) -> None:
    try:
        array = decode_image(data, 32, max_pixels=4_000_000)
    except ImageDecodeError:
        return  # one of the four documented errors: the service maps it to a 4xx
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_documented_errors(data):
    _decode_or_documented_error(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(_VALID_FILES)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    st.one_of(st.none(), st.integers(1, 10_000)),
)
def test_mutated_images_raise_only_documented_errors(fmt, flips, truncate_at):
    data = bytearray(_VALID_FILES[fmt])
    for position, value in flips:  # overwrite bytes anywhere, headers included
        data[position % len(data)] = value
    if truncate_at is not None:
        data = data[: truncate_at % len(data)]
    _decode_or_documented_error(bytes(data))


def _grey(mode: str, values: list[int | float]) -> Image.Image:
    """A one-row image of `mode` holding `values`, written as raw bytes in the mode's own layout."""
    layout = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "<i4", "F": "<f4"}[mode]
    return Image.frombytes(mode, (len(values), 1), np.array(values, dtype=layout).tobytes())


@pytest.mark.parametrize(("mode", "values", "expected"), [
    # 16 bits: scaled from the full 16-bit range, whatever the byte order.
    *[(mode, [0, 257, 1000, 65535], [0, 1, 3, 255]) for mode in ("I;16", "I;16L", "I;16B", "I;16N")],
    ("I", [0, 100, 255], [0, 100, 255]),  # 32-bit values within 8 bits: as they are
    ("I", [-5, 200], [0, 200]),  # negative: black, and the rest still within 8 bits
    ("I", [0, 300, 65535, 70_000], [0, 1, 255, 255]),  # beyond 8 bits: the 16-bit scale, clipped
    ("I", [0, 128, 256], [0, 0, 0]),  # one level past 8 bits is enough for the 16-bit scale
    ("F", [0.0, 0.5, 1.0, float("nan")], [0, 127, 255, 0]),  # 0-1 floats stretched; NaN is black
    ("F", [0.0, 2.5, 300.0, -3.0], [0, 2, 255, 0]),  # other floats as 0-255 levels, clipped
    ("F", [0.0, 1.5], [0, 1]),  # just past 1: already levels, not a fraction
])
def test_wide_grey_modes_become_8_bit_grey(mode, values, expected):
    rgb = np.asarray(to_rgb(_grey(mode, values)))
    assert rgb.shape == (1, len(values), 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == expected and (rgb == rgb[..., :1]).all(), mode


def _over_white(colour: tuple[int, ...], alpha: int) -> list[int]:
    return [round((c * alpha + 255 * (255 - alpha)) / 255) for c in colour]


def test_transparent_modes_are_composited_onto_white():
    pixels = [((200, 0, 0), 0), ((200, 0, 0), 255), ((100, 50, 0), 128)]
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(*colour, alpha) for colour, alpha in pixels])
    la = Image.new("LA", (3, 1))
    la.putdata([(colour[0], alpha) for colour, alpha in pixels])
    for image, colours in ((rgba, [c for c, _ in pixels]), (la, [(c[0],) * 3 for c, _ in pixels])):
        got = np.asarray(to_rgb(image)).astype(int)
        want = [_over_white(colour, alpha) for colour, (_, alpha) in zip(colours, pixels, strict=True)]
        np.testing.assert_allclose(got[0], want, atol=1), image.mode
    palette = Image.new("PA", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([(0, 0), (1, 255)])
    assert np.asarray(to_rgb(palette))[0].tolist() == [[255, 255, 255], [200, 100, 50]]


def test_premultiplied_alpha_is_undone_before_compositing():
    # Stored premultiplied (a TIFF's associated alpha): a colour of 100 at alpha 128 is stored as 50.
    premultiplied = Image.new("RGBa", (1, 1), (50, 25, 0, 128))
    np.testing.assert_allclose(np.asarray(to_rgb(premultiplied)).astype(int)[0, 0], _over_white((100, 50, 0), 128),
                               atol=2)
    grey = Image.new("La", (1, 1), (50, 128))
    np.testing.assert_allclose(np.asarray(to_rgb(grey)).astype(int)[0, 0], _over_white((100,) * 3, 128), atol=2)


def test_an_rgb_image_is_passed_through_and_other_modes_are_converted_by_pil():
    rgb = Image.new("RGB", (2, 2), (10, 20, 30))
    assert to_rgb(rgb) is rgb  # no copy
    for mode, colour in (("L", 90), ("1", 1), ("CMYK", (0, 128, 255, 20)), ("YCbCr", (120, 100, 160)),
                         ("LAB", (60, 140, 100)), ("RGBX", (10, 20, 30, 0)), ("HSV", (40, 200, 180))):
        image = Image.new(mode, (2, 2), colour)
        converted = to_rgb(image)
        assert converted.mode == "RGB" and np.array_equal(np.asarray(converted), np.asarray(image.convert("RGB")))
    opaque_palette = Image.new("P", (1, 1), 1)
    opaque_palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert np.asarray(to_rgb(opaque_palette))[0, 0].tolist() == [200, 100, 50]


@pytest.mark.parametrize(("channels", "mode"), [(2, "La"), (4, "RGBA")])
def test_tiffs_with_associated_alpha_decode(channels, mode):
    import tifffile

    pixels = np.zeros((8, 8, channels), np.uint8)
    pixels[..., :-1], pixels[..., -1] = 50, 128  # 100 premultiplied by 128/255
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="minisblack" if channels == 2 else "rgb",
                     extrasamples=["assocalpha"])
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
    np.testing.assert_allclose(decode_image(buffer.getvalue(), 8).astype(int), _over_white((100,), 128)[0], atol=2)


def test_a_32_bit_grey_tiff_keeps_its_levels():
    import tifffile

    levels = np.tile(np.array([-5, 0, 100, 200, 255, 7, 30, 60], np.int32), (8, 1))
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, levels)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I"
    decoded = decode_image(buffer.getvalue(), 8)
    assert decoded[0, :, 0].tolist() == [0, 0, 100, 200, 255, 7, 30, 60] and (decoded == decoded[:1]).all()


@pytest.mark.parametrize(("deadline", "stage"), [(0.5, "decoding"), (1, "conversion"), (2, "resizing"), (3, None)])
def test_the_deadline_is_checked_before_every_stage(monkeypatch, deadline, stage):
    """On a clock that reads 1, 2, 3 at the three checks: the first check past the deadline names its
    stage; a deadline the clock only reaches (not passes) lets the stage run."""
    import types

    import models.preprocessing as preprocessing

    readings = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(preprocessing, "time", types.SimpleNamespace(monotonic=lambda: next(readings)))
    prepared = preprocessing.prepare_decode(encode(gradient_image(), "PNG"), SIZE, preprocessing.DecodeLimits())
    if stage is None:
        assert preprocessing.finish_decode(prepared, deadline).shape == (SIZE, SIZE, 3)
    else:
        with pytest.raises(preprocessing.DecodeAbandonedError, match=f"^deadline passed before {stage}$"):
            preprocessing.finish_decode(prepared, deadline)


def test_without_a_size_the_upright_image_keeps_its_own():
    source = gradient_image().resize((40, 24))
    array = decode_image(encode(source, "PNG"), None)
    assert array.shape == (24, 40, 3) and np.array_equal(array, np.asarray(source))
