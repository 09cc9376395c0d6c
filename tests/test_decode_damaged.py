"""Specification: a damaged file never comes out of `decode_image` as an ok image.

A file cut short in transfer or on disk is the commonest damage in real buckets; libjpeg and openjpeg decode such a
stream into a picture whose lower part is filler, without an error, so each format is cut here at several points
and must fail with reason "corrupt_pixel_data" and a message saying what was found. A bounded, seeded mutation test
then flips, inserts and cuts bytes at random: nothing but `DecodeError` may escape, and a file that an independent
reader rejects may not come back ok.

Inputs: one file per format and transfer syntax the decoder supports, built with Pillow and pydicom (and the JPEG
Lossless encoder of test_decode) or shipped with pydicom.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless
from test_decode import encapsulated, encode_jpeg_lossless_sv1, make_dataset, shipped, to_bytes

from cfgen.io.decode import DecodedImage, DecodeError, decode_image

ROWS, COLUMNS = np.mgrid[0:48, 0:40]
GRAY8 = (30 + 2 * ROWS + COLUMNS + (ROWS * COLUMNS) % 7).astype(np.uint8)  # not flat: every codec has work to do
GRAY12 = (GRAY8.astype(np.uint16) * 16 + ROWS).astype(np.uint16)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _first_frame(data: bytes) -> bytes:
    return next(generate_frames(dcmread(io.BytesIO(data)).PixelData, number_of_frames=1))


def _compressed(syntax: str, **options) -> bytes:
    ds = make_dataset(GRAY12, bits_stored=12)
    ds.compress(syntax, **options)
    return to_bytes(ds)


@functools.cache
def files() -> dict[str, bytes]:
    """name -> bytes of one valid file per format; DICOM names carry their transfer syntax."""
    return {
        "png_8bit": _png(GRAY8),
        "png_16bit": _png(GRAY12 * 16),
        "jpeg_baseline": _jpeg(GRAY8),
        "jpeg_progressive": _jpeg(GRAY8, progressive=True),
        "jpeg_restart_markers": _jpeg(GRAY8, restart_marker_blocks=2),
        "jpeg_extended_12bit": _first_frame(shipped("JPGExtended.dcm")),
        "jpeg_lossless": encode_jpeg_lossless_sv1(GRAY12, 12),
        "jpeg_ls": _first_frame(shipped("MR_small_jpeg_ls_lossless.dcm")),
        "dicom_native": to_bytes(make_dataset(GRAY12, bits_stored=12)),
        "dicom_native_8bit": to_bytes(make_dataset(GRAY8)),
        "dicom_jpeg_baseline": to_bytes(encapsulated(make_dataset(GRAY8), _jpeg(GRAY8), JPEGBaseline8Bit)),
        "dicom_jpeg_extended": shipped("JPGExtended.dcm"),
        "dicom_jpeg_lossless": to_bytes(encapsulated(make_dataset(GRAY12, bits_stored=12),
                                                     encode_jpeg_lossless_sv1(GRAY12, 12), JPEGLosslessSV1)),
        "dicom_jpeg_ls": shipped("MR_small_jpeg_ls_lossless.dcm"),
        "dicom_jpeg_ls_near": shipped("JPEGLSNearLossless_16.dcm"),
        "dicom_jpeg2000_lossless": _compressed(JPEG2000Lossless, encoding_plugin="pylibjpeg"),
        "dicom_jpeg2000": _compressed(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[5]),
        "dicom_rle": _compressed(RLELossless),
    }


DICOM = [name for name in files() if name.startswith("dicom_")]
ENCAPSULATED = [name for name in DICOM if "native" not in name]
BARE = [name for name in files() if name not in DICOM]
FRACTIONS = [0.5, 0.9, 0.99, "all but 2 bytes"]


def _cut(data: bytes, fraction, start: int = 0, end: int | None = None) -> bytes:
    """`data` cut inside [start, end): at a fraction of that span, or 2 bytes before its end."""
    end = len(data) if end is None else end
    position = end - 2 if fraction == "all but 2 bytes" else start + int((end - start) * fraction)
    return data[:position]


def _pixel_data_span(data: bytes) -> tuple[int, int]:
    """(first, last + 1) byte of the top-level Pixel Data value: its fragments, without the sequence delimiter."""
    element = dcmread(io.BytesIO(data)).get_item(0x7FE00010)
    if element.length == 0xFFFFFFFF:  # undefined: encapsulated
        return element.value_tell, data.rindex(b"\xfe\xff\xdd\xe0")  # up to the Sequence Delimitation Item
    return element.value_tell, element.value_tell + element.length


def _assert_refused_as_truncated(data: bytes, name: str) -> None:
    with pytest.raises(DecodeError) as error:
        decode_image(data, name)
    assert error.value.reason == "corrupt_pixel_data", error.value
    assert error.value.message  # says what was found, e.g. "no EOI marker (FFD9): the 913-byte stream ends ..."


# --------------------------------------------------------------------------------------------------------------------
# Truncation


def test_every_sample_decodes_before_it_is_damaged():
    for name, data in files().items():
        assert isinstance(decode_image(data, name), DecodedImage), name


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", BARE)
def test_png_and_jpeg_files_cut_short_are_refused(name, fraction):
    _assert_refused_as_truncated(_cut(files()[name], fraction), name)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", DICOM)
def test_dicom_files_cut_inside_their_pixel_data_are_refused(name, fraction):
    data = files()[name]
    _assert_refused_as_truncated(_cut(data, fraction, *_pixel_data_span(data)), name)


@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("name", ENCAPSULATED)
def test_dicom_frames_whose_codestream_ends_early_are_refused(name, fraction):
    """A well-formed DICOM file whose frame was cut before it was encapsulated (a writer that lost the end)."""
    ds = dcmread(io.BytesIO(files()[name]))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    damaged = encapsulated(copy.deepcopy(ds), _cut(frame, fraction), ds.file_meta.TransferSyntaxUID)
    _assert_refused_as_truncated(to_bytes(damaged), name)


def test_a_jpeg_cut_short_says_where_it_ends():
    data = files()["jpeg_baseline"]
    with pytest.raises(DecodeError) as error:
        decode_image(data[: len(data) * 9 // 10], "view1_frontal.jpg")
    assert "no EOI marker" in error.value.message and "inside scan 1" in error.value.message


def test_bytes_after_the_end_of_a_stream_are_allowed():
    """Writers pad files (DICOM fragments to an even length, some exporters to a block size)."""
    assert isinstance(decode_image(files()["jpeg_baseline"] + b"\x00" * 7), DecodedImage)
    assert isinstance(decode_image(files()["jpeg_lossless"] + b"\x00"), DecodedImage)


def test_a_png_with_a_damaged_critical_chunk_crc_is_refused():
    data = bytearray(files()["png_16bit"])
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    data[idat + 4 + length] ^= 0x01  # the CRC of IDAT: Pillow does not read it
    with pytest.raises(DecodeError) as error:
        decode_image(bytes(data))
    assert error.value.reason == "corrupt_pixel_data" and "CRC" in error.value.message


# --------------------------------------------------------------------------------------------------------------------
# Mutation

MUTATIONS_PER_FILE = 250


def _mutations(data: bytes, seed: int):
    """Seeded byte flips, insertions and cuts, a third each."""
    rng = np.random.default_rng(seed)
    for _ in range(MUTATIONS_PER_FILE):
        kind, position = int(rng.integers(3)), int(rng.integers(len(data)))
        mutated = bytearray(data)
        if kind == 0:
            mutated[position] ^= int(rng.integers(1, 256))
        elif kind == 1:
            mutated.insert(position, int(rng.integers(256)))
        else:
            del mutated[position:]
        yield ("flip", "insert", "cut")[kind], position, bytes(mutated)


def _reader_accepts(data: bytes, name: str) -> bool:
    """An independent reader's verdict on a file.

    PNG: Pillow, plus zlib over the whole IDAT stream (Pillow stops once it has the pixels, so damage to the end of
    the stream, where the Adler-32 is, passes it). JPEG: a complete stream has EOI (FFD9) after its last scan
    (FFDA), and then Pillow (libjpeg-turbo, which refuses a stream that ends early) decodes it, or for the
    processes Pillow cannot decode, libjpeg. DICOM: pydicom's `pixel_array`, the reference of the Image Pixel
    module that the decoder builds on; for the compressed syntaxes it uses the same codecs, so there the truncation
    tests above, not this one, are what holds the decoder to the codestreams' end markers.
    """
    try:
        if name.startswith("png"):
            Image.open(io.BytesIO(data)).load()
            position, idat = 8, b""
            while position + 8 <= len(data):
                length = int.from_bytes(data[position : position + 4], "big")
                if data[position + 4 : position + 8] == b"IDAT":
                    idat += data[position + 8 : position + 8 + length]
                position += 12 + length
            zlib.decompress(idat)
        elif name.startswith("jpeg"):
            if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
                return False
            try:
                Image.open(io.BytesIO(data)).load()
            except Exception:
                from libjpeg import decode

                decode(data)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcmread(io.BytesIO(data), force=True).pixel_array  # noqa: B018
    except Exception:
        return False
    return True


@pytest.mark.parametrize("name", list(files()))
def test_random_damage_never_escapes_as_another_exception_nor_passes_as_ok(name):
    data = files()[name]
    assert _reader_accepts(data, name)
    accepted_against_reader = []
    for kind, position, mutated in _mutations(data, seed=zlib.crc32(name.encode())):
        try:
            decoded = decode_image(mutated, name)
        except DecodeError:
            continue
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name}: {kind} at byte {position} raised {type(exc).__name__}: {exc}")
        # The decoder repairs missing or invalid DICOM attributes on purpose (SamplesPerPixel, BitsStored, ...) and
        # records each in provenance["assumed"]; only an acceptance without such a record contradicts the reader.
        if not decoded.provenance["assumed"] and not _reader_accepts(mutated, name):
            accepted_against_reader.append((kind, position))
    assert accepted_against_reader == []
