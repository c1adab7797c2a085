"""The decode's first half, exactly: the JPEG marker walk, every limit at its edge with its words, JPEG DCT
scaling and the cost estimate each limit is checked against. All from the header, before a pixel is decoded."""

from __future__ import annotations

import pytest
from PIL import Image

from models.preprocessing import (
    CorruptImageError,
    DecodeLimits,
    EmptyImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    estimated_decode_bytes,
    finish_decode,
    jpeg_frame_and_scans,
    prepare_decode,
    sniff_format,
)
from tests.helpers import encode, gradient_image, png_header_only

SOI = b"\xff\xd8"


def segment(marker: int, payload: bytes = b"\x00" * 6) -> bytes:
    """A JPEG marker segment: FF, the marker, a big-endian length that counts itself, the payload."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


SCAN = segment(0xDA) + b"\x12\x34\xff\x00\x56"  # a scan header, then entropy-coded data with a stuffed FF


@pytest.mark.parametrize(("data", "expected"), [
    (SOI + segment(0xE0) + segment(0xC0) + SCAN + SCAN + b"\xff\xd9", (0xC0, 2)),
    # A scan marker's bytes inside an application segment before the first scan are not a scan.
    (SOI + segment(0xE1, b"Exif\xff\xda\xff\xda") + segment(0xC2) + SCAN, (0xC2, 1)),
    (SOI + segment(0xE1, bytes(300)) + segment(0xC2) + SCAN, (0xC2, 1)),  # a length over one byte
    (SOI + b"\xff\xff\xff" + segment(0xC2) + SCAN, (0xC2, 1)),  # fill bytes before a marker
    (SOI + b"\xff\x01\xff\xd0\xff\xd7\xff\xd8" + segment(0xC0) + SCAN, (0xC0, 1)),  # standalone markers
    (SOI + segment(0xC0) + segment(0xC2) + SCAN, (0xC0, 1)),  # the first frame marker is the frame
    (SOI + segment(0xC3) + SCAN, (0xC3, 1)),
    (SOI + b"\xff\xc0\x00\x02", (0xC0, 0)),  # a segment that ends the file exactly: read, no scan
    (SOI + segment(0xC2) + b"\x12\x34\x56\x78", (0xC2, 0)),  # not a marker where one must be: stop
    (SOI + b"\x00\x00\x00\x00", (None, 0)),
    (SOI + b"\xff\xc0\x00", (None, 0)),  # too short for a segment header
])
def test_the_marker_walk_finds_the_frame_and_counts_the_scans(data, expected):
    assert jpeg_frame_and_scans(data) == expected


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (64, 48), **options: object) -> bytes:
    return encode(gradient_image().resize(size).convert(mode), "JPEG", **options)


def test_the_pixel_limit_is_inclusive_and_says_the_numbers():
    png = encode(gradient_image().resize((20, 10)), "PNG")
    assert prepare_decode(png, 8, DecodeLimits(max_pixels=200)).cost.source_pixels == 200
    with pytest.raises(ImageTooLargeError, match=r"^image is 20x10 = 200 pixels; the limit is 199$"):
        prepare_decode(png, 8, DecodeLimits(max_pixels=199))
    one_wide = encode(gradient_image().resize((1, 10)), "PNG")
    assert prepare_decode(one_wide, 8, DecodeLimits()).cost.pixels == 10  # one pixel wide is still an image


def test_scan_limits_are_inclusive_and_say_the_numbers():
    progressive = _jpeg(progressive=True)
    _, scans = jpeg_frame_and_scans(progressive)
    assert scans > 1
    cost = prepare_decode(progressive, 32, DecodeLimits(max_jpeg_scans=scans)).cost
    assert cost.scans == scans
    with pytest.raises(ImageTooLargeError, match=f"^JPEG has {scans} scans; the limit is {scans - 1}$"):
        prepare_decode(progressive, 32, DecodeLimits(max_jpeg_scans=scans - 1))
    work = scans * 64 * 48
    assert prepare_decode(progressive, 32, DecodeLimits(max_scan_pixels=work)).cost.scans == scans
    with pytest.raises(ImageTooLargeError) as refused:
        prepare_decode(progressive, 32, DecodeLimits(max_scan_pixels=work - 1))
    assert str(refused.value) == (f"JPEG of 64x48 pixels in {scans} scans is too much decoding work "
                                  f"({work} scan-pixels; the limit is {work - 1})")
    assert prepare_decode(encode(gradient_image(), "PNG"), 32, DecodeLimits()).cost.scans == 1  # not a JPEG


@pytest.mark.parametrize(("frame", "kind"), [(0xC3, "lossless"), (0xC5, "hierarchical"), (0xC9, "arithmetic-coded")])
def test_jpeg_frames_the_decoder_cannot_read_are_refused_by_name(frame, kind):
    baseline = _jpeg()
    at = baseline.index(b"\xff\xc0")
    patched = baseline[:at + 1] + bytes([frame]) + baseline[at + 2:]
    with pytest.raises(UnsupportedImageError) as refused:
        prepare_decode(patched, 32, DecodeLimits())
    assert str(refused.value) == (f"{kind} JPEG is not supported; send a baseline or progressive JPEG, PNG, WebP "
                                  "or TIFF")


def test_progressive_jpegs_also_pay_for_their_coefficients():
    """libjpeg keeps every DCT coefficient of a progressive frame (2 bytes per sample) on top of the rest."""
    for options, coefficients in (({}, 0), ({"progressive": True}, 2 * 3 * 64 * 48)):
        cost = prepare_decode(_jpeg(**options), 32, DecodeLimits()).cost
        assert (cost.width, cost.height) == (64, 48)  # 48 is too short to halve for a 32 px input
        assert cost.estimated_bytes == coefficients + estimated_decode_bytes("RGB", 64, 48, 32)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpegs_are_scaled_down_in_the_dct_to_the_smallest_size_the_input_needs(mode):
    data = _jpeg(mode, (256, 256))
    cost = prepare_decode(data, 32, DecodeLimits()).cost
    assert (cost.width, cost.height, cost.source_pixels) == (32, 32, 256 * 256)  # 1/8: exactly the input
    assert cost.estimated_bytes == estimated_decode_bytes(mode, 32, 32, 32)
    assert prepare_decode(data, 64, DecodeLimits()).cost.width == 64  # 1/4
    full = prepare_decode(data, None, DecodeLimits()).cost  # no input size: the file's own
    assert (full.width, full.height) == (256, 256)


def test_resampling_scales_the_dct_down_to_the_pixels_the_crop_needs():
    # 8 file pixels of 1/8 input pixel each: the model needs one pixel of the file, DCT scaling gives it.
    cost = prepare_decode(_jpeg(size=(8, 8)), 8, DecodeLimits(), mpp=0.125, field_microns=8.0).cost
    assert (cost.width, cost.height) == (1, 1)


def test_the_decoded_bytes_limit_is_inclusive_and_says_the_numbers():
    png = encode(Image.new("RGB", (2000, 1200), (200, 120, 160)), "PNG")
    needed = estimated_decode_bytes("RGB", 2000, 1200, 32)  # 13.7 MiB, shown in whole MiB
    cost = prepare_decode(png, 32, DecodeLimits(max_decoded_bytes=needed)).cost
    assert (cost.format, cost.estimated_bytes) == ("PNG", needed)
    with pytest.raises(ImageTooLargeError) as refused:
        prepare_decode(png, 32, DecodeLimits(max_decoded_bytes=needed - 1))
    assert str(refused.value) == "decoding this 2000x1200 RGB PNG would need about 13 MiB; the limit is 13 MiB"


@pytest.mark.parametrize(("mode", "width", "height", "size", "expected"), [
    # frame twice over (the decoder's buffer and the image's) + the RGB copy + a wide conversion's arrays
    # + the output (the model input, or at full size the image and its array)
    ("RGB", 100, 50, 32, 2 * 3 * 5000 + 0 + 0 + 3 * 32 * 32),
    ("L", 100, 50, None, 2 * 1 * 5000 + 3 * 5000 + 0 + 2 * 3 * 5000),
    ("I;16", 100, 50, 32, 2 * 2 * 5000 + 3 * 5000 + 5 * 5000 + 3 * 32 * 32),
    ("F", 10, 10, None, 2 * 4 * 100 + 3 * 100 + 5 * 100 + 2 * 3 * 100),
    ("RGBA", 10, 10, 8, 2 * 4 * 100 + 3 * 100 + 0 + 3 * 8 * 8),
    ("a mode of the future", 10, 10, 8, 2 * 4 * 100 + 3 * 100 + 0 + 3 * 8 * 8),  # 4 bytes a pixel unless known
])
def test_the_decode_estimate_counts_every_buffer(mode, width, height, size, expected):
    assert estimated_decode_bytes(mode, width, height, size) == expected


def test_a_file_pil_cannot_open_as_its_format_says_so_plainly():
    with pytest.raises(CorruptImageError, match=r"^cannot read the PNG header: the file is damaged or not really PNG$"):
        prepare_decode(b"\x89PNG\r\n\x1a\n" + bytes(40), 32, DecodeLimits())


@pytest.mark.parametrize(("head", "expected"), [
    (b"\xff\xd8\xff\xe0" + bytes(12), "JPEG"),
    (b"\x89PNG\r\n\x1a\n" + bytes(8), "PNG"),
    (b"RIFF\x00\x00\x00\x00WEBP", "WEBP"),  # twelve bytes are enough
    (b"RIFF\x00\x00\x00\x00WAVE", None),  # RIFF, but not WebP
    (b"XXXX\x00\x00\x00\x00WEBP", None),  # WebP's word without RIFF
    (b"II*\x00" + bytes(12), "TIFF"),
    (b"MM\x00*" + bytes(12), "TIFF"),  # big-endian
    (b"GIF89a" + bytes(10), None),
    (b"\xff\xd8", None),
])
def test_formats_are_told_by_their_magic_bytes(head, expected):
    assert sniff_format(head) == expected


def test_empty_and_unknown_files_are_refused_in_plain_words():
    with pytest.raises(EmptyImageError, match=r"^the file is empty$"):
        prepare_decode(b"", 32, DecodeLimits())
    with pytest.raises(UnsupportedImageError, match=r"^not a supported image; send JPEG, PNG, WebP or TIFF$"):
        prepare_decode(b"GIF89a" + bytes(100), 32, DecodeLimits())


def test_a_header_past_the_decoders_bomb_guard_is_too_large():
    # 400 megapixels: PIL's own guard refuses it while reading the header, before our pixel limit is asked.
    with pytest.raises(ImageTooLargeError, match=r"^the image has more pixels than the decoder's bomb guard allows$"):
        prepare_decode(png_header_only(20_000, 20_000), 32, DecodeLimits(max_pixels=10**9))


def test_a_damaged_stream_is_named_by_its_format():
    data = bytearray(encode(gradient_image(), "PNG"))
    data[60:120] = bytes(60)  # the compressed pixels, after a good header
    prepared = prepare_decode(bytes(data), 32, DecodeLimits())
    with pytest.raises(CorruptImageError, match=r"^cannot decode the PNG image: it is truncated or damaged$"):
        finish_decode(prepared)
