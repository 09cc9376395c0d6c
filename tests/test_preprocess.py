"""Specification of cfgen.io.preprocess: a decoded image to the fixed-size array every stage consumes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from cfgen.config import DecodeConfig
from cfgen.io.decode import DecodedImage, DecodeError, new_provenance
from cfgen.io.preprocess import decode_and_preprocess, preprocess, quantize, resize_geometry, to_fixed_size


def bright_rectangle(shape, top, left, bottom, right) -> np.ndarray:
    image = np.zeros(shape, dtype=np.float32)
    image[top:bottom, left:right] = 1.0
    return image


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(mask)
    return rows.min(), columns.min(), rows.max() + 1, columns.max() + 1


def test_pad_fits_the_long_side_and_centres_the_image_on_black():
    fixed = to_fixed_size(np.ones((100, 50), np.float32), 64, "pad")
    assert fixed.shape == (64, 64) and fixed.dtype == np.float32
    np.testing.assert_array_equal(fixed[:, 16:48], 1.0)  # 100 x 50 -> 64 x 32, centred
    np.testing.assert_array_equal(fixed[:, :16], 0.0)
    np.testing.assert_array_equal(fixed[:, 48:], 0.0)
    geometry = resize_geometry((100, 50), 64, "pad")
    assert (geometry["scale"], geometry["pad"], geometry["resized_shape"]) == (0.64, (0, 0, 16, 16), (64, 32))


def test_crop_fills_the_square_from_the_centre_of_the_long_side():
    image = np.zeros((100, 50), np.float32)
    image[25:75] = 1.0  # the central 50 x 50 square is bright, the ends of the long side dark
    fixed = to_fixed_size(image, 32, "crop")
    np.testing.assert_allclose(fixed, 1.0, atol=1e-6)
    geometry = resize_geometry((100, 50), 32, "crop")
    assert (geometry["crop"], geometry["pad"], geometry["scale"]) == ((25.0, 0.0, 75.0, 50.0), (0, 0, 0, 0), 0.64)


def test_a_bright_rectangle_keeps_its_proportions_and_place_when_padded():
    image = bright_rectangle((200, 100), 80, 40, 120, 60)  # 40 x 20
    fixed = to_fixed_size(image, 50, "pad")  # scale 1/4, content 50 x 25 at columns 12 .. 37
    assert bounding_box(fixed > 0.5) == (20, 12 + 10, 30, 12 + 15)  # 10 x 5, output = source * scale + pad
    np.testing.assert_allclose(fixed[20:30, 22:27], 1.0, atol=1e-6)
    assert fixed.sum() == pytest.approx(50.0, abs=1e-4)  # area averaging keeps the mass: 40 * 20 / 16


def test_a_bright_rectangle_keeps_its_proportions_when_cropped():
    image = bright_rectangle((200, 100), 80, 40, 120, 60)
    fixed = to_fixed_size(image, 50, "crop")  # keeps rows 50 .. 150, scale 1/2
    assert bounding_box(fixed > 0.5) == (15, 20, 35, 30)  # (80 - 50) / 2 .. (120 - 50) / 2, 40 / 2 .. 60 / 2


def test_area_downsampling_preserves_the_mean():
    image = np.random.default_rng(0).random((300, 240)).astype(np.float32)
    fixed = to_fixed_size(image, 60, "crop")  # 240 x 240 centre, factor 4
    assert fixed.mean() == pytest.approx(image[30:270].mean(), abs=1e-5)
    assert resize_geometry((300, 240), 60, "crop")["resample"] == "box"


def test_upsampling_with_lanczos_is_clipped_to_the_unit_range():
    checkerboard = (np.indices((8, 8)).sum(axis=0) % 2).astype(np.float32)
    fixed = to_fixed_size(checkerboard, 64, "pad")
    assert resize_geometry((8, 8), 64, "pad")["resample"] == "lanczos"
    assert fixed.min() >= 0.0 and fixed.max() <= 1.0
    assert fixed.max() == 1.0 and fixed.min() == 0.0  # the ringing overshoots, clipped rather than rescaled


def test_an_image_of_the_right_size_passes_unchanged():
    image = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(to_fixed_size(image, 32, "pad"), image)
    np.testing.assert_array_equal(to_fixed_size(image, 32, "crop"), image)


def test_crop_without_scaling_cuts_whole_pixels():
    image = np.random.default_rng(2).random((32, 41)).astype(np.float32)  # 9 columns too many: 4 left, 5 right
    np.testing.assert_array_equal(to_fixed_size(image, 32, "crop"), image[:, 4:36])


def test_wrong_mode_or_shape_is_a_caller_error():
    with pytest.raises(ValueError, match="pad"):
        to_fixed_size(np.zeros((4, 4)), 8, "stretch")
    with pytest.raises(ValueError, match="2-D"):
        to_fixed_size(np.zeros((4, 4, 3)), 8, "pad")


def test_quantize_rounds_to_nearest_and_clips():
    values = np.array([-0.2, 0.0, 0.5, 1.0, 1.3, np.nan])
    assert quantize(values, "uint8").tolist() == [0, 0, 128, 255, 255, 0]
    assert quantize(values, "uint16").tolist() == [0, 0, 32768, 65535, 65535, 0]
    assert quantize(values, "uint16").dtype == np.uint16
    assert quantize(np.array([1 / 255, 2.49 / 255]), "uint8").tolist() == [1, 2]


def test_preprocess_extends_the_provenance_with_the_geometry():
    decoded = DecodedImage(np.ones((40, 80), np.float32), {**new_provenance("png"), "original_shape": (40, 80)})
    pixels, provenance = preprocess(decoded, DecodeConfig(size=16, resize_mode="pad", dtype="uint16"))
    assert pixels.shape == (16, 16) and pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[4:12], 65535)
    np.testing.assert_array_equal(pixels[:4], 0)
    assert provenance["format"] == "png" and provenance["original_shape"] == (40, 80)
    assert provenance["resize_mode"] == "pad" and provenance["output_size"] == 16
    assert provenance["scale"] == 0.2 and provenance["pad"] == (4, 4, 0, 0)
    assert provenance["dtype"] == "uint16"


def test_decode_and_preprocess_a_monochrome1_dicom():
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    stored = np.full((60, 40), 4000, np.uint16)  # MONOCHROME1: high stored values are the black background
    stored[20:40, 10:30] = 100  # a dense square
    ds.set_pixel_data(stored, "MONOCHROME1", 12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    pixels, provenance = decode_and_preprocess(buffer.getvalue(), DecodeConfig(size=20, resize_mode="crop"))
    assert pixels.shape == (20, 20) and pixels.dtype == np.uint8
    assert pixels[10, 10] == 255 and pixels[1, 10] == 0  # dense is bright, the background black
    assert bounding_box(pixels > 127) == (5, 5, 15, 15)  # rows 10 .. 50 kept, scale 1/2: (20 - 10) / 2 ..
    assert provenance["inverted"] and provenance["crop"] == (10.0, 0.0, 50.0, 40.0)


def test_decode_and_preprocess_a_png_and_refuse_garbage():
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 20), 255, np.uint8)).save(buffer, format="PNG")
    pixels, provenance = decode_and_preprocess(buffer.getvalue(), DecodeConfig(size=8), "x.png")
    assert pixels.tolist()[2:6] == [[255] * 8] * 4 and pixels[:2].max() == 0 and pixels[6:].max() == 0
    with pytest.raises(DecodeError) as error:
        decode_and_preprocess(b"not an image at all", DecodeConfig(size=8), "x.bin")
    assert error.value.reason == "not_an_image"
