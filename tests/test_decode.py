"""Specification of cfgen.io.decode: real DICOM, PNG and JPEG quirks to one grayscale presentation.

DICOM inputs are built here with pydicom from known arrays, or taken from the test files shipped inside pydicom
(`pydicom/data/test_files`), several of which have uncompressed twins. Expected values come from the DICOM formulas
(PS3.3 C.11), from those twins, or from pydicom's own reference values for its files.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from cfgen.io.decode import DecodeError, DecodedImage, decode_dicom, decode_image, new_provenance, window

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
RAMP_12BIT = np.arange(4096, dtype=np.uint16).reshape(64, 64)  # every 12-bit value once, 0 top-left, 4095 last


# --------------------------------------------------------------------------------------------------------------------
# Builders


def make_dataset(stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **tags):
    """A DX image data set holding `stored` (rows, columns[, samples]) uncompressed, plus any extra tags."""
    ds = Dataset()
    ds.SOPClassUID = DX_STORAGE
    ds.Modality = "DX"
    stored = np.asarray(stored)
    ds.set_pixel_data(stored, photometric, bits_stored or stored.dtype.itemsize * 8)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset, *, file_meta: bool = True, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    """The data set as a Part 10 file (preamble, DICM, file meta), or as a bare data set without either."""
    buffer = io.BytesIO()
    if file_meta:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        bare = copy.deepcopy(ds)
        del bare.file_meta
        bare.preamble = None
        if not little_endian and bare.BitsAllocated == 16:  # pydicom writes OW bytes as given: swap them here
            bare.PixelData = np.frombuffer(bare.PixelData, "<u2").astype(">u2").tobytes()
        bare.save_as(buffer, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=False)
    return buffer.getvalue()


def encapsulated(ds: Dataset, frame: bytes, transfer_syntax: str) -> Dataset:
    """Replace the pixel data of `ds` by one compressed frame under `transfer_syntax`."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def shipped(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def dicom_linear(x, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (VOI LUT Function LINEAR), written piecewise as in the standard, output range [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5)
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, inside))


def encode_jpeg_lossless_sv1(image: np.ndarray, precision: int) -> bytes:
    """A minimal ITU-T T.81 lossless encoder: process 14, predictor 1 (Ra), one component, one Huffman table.

    No encoder for JPEG Lossless is installed, and this is the transfer syntax (1.2.840.10008.1.2.4.70) most
    hospital CXR archives use for 12-16 bit images; the bytes it makes are decoded by libjpeg in the code under test.
    """
    x = image.astype(np.int64)
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << (precision - 1)  # first sample: half the range (H.1.2.1)
    predicted[0, 1:] = x[0, :-1]  # first line: left neighbour
    predicted[1:, 0] = x[:-1, 0]  # first column: the sample above
    predicted[1:, 1:] = x[1:, :-1]  # elsewhere: predictor 1, the left neighbour
    bits: list[str] = []
    for difference in (x - predicted).ravel():
        category = int(abs(difference)).bit_length()  # SSSS
        bits.append(format(category, "05b"))  # 17 categories, each a 5-bit code (none all ones)
        if 0 < category < 16:
            extra = difference if difference > 0 else difference - 1  # negative: ones' complement (F.1.2.1.1)
            bits.append(format(int(extra) & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with 1-bits
    entropy = bytearray()
    for i in range(0, len(stream), 8):
        entropy.append(int(stream[i : i + 8], 2))
        if entropy[-1] == 0xFF:
            entropy.append(0x00)  # byte stuffing
    rows, columns = image.shape
    sof3 = bytes([0xFF, 0xC3, 0, 11, precision]) + rows.to_bytes(2, "big") + columns.to_bytes(2, "big")
    sof3 += bytes([1, 1, 0x11, 0])
    dht = bytes([0xFF, 0xC4, 0, 36, 0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0x00])  # Ss = predictor 1, Se = 0, Ah/Al = 0
    return b"\xff\xd8" + sof3 + dht + sos + bytes(entropy) + b"\xff\xd9"


# --------------------------------------------------------------------------------------------------------------------
# The grayscale pipeline


def test_no_voi_maps_min_and_max_of_the_image_to_0_and_1():
    stored = (RAMP_12BIT // 2 + 100).astype(np.uint16)  # 100 .. 2147
    decoded = decode_dicom(to_bytes(make_dataset(stored, bits_stored=12)))
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape == (64, 64)
    np.testing.assert_allclose(decoded.pixels, (stored - 100) / 2047, atol=1e-6)
    assert decoded.provenance["voi"] == "minmax"


def test_monochrome1_and_monochrome2_of_the_same_film_give_the_same_presentation():
    monochrome2 = decode_dicom(to_bytes(make_dataset(RAMP_12BIT, "MONOCHROME2", 12)))
    monochrome1 = decode_dicom(to_bytes(make_dataset(4095 - RAMP_12BIT, "MONOCHROME1", 12)))
    np.testing.assert_allclose(monochrome1.pixels, monochrome2.pixels, atol=1e-6)
    assert monochrome1.pixels[0, 0] == 0.0  # stored 4095 in MONOCHROME1 is the least dense: black
    assert monochrome1.provenance["inverted"] and not monochrome2.provenance["inverted"]


def test_monochrome1_is_inverted_after_its_window():
    window_tags = {"WindowCenter": 1000, "WindowWidth": 800, "VOILUTFunction": "LINEAR_EXACT"}
    mirrored = {"WindowCenter": 4095 - 1000, "WindowWidth": 800, "VOILUTFunction": "LINEAR_EXACT"}
    monochrome2 = decode_dicom(to_bytes(make_dataset(RAMP_12BIT, "MONOCHROME2", 12, **window_tags)))
    monochrome1 = decode_dicom(to_bytes(make_dataset(4095 - RAMP_12BIT, "MONOCHROME1", 12, **mirrored)))
    expected = np.clip((RAMP_12BIT.astype(float) - 1000) / 800 + 0.5, 0, 1)
    np.testing.assert_allclose(monochrome2.pixels, expected, atol=1e-6)
    np.testing.assert_allclose(monochrome1.pixels, expected, atol=1e-6)


def test_rescale_slope_and_intercept_apply_before_the_window():
    stored = np.arange(1000, dtype=np.uint16).reshape(20, 50)
    ds = make_dataset(stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=801)
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, dicom_linear(2.0 * stored - 1000, 0, 801), atol=1e-6)
    assert decoded.pixels[10, 0] == pytest.approx(0.5 / 800 + 0.5)  # stored 500 -> modality value 0
    provenance = decoded.provenance
    assert (provenance["rescale_slope"], provenance["rescale_intercept"]) == (2.0, -1000.0)
    assert (provenance["voi"], provenance["window_center"], provenance["window_width"]) == ("window", 0.0, 801.0)
    assert provenance["voi_lut_function"] == "LINEAR" and provenance["modality_lut"] == "rescale"


def test_modality_values_agree_with_pydicom_apply_modality_lut():
    from pydicom.pixels import apply_modality_lut

    ds = make_dataset(RAMP_12BIT, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=-1024)
    ds.update({"WindowCenter": 0, "WindowWidth": 1000, "VOILUTFunction": "LINEAR_EXACT"})
    modality_values = apply_modality_lut(RAMP_12BIT, copy.deepcopy(ds))  # -1024 .. 1023.5
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, np.clip(modality_values / 1000 + 0.5, 0, 1), atol=1e-6)


def test_multi_valued_window_uses_the_first_window():
    ds = make_dataset(RAMP_12BIT, bits_stored=12, WindowCenter=[500, 2000], WindowWidth=[400, 1000])
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, dicom_linear(RAMP_12BIT, 500, 400), atol=1e-6)
    assert (decoded.provenance["window_center"], decoded.provenance["window_width"]) == (500.0, 400.0)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_agrees_with_pydicom_apply_windowing(function):
    from pydicom.pixels import apply_windowing

    ds = make_dataset(RAMP_12BIT, bits_stored=12, WindowCenter=1500, WindowWidth=700, VOILUTFunction=function)
    reference = apply_windowing(RAMP_12BIT, copy.deepcopy(ds)) / 4095  # pydicom outputs [0, 2**BitsStored - 1]
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, reference, atol=1e-6)
    assert decoded.provenance["voi_lut_function"] == function


def test_sigmoid_window_follows_its_formula():
    ds = make_dataset(RAMP_12BIT, bits_stored=12, WindowCenter=2048, WindowWidth=1000, VOILUTFunction="SIGMOID")
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, 1 / (1 + np.exp(-4 * (RAMP_12BIT - 2048.0) / 1000)), atol=1e-6)
    assert decoded.pixels.flat[2048] == pytest.approx(0.5)


def test_modality_lut_sequence_maps_stored_values_through_the_table():
    from pydicom.pixels import apply_modality_lut

    table = (np.arange(4096) ** 2 // 4096).astype(np.uint16)  # a non-linear detector response, 0 .. 4094
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "OW", table.tobytes())
    item.ModalityLUTType = "US"  # unspecified
    ds = make_dataset(RAMP_12BIT, bits_stored=12, ModalityLUTSequence=[item])
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_array_equal(apply_modality_lut(RAMP_12BIT, dcmread(io.BytesIO(to_bytes(ds)))), table[RAMP_12BIT])
    np.testing.assert_allclose(decoded.pixels, table[RAMP_12BIT] / table.max(), atol=1e-6)
    assert decoded.provenance["modality_lut"] == "modality_lut_sequence"


def test_voi_lut_sequence_with_8_bit_entries_for_12_bit_input():
    # A CR's 12-bit values shown through an 8-bit display LUT of 4096 entries; pydicom 3.0.2's apply_voi wraps here.
    table = np.arange(4096) // 16  # 0 .. 255
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new("LUTData", "US", table.tolist())
    ds = make_dataset(RAMP_12BIT, bits_stored=12, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10)
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, (RAMP_12BIT // 16) / 255, atol=1e-6)
    assert decoded.provenance["voi"] == "voi_lut_sequence"  # the LUT wins over the window, as in pydicom


def test_voi_lut_declaring_16_bits_but_holding_12_bit_entries_is_not_darkened():
    item = Dataset()
    item.LUTDescriptor = [2048, 1000, 16]  # inputs 1000 .. 3047; entries really 12-bit
    item.add_new("LUTData", "US", (np.arange(2048) * 2).tolist())  # 0 .. 4094
    decoded = decode_dicom(to_bytes(make_dataset(RAMP_12BIT, bits_stored=12, VOILUTSequence=[item])))
    expected = np.clip(RAMP_12BIT.astype(float) - 1000, 0, 2047) * 2 / 4094
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    assert decoded.pixels.max() == 1.0


def test_voi_lut_whose_negative_first_input_was_written_unsigned():
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [2048, 65536 - 1024, 16])  # first input -1024, as US
    item.add_new("LUTData", "US", (np.arange(2048) * 2).tolist())
    ds = make_dataset(RAMP_12BIT, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, VOILUTSequence=[item])
    decoded = decode_dicom(to_bytes(ds))  # modality values -1024 .. 3071 index the LUT from its first entry
    np.testing.assert_allclose(decoded.pixels, np.minimum(RAMP_12BIT, 2047) * 2 / 4094, atol=1e-6)


def test_a_malformed_voi_lut_gives_way_to_the_window():
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 16])
    item.add_new("LUTData", "OW", b"")
    ds = make_dataset(RAMP_12BIT, bits_stored=12, VOILUTSequence=[item], WindowCenter=2048, WindowWidth=1001)
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, dicom_linear(RAMP_12BIT, 2048, 1001), atol=1e-6)
    assert decoded.provenance["voi"] == "window"
    assert any("VOI LUT Sequence ignored" in w for w in decoded.provenance["warnings"])


def test_apply_voi_false_ignores_the_window_in_the_file():
    ds = make_dataset(RAMP_12BIT, bits_stored=12, WindowCenter=100, WindowWidth=10)
    decoded = decode_dicom(to_bytes(ds), apply_voi=False)
    np.testing.assert_allclose(decoded.pixels, RAMP_12BIT / 4095, atol=1e-6)
    assert decoded.provenance["voi"] == "minmax"


def test_invalid_window_width_falls_back_to_min_max_with_a_warning():
    decoded = decode_dicom(to_bytes(make_dataset(RAMP_12BIT, bits_stored=12, WindowCenter=100, WindowWidth=0)))
    np.testing.assert_allclose(decoded.pixels, RAMP_12BIT / 4095, atol=1e-6)
    assert decoded.provenance["voi"] == "minmax"
    assert any("Window Width" in w for w in decoded.provenance["warnings"])


def test_window_function_rejects_what_the_standard_forbids():
    with pytest.raises(ValueError):
        window(np.zeros(3), 0, 0.5, "LINEAR")
    with pytest.raises(ValueError):
        window(np.zeros(3), 0, 0, "SIGMOID")
    assert window(np.array([0.0, 0.5, 1.0]), 1.0, 1.0, "LINEAR").tolist() == [0.0, 0.0, 1.0]  # a threshold


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_an_image_without_contrast_becomes_zeros_not_nan(photometric):
    decoded = decode_dicom(to_bytes(make_dataset(np.full((8, 8), 700, np.uint16), photometric, 12)))
    assert np.all(decoded.pixels == 0.0) and not np.isnan(decoded.pixels).any()


# --------------------------------------------------------------------------------------------------------------------
# Stored values: bits, signs


def test_bits_above_bits_stored_are_masked():
    ds = make_dataset(RAMP_12BIT, bits_stored=12)
    garbage = RAMP_12BIT | np.where(np.arange(4096).reshape(64, 64) % 3 == 0, 0xA000, 0x5000).astype(np.uint16)
    ds.PixelData = garbage.tobytes()  # e.g. overlay bits left in the high nibble by the modality
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, RAMP_12BIT / 4095, atol=1e-6)


def test_signed_pixels_keep_their_negative_values():
    stored = np.arange(-2000, 2000, dtype=np.int16).reshape(40, 100)
    decoded = decode_dicom(to_bytes(make_dataset(stored, WindowCenter=-500, WindowWidth=1001)))
    np.testing.assert_allclose(decoded.pixels, dicom_linear(stored, -500, 1001), atol=1e-6)
    assert decoded.provenance["pixel_representation"] == 1
    minmax = decode_dicom(to_bytes(make_dataset(stored)))
    np.testing.assert_allclose(minmax.pixels, (stored + 2000) / 3999, atol=1e-6)


def test_signed_12_bit_values_whose_high_bits_are_not_sign_extended():
    values = np.arange(-2048, 2048, dtype=np.int16).reshape(64, 64)
    ds = make_dataset(values, bits_stored=12)
    ds.PixelData = (values.view(np.uint16) & 0x0FFF).tobytes()  # -1 written as 0x0FFF, not 0xFFFF
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, (values + 2048) / 4095, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# File layout


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "detected"),
    [(True, True, ImplicitVRLittleEndian), (False, True, ExplicitVRLittleEndian), (False, False, ExplicitVRBigEndian)],
)
def test_a_data_set_without_preamble_and_file_meta_is_decoded(implicit_vr, little_endian, detected):
    ds = make_dataset(RAMP_12BIT, "MONOCHROME1", 12)
    data = to_bytes(ds, file_meta=False, implicit_vr=implicit_vr, little_endian=little_endian)
    assert data[128:132] != b"DICM"
    decoded = decode_image(data)
    np.testing.assert_allclose(decoded.pixels, 1 - RAMP_12BIT / 4095, atol=1e-6)
    assert decoded.provenance["transfer_syntax_uid"] == detected
    assert "TransferSyntaxUID" in decoded.provenance["assumed"]


def _compressed(codec: str) -> tuple[Dataset, np.ndarray]:
    """A data set compressed by `codec`, and the presentation of its uncompressed pixels."""
    if codec == "MR_small_jpeg_ls_lossless.dcm":
        return dcmread(get_testdata_file(codec)), decode_dicom(shipped("MR_small.dcm")).pixels
    ds = make_dataset(RAMP_12BIT, "MONOCHROME1", 12)
    reference = decode_dicom(to_bytes(ds)).pixels
    if codec == JPEGLosslessSV1:
        return encapsulated(ds, encode_jpeg_lossless_sv1(RAMP_12BIT, 12), codec), reference
    ds.compress(codec, encoding_plugin="pylibjpeg" if codec == JPEG2000Lossless else "")
    return ds, reference


@pytest.mark.parametrize(
    ("codec", "guessed"),
    [
        (RLELossless, RLELossless),
        (JPEG2000Lossless, JPEG2000),  # J2K does not say whether it is lossless: the wider syntax
        (JPEGLosslessSV1, "1.2.840.10008.1.2.4.57"),  # JPEG Lossless, any predictor
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ],
)
def test_compressed_pixel_data_without_file_meta_is_recognised_by_its_codestream(codec, guessed):
    ds, reference = _compressed(codec)
    data = to_bytes(ds, file_meta=False, implicit_vr=False)
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.pixels, reference)
    assert decoded.provenance["transfer_syntax_uid"] == guessed
    assert "TransferSyntaxUID" in decoded.provenance["assumed"]


def test_dicm_prefix_without_the_128_byte_preamble():
    data = to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))[128:]
    assert data.startswith(b"DICM")
    np.testing.assert_allclose(decode_image(data).pixels, RAMP_12BIT / 4095, atol=1e-6)


def test_provenance_describes_the_file():
    ds = make_dataset(RAMP_12BIT[:32], bits_stored=12, ViewPosition="PA", PixelSpacing=[0.139, 0.143])
    ds.ImagerPixelSpacing = [0.15, 0.15]
    provenance = decode_dicom(to_bytes(ds)).provenance
    assert set(new_provenance("dicom")) == set(provenance)
    assert provenance["format"] == "dicom"
    assert provenance["pixel_spacing_mm"] == (0.139, 0.143)
    assert provenance["pixel_spacing_source"] == "PixelSpacing"
    assert provenance["original_shape"] == (32, 64)
    assert (provenance["modality"], provenance["view_position"]) == ("DX", "PA")
    assert provenance["sop_instance_uid"] == ds.SOPInstanceUID
    assert (provenance["bits_allocated"], provenance["bits_stored"], provenance["pixel_representation"]) == (16, 12, 0)
    assert provenance["photometric_interpretation"] == "MONOCHROME2"
    assert provenance["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert (provenance["rescale_slope"], provenance["window_center"]) == (None, None)


def test_imager_pixel_spacing_is_used_when_pixel_spacing_is_absent():
    ds = make_dataset(RAMP_12BIT, bits_stored=12, ImagerPixelSpacing=[0.2, 0.2])
    provenance = decode_dicom(to_bytes(ds)).provenance
    assert provenance["pixel_spacing_mm"] == (0.2, 0.2)
    assert provenance["pixel_spacing_source"] == "ImagerPixelSpacing"
    no_spacing = decode_dicom(to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))).provenance
    assert (no_spacing["pixel_spacing_mm"], no_spacing["pixel_spacing_source"]) == (None, None)


def test_multi_frame_images_give_their_first_frame():
    frames = np.stack([RAMP_12BIT, 4095 - RAMP_12BIT, np.zeros_like(RAMP_12BIT)])
    decoded = decode_dicom(to_bytes(make_dataset(frames, bits_stored=12)))
    np.testing.assert_allclose(decoded.pixels, RAMP_12BIT / 4095, atol=1e-6)
    assert (decoded.provenance["n_frames"], decoded.provenance["frame_index"]) == (3, 0)


def test_enhanced_multi_frame_window_and_rescale_come_from_the_functional_groups():
    frames = np.stack([RAMP_12BIT, RAMP_12BIT])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 3000, 2001
    shared = Dataset()
    shared.FrameVOILUTSequence = [voi]
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, 0, "US"
    first_frame = Dataset()
    first_frame.PixelValueTransformationSequence = [rescale]
    ds = make_dataset(frames, bits_stored=12, SharedFunctionalGroupsSequence=[shared])
    ds.PerFrameFunctionalGroupsSequence = [first_frame, Dataset()]
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, dicom_linear(2.0 * RAMP_12BIT, 3000, 2001), atol=1e-6)


def test_rgb_secondary_capture_becomes_bt601_luminance():
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    image = np.repeat(colours[:, None, :], 5, axis=1)  # 4 rows of one colour each
    decoded = decode_dicom(to_bytes(make_dataset(image, "RGB")))
    np.testing.assert_allclose(decoded.pixels[:, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)
    assert decoded.provenance["color_to_gray"] == "bt601_luma"


def test_ybr_full_secondary_capture_gives_its_luma():
    luma = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    ybr = np.stack([luma, np.full_like(luma, 128), np.full_like(luma, 128)], axis=-1)
    decoded = decode_dicom(to_bytes(make_dataset(ybr, "YBR_FULL")))
    np.testing.assert_allclose(decoded.pixels, luma / 255, atol=1.5 / 255)


# --------------------------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes


@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compression_decodes_to_the_uncompressed_pixels(transfer_syntax):
    ds = make_dataset(RAMP_12BIT, "MONOCHROME1", 12, WindowCenter=2000, WindowWidth=1000)
    reference = decode_dicom(to_bytes(ds)).pixels
    ds.compress(transfer_syntax, encoding_plugin="pylibjpeg" if transfer_syntax == JPEG2000Lossless else "")
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_array_equal(decoded.pixels, reference)
    assert decoded.provenance["transfer_syntax_uid"] == transfer_syntax


def test_jpeg2000_lossy_stays_within_its_compression_error():
    rows, columns = np.mgrid[0:128, 0:128]
    smooth = (2048 + 1500 * np.sin(rows / 15) * np.cos(columns / 20)).astype(np.uint16)
    ds = make_dataset(smooth, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    reference = decode_dicom(to_bytes(ds)).pixels
    ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[10])
    decoded = decode_dicom(to_bytes(ds))
    assert decoded.provenance["transfer_syntax_uid"] == JPEG2000
    assert np.abs(decoded.pixels - reference).max() < 0.01
    assert not np.array_equal(decoded.pixels, reference)  # it really was lossy


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_shipped_compressed_files_match_their_uncompressed_twin(compressed):
    reference = decode_dicom(shipped("MR_small.dcm"))
    decoded = decode_dicom(shipped(compressed))
    assert reference.provenance["voi"] == "window"  # MR_small: signed 16-bit with Window 600/1600
    np.testing.assert_array_equal(decoded.pixels, reference.pixels)


def test_jpeg_lossless_sv1_12_bit_monochrome():
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (24, 40)).astype(np.uint16)
    stored[0, 0], stored[0, 1], stored[5, 7] = 0, 4095, 0  # the extremes, and a jump across the whole range
    ds = encapsulated(make_dataset(stored, bits_stored=12), encode_jpeg_lossless_sv1(stored, 12), JPEGLosslessSV1)
    decoded = decode_dicom(to_bytes(ds))
    np.testing.assert_allclose(decoded.pixels, stored / 4095, atol=1e-6)
    assert decoded.provenance["transfer_syntax_uid"] == JPEGLosslessSV1


def test_jpeg_lossless_sv1_rgb_file_from_gdcm():
    decoded = decode_dicom(shipped("SC_rgb_jpeg_gdcm.dcm"))  # colour bars; pydicom's reference values
    expected = {5: (255, 0, 0), 15: (255, 128, 128), 45: (0, 0, 255), 65: (0, 0, 0), 95: (255, 255, 255)}
    for row, rgb in expected.items():
        assert decoded.pixels[row, 50] == pytest.approx(np.dot((0.299, 0.587, 0.114), rgb) / 255, abs=1e-6)


def test_jpeg_baseline_8_bit_from_pillow_within_lossy_tolerance():
    rows, columns = np.mgrid[0:64, 0:96]
    image = (40 + rows * 2 + columns).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    ds = encapsulated(make_dataset(image), buffer.getvalue(), JPEGBaseline8Bit)
    decoded = decode_dicom(to_bytes(ds))
    expected = (image - image.min()) / float(image.max() - image.min())
    assert np.abs(decoded.pixels - expected).max() < 4 / 255


def test_jpeg_extended_12_bit():
    # JPGExtended.dcm: NM, 12-bit JPEG process 4, no window. pydicom's reference: stored[420, 140] = 244,
    # stored[230, 120] = 95, and its stored values span 0 .. 264, so min/max divides by 264.
    decoded = decode_dicom(shipped("JPGExtended.dcm"))
    assert decoded.pixels[420, 140] == pytest.approx(244 / 264, abs=1e-6)
    assert decoded.pixels[230, 120] == pytest.approx(95 / 264, abs=1e-6)
    assert decoded.provenance["bits_stored"] == 12


def test_jpeg_ls_near_lossless_16_bit():
    decoded = decode_dicom(shipped("JPEGLSNearLossless_16.dcm"))  # stored values 0 .. 65535
    assert decoded.pixels[5, 0] == pytest.approx(32765 / 65535, abs=1e-6)
    assert decoded.pixels[20, 0] == pytest.approx(1025 / 65535, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Refusals, with their reasons


def test_missing_pixel_data():
    ds = make_dataset(RAMP_12BIT, bits_stored=12)
    del ds.PixelData
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "no_pixel_data"


def test_truncated_pixel_data_element():
    ds = make_dataset(RAMP_12BIT, bits_stored=12)
    ds.PixelData = ds.PixelData[:-1000]
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "corrupt_pixel_data"


def test_file_cut_off_inside_the_pixel_data():
    data = to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))
    with pytest.raises(DecodeError) as error:
        decode_image(data[: len(data) - 3000])
    assert error.value.reason == "corrupt_pixel_data"


def test_a_damaged_header_element():
    data = to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))
    damaged = data.replace(b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01Ut", 1)  # Bits Stored with an unknown VR
    assert damaged != data
    with pytest.raises(DecodeError) as error:
        decode_image(damaged)
    assert error.value.reason == "corrupt_header"


def test_a_part_10_file_without_an_image_is_dicom_without_pixel_data():
    ds = Dataset()
    ds.PatientID = "123"  # nothing an image object would have: still DICOM, by its DICM marker
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "no_pixel_data"


def test_truncated_jpeg_2000_codestream():
    ds = make_dataset(RAMP_12BIT, bits_stored=12)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    encapsulated(ds, frame[: len(frame) // 3], JPEG2000Lossless)
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "corrupt_pixel_data"


def test_rle_runs_past_the_end_of_the_frame():
    # pylibjpeg-rle panics (a Rust panic, a BaseException) on this; it must still be an ordinary refusal.
    ds = make_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4))
    run = bytes([0x81, 7])  # 128 copies of one byte, for a segment of 16
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (66).to_bytes(4, "little") + bytes(52)
    encapsulated(ds, header + run + run, RLELossless)
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "corrupt_pixel_data"


def test_transfer_syntax_without_a_decoder():
    ds = encapsulated(make_dataset(RAMP_12BIT, bits_stored=12), b"\x00\x00\x01\xb3" + bytes(60), MPEG2MPML)
    with pytest.raises(DecodeError) as error:
        decode_image(to_bytes(ds))
    assert error.value.reason == "unsupported_transfer_syntax"


def test_private_transfer_syntax_uid():
    data = to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))
    private = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.1\x00", 1)
    assert private != data
    with pytest.raises(DecodeError) as error:
        decode_image(private)
    assert error.value.reason == "unsupported_transfer_syntax"


def test_garbage_bytes_are_not_an_image():
    garbage = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError) as error:
        decode_image(garbage, "s3://bucket/report.txt")
    assert error.value.reason == "not_an_image"
    with pytest.raises(DecodeError) as error:
        decode_image(garbage, "s3://bucket/p10/s1/image.dcm")  # the suffix says DICOM: say what failed
    assert error.value.reason == "not_dicom"


def test_empty_file():
    with pytest.raises(DecodeError) as error:
        decode_image(b"", "empty.dcm")
    assert error.value.reason == "empty_file"


def test_decode_error_survives_pickling_between_ray_workers():
    error = pickle.loads(pickle.dumps(DecodeError("corrupt_pixel_data", "3 bytes short")))
    assert (error.reason, error.message) == ("corrupt_pixel_data", "3 bytes short")


# --------------------------------------------------------------------------------------------------------------------
# PNG and JPEG


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_8_bit_grayscale_png_is_divided_by_255():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_image(png_bytes(Image.fromarray(image)), "a.png")
    np.testing.assert_allclose(decoded.pixels, image / 255, atol=1e-7)
    assert (decoded.provenance["format"], decoded.provenance["bits_stored"]) == ("png", 8)
    assert set(decoded.provenance) == set(new_provenance("png"))


def test_16_bit_grayscale_png_is_divided_by_65535():
    image = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257 // 2).astype(np.uint16)
    decoded = decode_image(png_bytes(Image.fromarray(image)))
    np.testing.assert_allclose(decoded.pixels, image / 65535, atol=1e-7)
    assert (decoded.provenance["bits_stored"], decoded.provenance["voi"]) == (16, "none")


def test_rgb_png_becomes_luminance():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[1, 0], rgb[1, 1] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 200)
    decoded = decode_image(png_bytes(Image.fromarray(rgb)))
    np.testing.assert_allclose(decoded.pixels, [[0.299, 0.587], [0.114, 200 / 255]], atol=1e-6)
    assert decoded.provenance["color_to_gray"] == "bt601_luma"


def test_rgba_png_is_composited_on_black():
    rgba = np.full((2, 2, 4), 255, dtype=np.uint8)
    rgba[0, :, 3] = 0  # the first row fully transparent
    decoded = decode_image(png_bytes(Image.fromarray(rgba)))
    np.testing.assert_allclose(decoded.pixels, [[0, 0], [1, 1]], atol=1e-6)
    assert decoded.provenance["alpha"] == "composited_on_black"


def test_palette_png_uses_its_palette():
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    decoded = decode_image(png_bytes(image))
    np.testing.assert_allclose(decoded.pixels, [[0, 1], [0.299, 1]], atol=1e-6)


def test_8_bit_grayscale_jpeg_like_chexpert():
    rows, columns = np.mgrid[0:64, 0:80]
    image = (30 + 2 * rows + columns).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    decoded = decode_image(buffer.getvalue(), "patient00001/study1/view1_frontal.jpg")
    assert np.abs(decoded.pixels - image / 255).max() < 4 / 255
    assert (decoded.provenance["format"], decoded.provenance["bits_stored"]) == ("jpeg", 8)


def test_12_bit_and_lossless_jpeg_files_decode_through_libjpeg():
    ds = dcmread(get_testdata_file("JPGExtended.dcm"))
    twelve_bit = next(generate_frames(ds.PixelData, number_of_frames=1))  # a bare 12-bit JPEG codestream
    decoded = decode_image(twelve_bit, "export.jpg")
    assert decoded.pixels[420, 140] == pytest.approx(244 / 4095, abs=1e-6)
    assert (decoded.provenance["format"], decoded.provenance["bits_stored"]) == ("jpeg", 12)

    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    lossless = decode_image(encode_jpeg_lossless_sv1(stored, 12))
    np.testing.assert_allclose(lossless.pixels, stored / 4095, atol=1e-6)


def test_content_wins_over_the_file_name():
    dicom = to_bytes(make_dataset(RAMP_12BIT, bits_stored=12))
    assert decode_image(dicom, "mislabelled.png").provenance["format"] == "dicom"
    png = png_bytes(Image.fromarray(np.zeros((4, 4), np.uint8)))
    assert decode_image(png, "mislabelled.dcm").provenance["format"] == "png"


def test_truncated_png():
    data = png_bytes(Image.fromarray(np.arange(4096, dtype=np.uint16).reshape(64, 64)))
    with pytest.raises(DecodeError) as error:
        decode_image(data[: len(data) // 2])
    assert error.value.reason == "corrupt_pixel_data"


def test_decoded_image_is_a_plain_record():
    decoded = decode_image(png_bytes(Image.fromarray(np.zeros((3, 5), np.uint8))))
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.shape == (3, 5) and decoded.provenance["original_shape"] == (3, 5)


def test_padding_pixels_do_not_set_the_min_max_stretch():
    """A collimator border stored as PixelPaddingValue (here 0) must not become the image's black point."""
    stored = np.full((8, 8), 0, dtype=np.uint16)
    stored[2:6, 2:6] = np.arange(1000, 1016, dtype=np.uint16).reshape(4, 4)
    decoded = decode_dicom(to_bytes(make_dataset(stored, bits_stored=12, PixelPaddingValue=0)))
    inside = decoded.pixels[2:6, 2:6]
    assert inside.min() == 0.0 and inside.max() == 1.0  # stretched over 1000..1015, not 0..1015
    assert decoded.provenance["padding_pixels"] == 64 - 16
    plain = decode_dicom(to_bytes(make_dataset(stored, bits_stored=12)))
    assert plain.pixels[2:6, 2:6].min() > 0.98  # without the tag, the border is the black point
