"""The one resampling to the model's pixel size (models.resampling), on its own and inside the decoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import DecodeLimits, ImageTooLargeError, finish_decode, prepare_decode
from models.resampling import ModelScale, check_microns_per_pixel, plan, resample
from tests.helpers import encode

TARGET = ModelScale(input_size=64, field_microns=96.0)  # 1.5 um per input pixel


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_without_a_pixel_size_the_whole_image_is_resized():
    image = _noise(300, 200)
    for target, mpp in ((TARGET, None), (ModelScale(64, None), 0.5)):
        steps = plan(300, 200, target, mpp)
        assert steps.box == (0, 0, 300, 200) and steps.resized == (64, 64) and steps.scale is None
    expected = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR, reducing_gap=3.0))
    np.testing.assert_array_equal(resample(image, TARGET), expected)


def test_a_larger_field_is_cropped_to_the_models_and_a_smaller_one_mirrored():
    # 0.5 um pixels: the 96 um field is 192 pixels; a 400 px image keeps its centre 192 px.
    wide = plan(400, 400, TARGET, 0.5)
    assert wide.box == (104, 104, 296, 296) and wide.resized == (64, 64) and wide.coverage == 1.0
    # 3 um pixels: a 20 px image covers 60 um, 40 input pixels; the rest of the 64 is mirrored.
    small = _noise(20, 20)
    steps = plan(20, 20, TARGET, 3.0)
    assert steps.box == (0, 0, 20, 20) and steps.resized == (40, 40) and steps.coverage == pytest.approx(0.39, 0.01)
    array = resample(small, TARGET, 3.0)
    assert array.shape == (64, 64, 3)
    inner = np.asarray(small.resize((40, 40), Image.Resampling.BILINEAR, reducing_gap=3.0))
    np.testing.assert_array_equal(array[12:52, 12:52], inner)
    np.testing.assert_array_equal(array[11, 12:52], inner[0])  # mirrored at the edge, no glass-white border
    np.testing.assert_array_equal(array[12:52, 52], inner[:, -1])


def test_at_the_models_own_pixel_size_an_image_of_its_field_is_resized_as_without_one():
    image = _noise(192, 192, seed=1)
    np.testing.assert_array_equal(resample(image, TARGET, 0.5), resample(image, TARGET))
    # A slide read whose side rounding misses the field by a pixel is stretched, not mirrored.
    assert plan(191, 191, TARGET, 0.5).resized == (64, 64)


def test_decoding_with_mpp_is_the_same_resampling_and_keeps_the_detail_a_crop_needs():
    tile = Image.fromarray(np.asarray(_noise(48, 48, seed=2).resize((768, 768), Image.Resampling.BICUBIC)))
    png, jpeg = encode(tile, "PNG"), encode(tile, "JPEG", quality=95)
    for mpp in (0.125, 0.5, 2.0):
        from_png = finish_decode(prepare_decode(png, 64, DecodeLimits(), mpp, TARGET.field_microns))
        np.testing.assert_array_equal(from_png, resample(tile, TARGET, mpp))
        # JPEG DCT scaling may shrink the decode, but never below what the crop needs.
        from_jpeg = finish_decode(prepare_decode(jpeg, 64, DecodeLimits(), mpp, TARGET.field_microns))
        assert np.abs(from_jpeg.astype(int) - from_png).mean() < 4, mpp  # JPEG loss and DCT scaling only
    prepared = prepare_decode(jpeg, 64, DecodeLimits(), 0.125, TARGET.field_microns)  # 6 um of each 1.5: 1/8 of it
    assert prepared.cost.width == 96  # 768 / 8: DCT scaling to the share of the file the input needs
    prepared.image.close()
    prepared = prepare_decode(jpeg, 64, DecodeLimits(), 2.0, TARGET.field_microns)  # a centre crop of 48 px
    assert prepared.cost.width == 768  # the crop needs every pixel of the file
    prepared.image.close()


def test_the_decode_limits_hold_whatever_the_pixel_size():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 MP of a tiny file
    for mpp in (None, 0.05, 20.0):
        with pytest.raises(ImageTooLargeError):
            prepare_decode(bomb, 64, DecodeLimits(), mpp, TARGET.field_microns)


@pytest.mark.parametrize("mpp", [0.0, -1.0, 0.049, 20.5, float("nan"), float("inf")])
def test_a_pixel_size_outside_the_sane_range_is_refused(mpp):
    with pytest.raises(ValueError, match="mpp"):
        check_microns_per_pixel(mpp)
    assert check_microns_per_pixel(0.25) == 0.25
