"""Decode chest X-ray files (DICOM, PNG, JPEG) into one grayscale presentation, with provenance.

Every cfgen stage sees an image as float32 in [0, 1], shape (rows, columns), where bright means dense (bone, fluid,
devices): the MONOCHROME2 presentation. For DICOM that is the grayscale pipeline of PS3.4 N.2.1 applied to the stored
values of the first frame:

    stored values (bits above Bits Stored masked off by pydicom)
      -> Modality LUT: Modality LUT Sequence, else Rescale Slope / Rescale Intercept
      -> VOI LUT:      VOI LUT Sequence, else Window Center / Window Width with VOI LUT Function
                       (LINEAR, LINEAR_EXACT, SIGMOID; the first of multi-valued windows), else min/max
      -> MONOCHROME1:  inverted after the VOI LUT, so that bright is dense in every output

Presentation LUT Shape is not applied on top: in the CR and DX objects it restates the Photometric Interpretation
(INVERSE with MONOCHROME1), so applying both would invert twice.

Choices made where the standard leaves room, each recorded in the provenance:

- No VOI in the file (or `apply_voi=False`): the minimum and maximum of the image's own modality values map to 0 and 1.
  A percentile window would hide pacemaker leads and wires, the very findings cfgen edits; a window over the whole
  Bits Stored range would leave most 12-in-16-bit images nearly black. An image without contrast becomes zeros.
- A VOI LUT Sequence maps its smallest and largest entry to 0 and 1, not 0 and 2**bits - 1: real files declare 16
  bits per entry and hold 12-bit entries, which would otherwise come out 16 times too dark.
- Multi-frame objects: the first frame is decoded (`n_frames` says how many there were); enhanced objects keep
  rescale, window and spacing in functional groups, which are read for that frame.
- Colour (RGB, YBR secondary captures, palette colour, colour PNG/JPEG) becomes gray by the ITU-R BT.601 luma
  weights, the Y of DICOM's YBR_FULL; alpha is composited on black, the background cfgen pads with.
- PNG and JPEG are divided by the nominal maximum of their bit depth (255, 65535 for 16-bit PNG, 4095 for 12-bit
  JPEG), never stretched: MIMIC-CXR-JPG and CheXpert are 8-bit images already windowed by their exporters, and a
  per-image stretch would make intensities incomparable across a data set.

Failures raise `DecodeError`, whose `reason` is one of `REASONS`; the data pipeline turns it into a row of its errors
table rather than a crash.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

#: Machine-readable reasons a file cannot be decoded, with what each means.
REASONS: dict[str, str] = {
    "empty_file": "the file has no bytes",
    "not_an_image": "the bytes have no DICOM, PNG or JPEG signature and do not parse as DICOM",
    "not_dicom": "the bytes do not parse as a DICOM data set",
    "corrupt_header": "a DICOM data element the decoder needs cannot be parsed",
    "no_pixel_data": "a DICOM data set without (7FE0,0010) Pixel Data, e.g. a structured report",
    "missing_pixel_attributes": "Rows, Columns or Bits Allocated is missing or 0, so the pixels cannot be laid out",
    "unsupported_transfer_syntax": "no installed decoder handles the Transfer Syntax UID",
    "unsupported_pixel_format": "a pixel layout the decoders do not implement, e.g. ACR-NEMA packed 12-bit",
    "unsupported_photometric": "a Photometric Interpretation without a grayscale meaning, e.g. 4 samples per pixel",
    "corrupt_pixel_data": "the pixel data is truncated or its codestream is invalid",
    "image_too_large": "more than MAX_PIXELS pixels per frame (Pillow's decompression-bomb limit)",
}

#: ITU-R BT.601 luma weights, as in DICOM's RGB -> YBR_FULL (PS3.3 C.7.6.3.1.2).
BT601_LUMA = (0.299, 0.587, 0.114)

#: The largest image accepted, in pixels per frame: Pillow's decompression-bomb threshold, 20 times a 4k x 4k CXR.
MAX_PIXELS = 89_478_485

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}

# Elements of which at least one is in any image object. `dcmread(force=True)` turns arbitrary bytes into a data set
# of random tags; these tell a DICOM file without preamble from that.
_DICOM_EVIDENCE = (
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x0020000D,  # StudyInstanceUID
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x7FE00010,  # PixelData
)
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MAX_WARNINGS = 10


class DecodeError(Exception):
    """A file that cannot become an image; `reason` is a key of `REASONS`, `message` says what was found."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode reason {reason!r}; add it to REASONS")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # keep both fields when Ray pickles the error across processes
        return (type(self), (self.reason, self.message))


@dataclass
class DecodedImage:
    """float32 pixels (rows, columns) in [0, 1], bright = dense, and how they were obtained."""

    pixels: np.ndarray
    provenance: dict[str, Any]


def new_provenance(fmt: str) -> dict[str, Any]:
    """Every key a decoder reports, so that rows from DICOM, PNG and JPEG share one schema."""
    return {
        "format": fmt,  # "dicom" | "png" | "jpeg"
        "photometric_interpretation": None,  # as in the file (PNG/JPEG: the DICOM name of their colour type)
        "transfer_syntax_uid": None,
        "bits_allocated": None,
        "bits_stored": None,
        "pixel_representation": None,
        "modality_lut": None,  # "rescale" | "modality_lut_sequence" | None
        "rescale_slope": None,
        "rescale_intercept": None,
        "voi": "none",  # "voi_lut_sequence" | "window" | "minmax" | "none"
        "voi_lut_function": None,
        "window_center": None,
        "window_width": None,
        "inverted": False,  # MONOCHROME1 turned into bright = dense
        "color_to_gray": None,  # "bt601_luma" when colour samples were combined
        "alpha": None,  # "composited_on_black" when an alpha channel was applied
        "pixel_spacing_mm": None,  # (row, column)
        "pixel_spacing_source": None,  # "PixelSpacing" | "ImagerPixelSpacing"
        "original_shape": None,  # (rows, columns)
        "n_frames": 1,
        "frame_index": 0,
        "modality": None,
        "view_position": None,
        "sop_instance_uid": None,
        "exif_orientation": None,
        "padding_pixels": 0,  # pixels equal to PixelPaddingValue (left out of a min/max stretch)
        "assumed": [],  # attributes that were missing or invalid and replaced by their default
        "warnings": [],  # what the readers complained about, deduplicated
    }


# --------------------------------------------------------------------------------------------------------------------
# Format sniffing


def sniff_format(data: bytes) -> str | None:
    """Return "dicom", "png" or "jpeg" from magic bytes, or None (DICOM without preamble has none)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SOI):
        return "jpeg"
    return None


def decode_image(data: bytes, uri: str | None = None, *, apply_voi: bool = True) -> DecodedImage:
    """Decode DICOM, PNG or JPEG bytes, recognised by their content; `uri` is only a hint.

    Bytes without a signature are tried as DICOM without preamble or file meta header, which PACS exports and older
    archives contain. They fail as "not_an_image", or as "not_dicom" when the uri ends in .dcm/.dicom/.dic.
    """
    if not data:
        raise DecodeError("empty_file", f"{uri or 'input'} has 0 bytes")
    fmt = sniff_format(data)
    if fmt == "png":
        return decode_png(data)
    if fmt == "jpeg":
        return decode_jpeg(data)
    try:
        return decode_dicom(data, apply_voi=apply_voi)
    except DecodeError as exc:
        suffix = PurePosixPath(uri).suffix.lower() if uri else ""
        if fmt == "dicom" or exc.reason != "not_dicom" or suffix in _DICOM_SUFFIXES:
            raise
        raise DecodeError(
            "not_an_image", f"{uri or 'input'} ({len(data)} bytes) is not DICOM, PNG or JPEG ({exc.message})"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# DICOM


def decode_dicom(data: bytes, *, apply_voi: bool = True) -> DecodedImage:
    """Decode the first frame of a DICOM file into the MONOCHROME2 presentation in [0, 1].

    `apply_voi=False` ignores the file's VOI LUT and window and maps min/max to [0, 1].
    """
    if not data:
        raise DecodeError("empty_file", "0 bytes")
    prov = new_provenance("dicom")
    with _captured_warnings(prov):
        ds = _read_dataset(data)
        try:
            prov["transfer_syntax_uid"] = _ensure_transfer_syntax(ds, prov)
            _describe(ds, prov)
            _check_pixel_module(ds, prov)
            _lift_functional_groups(ds, frame=0)
            stored = _decode_first_frame(ds, prov)
            prov["original_shape"] = tuple(int(n) for n in stored.shape[:2])
            prov["pixel_spacing_mm"], prov["pixel_spacing_source"] = _pixel_spacing(ds)
            pixels = _present(stored, ds, prov, apply_voi)
        except DecodeError:
            raise
        except Exception as exc:  # pydicom parses elements lazily: a damaged one fails where it is first read
            raise DecodeError("corrupt_header", f"{type(exc).__name__}: {exc}") from None
    return DecodedImage(_unit_float32(pixels), prov)


def _read_dataset(data: bytes):
    import pydicom

    if data[:4] == b"DICM":  # 'DICM' without the 128-byte preamble, written by a few exporters
        data = bytes(128) + data
    if data[128:132] == b"DICM":  # a Part 10 file: DICOM, whatever it holds
        try:
            return pydicom.dcmread(io.BytesIO(data), force=True)
        except Exception as exc:
            raise DecodeError("corrupt_header", f"{type(exc).__name__}: {exc}") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # untrusted bytes: pydicom raises anything from InvalidDicomError to struct.error
        raise DecodeError("not_dicom", f"unreadable as DICOM ({type(exc).__name__}: {exc})") from None
    # Without the DICM marker, `force=True` turns any bytes into a data set of random tags: ask for an element that
    # every image object has.
    try:
        evidence = any(tag in ds for tag in _DICOM_EVIDENCE)
    except Exception:  # a data set of garbage tags can fail even to be searched
        evidence = False
    if not evidence:
        raise DecodeError("not_dicom", "no SOP, study, Rows/Columns or Pixel Data element found")
    return ds


def _ensure_transfer_syntax(ds, prov: dict[str, Any]) -> str:
    """Return the Transfer Syntax UID, setting it from the encoding pydicom detected when the file meta lacks one."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    uid = str(meta.get("TransferSyntaxUID", "") or "").strip().rstrip("\x00")
    if uid:
        meta.TransferSyntaxUID = UID(uid)
        return uid
    prov["assumed"].append("TransferSyntaxUID")
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:  # encapsulated, i.e. compressed
        # Anonymisers that strip group 0002, and objects cut out of DICOMweb responses, lose the only record of the
        # compression; the codestream itself still says what it is.
        guessed = _guess_encapsulated_syntax(ds.PixelData)
        if guessed is None:
            raise DecodeError("unsupported_transfer_syntax", "compressed Pixel Data of an unknown codec, no syntax")
        meta.TransferSyntaxUID = UID(guessed)
        return guessed
    # Otherwise native pixels, whose encoding pydicom has already detected while reading the data set. Files without
    # a file meta header are mostly Implicit VR Little Endian, the DICOM default.
    implicit, little = ds.original_encoding
    if implicit is False:
        native = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    else:
        native = ImplicitVRLittleEndian
    meta.TransferSyntaxUID = native
    return str(native)


def _guess_encapsulated_syntax(pixel_data: bytes) -> str | None:
    """The Transfer Syntax UID of encapsulated Pixel Data, from the first frame's codestream signature."""
    from pydicom.encaps import generate_frames
    from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLSLossless
    from pydicom.uid import JPEGLSNearLossless, RLELossless

    try:
        frame = next(generate_frames(pixel_data, number_of_frames=1))
    except Exception:
        return None
    if frame[:4] == b"\xff\x4f\xff\x51" or frame[4:8] == b"jP  ":  # J2K codestream (SOC, SIZ) or JP2 file box
        return str(JPEG2000)  # 'lossless or lossy': the same decoder either way
    if frame[:2] == JPEG_SOI:
        process = _jpeg_frame_marker(frame)
        if process == 0xF7:
            return str(JPEGLSLossless if _jpeg_ls_near(frame) == 0 else JPEGLSNearLossless)
        uids = {0xC0: JPEGBaseline8Bit, 0xC1: JPEGExtended12Bit, 0xC3: JPEGLossless}
        return str(uids[process]) if process in uids else None
    if len(frame) >= 64:  # RLE: a 64-byte header of 16 little-endian offsets, the first segment at 64
        segments, first_offset = int.from_bytes(frame[:4], "little"), int.from_bytes(frame[4:8], "little")
        if 1 <= segments <= 15 and first_offset == 64:
            return str(RLELossless)
    return None


def _describe(ds, prov: dict[str, Any]) -> None:
    prov["modality"] = _text(ds.get("Modality"))
    prov["view_position"] = _text(ds.get("ViewPosition"))
    prov["sop_instance_uid"] = _text(ds.get("SOPInstanceUID"))
    prov["n_frames"] = max(1, _int(ds.get("NumberOfFrames")) or 1)


def _check_pixel_module(ds, prov: dict[str, Any]) -> None:
    """Refuse what cannot be decoded; give missing optional Image Pixel attributes their defaults (PS3.3 C.7.6.3)."""
    from pydicom.pixels import get_decoder

    keyword = next((kw for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if keyword is None or not ds[keyword].value:
        raise DecodeError("no_pixel_data", f"SOP class {_text(ds.get('SOPClassUID'))} holds no Pixel Data")
    missing = [kw for kw in ("Rows", "Columns", "BitsAllocated") if (_int(ds.get(kw)) or 0) < 1]
    if missing:
        raise DecodeError("missing_pixel_attributes", f"missing or zero: {', '.join(missing)}")

    bits_allocated = _int(ds.BitsAllocated)
    n_pixels = _int(ds.Rows) * _int(ds.Columns)
    if n_pixels > MAX_PIXELS:  # a damaged Rows or Columns must not allocate gigabytes before the codec fails
        raise DecodeError("image_too_large", f"{ds.Rows} x {ds.Columns} pixels, more than {MAX_PIXELS}")
    samples = _int(ds.get("SamplesPerPixel"))
    if samples is None:
        samples = 1
        ds.SamplesPerPixel = samples
        prov["assumed"].append("SamplesPerPixel")
    if not _text(ds.get("PhotometricInterpretation")):  # ACR-NEMA files predate the attribute
        ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
        prov["assumed"].append("PhotometricInterpretation")
    bits_stored = _int(ds.get("BitsStored"))
    if bits_stored is None or not 0 < bits_stored <= bits_allocated:
        ds.BitsStored = bits_stored = bits_allocated
        prov["assumed"].append("BitsStored")
    if _int(ds.get("HighBit")) is None:
        ds.HighBit = bits_stored - 1
    if _int(ds.get("PixelRepresentation")) not in (0, 1):
        ds.PixelRepresentation = 0
        prov["assumed"].append("PixelRepresentation")
    prov.update(
        photometric_interpretation=_text(ds.PhotometricInterpretation),
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=_int(ds.PixelRepresentation),
    )

    uid = prov["transfer_syntax_uid"]
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DecodeError("unsupported_transfer_syntax", f"no pixel data decoder exists for {uid}") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a plugin"
        raise DecodeError("unsupported_transfer_syntax", f"{uid} needs {needs}")


def _lift_functional_groups(ds, frame: int) -> None:
    """Copy a frame's rescale, window and spacing from enhanced multi-frame functional groups to the top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) > frame:
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    macros = {
        "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
        "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
        "PixelMeasuresSequence": ("PixelSpacing",),
    }
    for macro, keywords in macros.items():
        item = next((g[macro][0] for g in groups if g.get(macro)), None)  # per-frame before shared
        for keyword in keywords if item is not None else ():
            if keyword in item and keyword not in ds:
                setattr(ds, keyword, item[keyword].value)


def _decode_first_frame(ds, prov: dict[str, Any]) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        # index=0 decodes only the first frame; pydicom masks bits above Bits Stored and, for the default raw=False,
        # converts YBR_FULL/YBR_FULL_422 to RGB.
        return np.asarray(pixel_array(ds, index=0))
    except NotImplementedError as exc:
        raise DecodeError("unsupported_pixel_format", str(exc)) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # codec errors; pylibjpeg-rle's Rust panics derive from BaseException, not Exception
        raise DecodeError("corrupt_pixel_data", f"{type(exc).__name__}: {exc}") from None


def _present(stored: np.ndarray, ds, prov: dict[str, Any], apply_voi: bool) -> np.ndarray:
    photometric = (_text(ds.PhotometricInterpretation) or "").upper()
    if stored.ndim == 3 and stored.shape[-1] == 1:
        stored = stored[..., 0]
    if stored.ndim == 3:
        if stored.shape[-1] != 3:
            raise DecodeError("unsupported_photometric", f"{photometric} with {stored.shape[-1]} samples per pixel")
        prov["color_to_gray"] = "bt601_luma"
        return luminance(stored) / _full_scale(prov["bits_stored"])
    if photometric == "PALETTE COLOR":
        return _palette_to_gray(stored, ds, prov)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # e.g. a one-sample JPEG labelled YBR_FULL_422 by its writer: one sample per pixel is a gray value anyway
        prov["warnings"].append(f"{photometric} with one sample per pixel read as MONOCHROME2")

    values = _modality_lut(stored, ds, prov)
    presented, has_contrast = _voi_lut(values, ds, prov, apply_voi, _padding_mask(stored, ds, prov))
    if photometric == "MONOCHROME1" and has_contrast:
        presented = np.subtract(1.0, presented, out=presented)
        prov["inverted"] = True
    return presented


def _modality_lut(stored: np.ndarray, ds, prov: dict[str, Any]) -> np.ndarray:
    """Stored values to modality values (PS3.3 C.11.1), as float32.

    This is what pydicom.pixels.apply_modality_lut computes, done here in float32 (exact for 16-bit stored values;
    pydicom's float64 doubles the memory of a 3000 x 3000 radiograph) and with the LUT reader below.
    """
    sequence = ds.get("ModalityLUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        try:
            first_mapped, entries = _lut(sequence[0], ds, signed_input=_int(ds.PixelRepresentation) == 1)
        except ValueError as exc:  # without it the window and LUTs downstream mean nothing
            raise DecodeError("corrupt_pixel_data", f"Modality LUT Sequence unusable: {exc}") from None
        prov["modality_lut"] = "modality_lut_sequence"
        return _look_up(stored, first_mapped, entries)

    slope, intercept = _first_float(ds.get("RescaleSlope")), _first_float(ds.get("RescaleIntercept"))
    values = stored.astype(np.float32)
    if slope is None and intercept is None:
        return values
    if slope is None or slope == 0.0:  # a zero slope would erase the image; it is a writer's bug, not intent
        slope = 1.0
        prov["assumed"].append("RescaleSlope")
    if intercept is None:
        intercept = 0.0
        prov["assumed"].append("RescaleIntercept")
    prov.update(modality_lut="rescale", rescale_slope=slope, rescale_intercept=intercept)
    values *= slope
    values += intercept
    return values


def _padding_mask(stored: np.ndarray, ds, prov: dict[str, Any]) -> np.ndarray | None:
    """Pixels marked as padding (PixelPaddingValue, up to PixelPaddingRangeLimit), in stored values (PS3.3
    C.7.5.1.1.2). Collimator borders filled this way would otherwise set the min/max of an image without a window."""
    low, high = _int(ds.get("PixelPaddingValue")), _int(ds.get("PixelPaddingRangeLimit"))
    if low is None:
        return None
    high = low if high is None else high
    mask = (stored >= min(low, high)) & (stored <= max(low, high))
    prov["padding_pixels"] = int(mask.sum())
    return mask if prov["padding_pixels"] else None


def _voi_lut(
    values: np.ndarray, ds, prov: dict[str, Any], apply_voi: bool, padding: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """Map modality values to [0, 1] by the file's VOI LUT Sequence or window, else by the min/max of the pixels
    that are not padding."""
    if apply_voi:
        sequence = ds.get("VOILUTSequence")
        if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
            signed_input = _int(ds.PixelRepresentation) == 1 or float(values.min()) < 0  # e.g. after an intercept
            try:
                first_mapped, entries = _lut(sequence[0], ds, signed_input)
            except ValueError as exc:
                prov["warnings"].append(f"VOI LUT Sequence ignored: {exc}")
            else:
                prov["voi"] = "voi_lut_sequence"
                return _stretch(_look_up(values, first_mapped, entries), float(entries.min()), float(entries.max()))

        center, width = _first_float(ds.get("WindowCenter")), _first_float(ds.get("WindowWidth"))
        if center is not None and width is not None:
            function = (_text(ds.get("VOILUTFunction")) or "LINEAR").upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                prov["warnings"].append(f"VOILUTFunction {function} unknown, LINEAR applied")
                function = "LINEAR"
            try:
                presented = window(values, center, width, function)
            except ValueError as exc:
                prov["warnings"].append(f"window ignored: {exc}")
            else:
                prov.update(voi="window", voi_lut_function=function, window_center=center, window_width=width)
                return presented, True

    prov["voi"] = "minmax"
    keep = np.isfinite(values) if padding is None else np.isfinite(values) & ~padding
    finite = values if keep.all() else values[keep]
    if finite.size == 0:
        return np.zeros(values.shape, np.float32), False
    return _stretch(values, float(finite.min()), float(finite.max()))


def window(values: np.ndarray, center: float, width: float, voi_lut_function: str = "LINEAR") -> np.ndarray:
    """Window Center/Width to [0, 1] by the VOI LUT Function formulas of PS3.3 C.11.2.1.2 and C.11.2.1.3.

    LINEAR:       y = ((x - (c - 0.5)) / (w - 1) + 0.5), 0 at x <= c - 0.5 - (w - 1)/2, 1 at x > c - 0.5 + (w - 1)/2
    LINEAR_EXACT: y = (x - c) / w + 0.5, clipped to [0, 1]
    SIGMOID:      y = 1 / (1 + exp(-4 (x - c) / w))
    """
    x = np.array(values, dtype=np.float32)  # a copy, transformed in place below
    function = voi_lut_function.upper()
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ValueError(f"Window Center {center} / Width {width} are not finite")
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width} < 1 is invalid for LINEAR")
        if width == 1:  # the formula's limit: a threshold at c - 0.5
            return (x > center - 0.5).astype(np.float32)
        x -= center - 0.5
        x /= width - 1
        x += 0.5
        return _clip_unit(x)
    if width <= 0:
        raise ValueError(f"Window Width {width} <= 0 is invalid for {function}")
    if function == "LINEAR_EXACT":
        x -= center
        x /= width
        x += 0.5
        return _clip_unit(x)
    if function == "SIGMOID":
        x -= center
        x *= -4.0 / width
        with np.errstate(over="ignore"):
            np.exp(x, out=x)
        x += 1.0
        return np.reciprocal(x, out=x)
    raise ValueError(f"VOI LUT Function {voi_lut_function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")


def _lut(item, ds, signed_input: bool) -> tuple[int, np.ndarray]:
    """(first input value mapped, entries) of a Modality or VOI LUT Sequence item; ValueError if malformed.

    Read here rather than through pydicom.pixels.apply_voi, which in pydicom 3.0.2 indexes 8-bit LUTs with uint8
    indices, so an 8-bit VOI LUT with 4096 entries (a 12-bit CR shown on an 8-bit display) wraps around; and its
    apply_modality_lut builds a 'uint12' dtype from LUTs that declare 12 bits per entry.
    """
    try:
        n_entries, first_mapped, _bits = (int(v) for v in item.LUTDescriptor)
    except (TypeError, ValueError):
        raise ValueError(f"LUT Descriptor {item.LUTDescriptor!r} is not three numbers") from None
    n_entries = n_entries or 65536
    if signed_input and first_mapped >= 32768:
        first_mapped -= 65536  # the descriptor's VR is US or SS: a negative first value may have been read unsigned
    data = item["LUTData"].value
    if data is None:
        raise ValueError("LUT Data is empty")
    if isinstance(data, (bytes, bytearray)):
        if len(data) == n_entries:  # 8-bit entries packed one per byte instead of one per 16-bit word
            entries = np.frombuffer(data, dtype=np.uint8)
        else:
            little = ds.original_encoding[1] is not False
            entries = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
    else:
        entries = np.atleast_1d(np.asarray(data, dtype=np.float32))
    if entries.size == 0 or not np.isfinite(entries).all():
        raise ValueError("LUT Data is empty or not numbers")
    return first_mapped, entries[:n_entries].astype(np.float32)  # odd-length LUTs arrive padded


def _look_up(values: np.ndarray, first_mapped: int, entries: np.ndarray) -> np.ndarray:
    # PS3.3 C.11.1.1.1: inputs below the first mapped value take the first entry, inputs past the end the last.
    if np.issubdtype(values.dtype, np.integer):
        index = values.astype(np.int64)
    else:
        index = np.rint(np.nan_to_num(values)).astype(np.int64)
    index -= first_mapped
    np.clip(index, 0, entries.size - 1, out=index)
    return entries[index]


def _palette_to_gray(stored: np.ndarray, ds, prov: dict[str, Any]) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(stored, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:
        raise DecodeError("unsupported_photometric", f"PALETTE COLOR without a usable palette ({exc})") from None
    prov["color_to_gray"] = "bt601_luma"
    return luminance(rgb) / _full_scale(bits)


def _pixel_spacing(ds) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm from PixelSpacing (calibrated), else ImagerPixelSpacing (at the detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        numbers = _floats(value)
        if len(numbers) == 1:  # VM 1 is non-conformant but seen: square pixels
            numbers = numbers * 2
        if len(numbers) >= 2 and all(n is not None and math.isfinite(n) and n > 0 for n in numbers[:2]):
            return (numbers[0], numbers[1]), keyword
    return None, None


# --------------------------------------------------------------------------------------------------------------------
# PNG and JPEG


def decode_png(data: bytes) -> DecodedImage:
    """Decode 1/2/4/8/16-bit grayscale, RGB(A), gray+alpha and palette PNG; 16-bit is divided by 65535."""
    return _decode_raster(data, "png")


def decode_jpeg(data: bytes) -> DecodedImage:
    """Decode JPEG: 8-bit through Pillow; 12-bit (process 2/4) and lossless (process 14) through libjpeg."""
    try:
        return _decode_raster(data, "jpeg")
    except DecodeError as exc:
        if exc.reason != "corrupt_pixel_data":
            raise
        pillow_error = exc
    # Pillow decodes only 8-bit lossy JPEG; exporters of 12-bit or lossless JPEG need pylibjpeg's libjpeg.
    from libjpeg import decode as libjpeg_decode

    try:
        samples = np.asarray(libjpeg_decode(data))
    except Exception as exc:
        raise DecodeError("corrupt_pixel_data", f"{pillow_error.message}; libjpeg: {exc}") from None
    precision = _jpeg_precision(data) or (16 if samples.dtype.itemsize > 1 else 8)
    prov = new_provenance("jpeg")
    prov.update(bits_allocated=8 * samples.dtype.itemsize, bits_stored=precision, original_shape=samples.shape[:2])
    if samples.ndim == 3 and samples.shape[-1] == 3:
        prov.update(photometric_interpretation="RGB", color_to_gray="bt601_luma")
        gray = luminance(samples)
    else:
        prov["photometric_interpretation"] = "MONOCHROME2"
        gray = samples.reshape(samples.shape[:2]).astype(np.float32)
    return DecodedImage(_unit_float32(gray / _full_scale(precision)), prov)


def _decode_raster(data: bytes, fmt: str) -> DecodedImage:
    from PIL import Image, ImageOps

    if not data:
        raise DecodeError("empty_file", "0 bytes")
    prov = new_provenance(fmt)
    with _captured_warnings(prov):
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise DecodeError("image_too_large", f"{image.width} x {image.height} pixels, more than {MAX_PIXELS}")
            prov["n_frames"] = int(getattr(image, "n_frames", 1))  # APNG, MPO: the first frame
            image.load()
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError("image_too_large", str(exc)) from None
        except Exception as exc:  # untrusted bytes: OSError, SyntaxError, ValueError, struct.error ...
            raise DecodeError("corrupt_pixel_data", f"{fmt}: {type(exc).__name__}: {exc}") from None
        orientation = image.getexif().get(0x0112)  # EXIF Orientation: phone photographs of films carry it
        if orientation and orientation != 1:
            image = ImageOps.exif_transpose(image)
            prov["exif_orientation"] = int(orientation)
        gray = _raster_to_gray(image, prov)
    prov["original_shape"] = tuple(int(n) for n in gray.shape)
    if fmt == "png" and len(data) > 24:
        prov["bits_stored"] = int(data[24])  # IHDR bit depth
    elif fmt == "jpeg":
        prov["bits_stored"] = _jpeg_precision(data)
    return DecodedImage(_unit_float32(gray), prov)


def _raster_to_gray(image, prov: dict[str, Any]) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        samples = np.asarray(image).astype(np.float32)
        prov.update(photometric_interpretation="MONOCHROME2", bits_allocated=16)
        return samples / 65535.0
    if mode == "F":  # float TIFF-like data: no nominal range to divide by
        samples = np.asarray(image, dtype=np.float32)
        prov.update(photometric_interpretation="MONOCHROME2", bits_allocated=32, voi="minmax")
        finite = samples[np.isfinite(samples)]
        return _stretch(samples, float(finite.min()), float(finite.max()))[0] if finite.size else samples * 0
    prov["bits_allocated"] = 8
    if mode in ("1", "L"):
        prov["photometric_interpretation"] = "MONOCHROME2"
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        samples = np.asarray(image, dtype=np.float32) / 255.0
        prov.update(photometric_interpretation="MONOCHROME2", alpha="composited_on_black")
        return samples[..., 0] * samples[..., 1]
    prov["photometric_interpretation"] = "PALETTE COLOR" if mode in ("P", "PA") else "RGB"
    prov["color_to_gray"] = "bt601_luma"
    has_alpha = "A" in mode or "transparency" in image.info
    rgba = np.asarray(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    gray = luminance(rgba[..., :3])
    if has_alpha:
        prov["alpha"] = "composited_on_black"
        gray = gray * rgba[..., 3]
    return gray


def _jpeg_segments(data: bytes):
    """(marker, offset of the marker) of each JPEG marker segment up to the first scan."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        yield marker, position
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOF marker (0xC0 baseline, 0xC1 extended, 0xC3 lossless, 0xF7 JPEG-LS, ...) of a JPEG codestream."""
    return next((marker for marker, _ in _jpeg_segments(data) if marker in _SOF_MARKERS), None)


def _jpeg_precision(data: bytes) -> int | None:
    """Sample precision P of the frame header (8, 12 or 16)."""
    for marker, position in _jpeg_segments(data):
        if marker in _SOF_MARKERS and position + 4 < len(data):
            return int(data[position + 4])
    return None


def _jpeg_ls_near(data: bytes) -> int | None:
    """NEAR of the first JPEG-LS scan header (ISO 14495-1 C.2.3): 0 means lossless."""
    for marker, position in _jpeg_segments(data):
        if marker == 0xDA and position + 5 < len(data):
            components = data[position + 4]
            near_at = position + 5 + 2 * components
            return int(data[near_at]) if near_at < len(data) else None
    return None


# --------------------------------------------------------------------------------------------------------------------
# Small shared pieces


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (..., 3) array, in the input's units, as float32."""
    r, g, b = BT601_LUMA
    rgb = np.asarray(rgb, dtype=np.float32)
    return r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]


def _stretch(values: np.ndarray, low: float, high: float) -> tuple[np.ndarray, bool]:
    """Map [low, high] to [0, 1]; an image without contrast becomes zeros (and reports it has none)."""
    if not high > low:
        return np.zeros(np.shape(values), np.float32), False
    stretched = np.array(values, dtype=np.float32)
    stretched -= low
    stretched /= high - low
    return _clip_unit(stretched), True


def _full_scale(bits: int | None) -> float:
    return float(2 ** int(bits) - 1) if bits else 255.0


def _unit_float32(pixels: np.ndarray) -> np.ndarray:
    """Our own intermediate as contiguous float32 in [0, 1]: NaN to 0, +-inf clipped to 1 and 0 (in place)."""
    pixels = np.require(pixels, dtype=np.float32, requirements=["C", "W"])
    np.copyto(pixels, 0.0, where=np.isnan(pixels))
    return _clip_unit(pixels)


def _clip_unit(values: np.ndarray) -> np.ndarray:
    np.maximum(values, 0.0, out=values)
    return np.minimum(values, 1.0, out=values)


def _first_float(value: Any) -> float | None:
    """First number of a DS/IS value that may be multi-valued, a string, bytes or garbage."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    elif not isinstance(value, (int, float)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _floats(value: Any) -> list[float | None]:
    """Every number of a possibly multi-valued DS element (MultiValue, list, backslash-separated text)."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return [_first_float(part) for part in value.split("\\")]
    if isinstance(value, (int, float)):
        return [_first_float(value)]
    try:
        return [_first_float(item) for item in value]
    except TypeError:
        return [_first_float(value)]


def _int(value: Any) -> int | None:
    number = _first_float(value)
    return int(number) if number is not None else None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


_WARNINGS_LOCK = threading.Lock()


@contextmanager
def _captured_warnings(prov: dict[str, Any]):
    """Collect what the readers warn about into prov["warnings"].

    warnings.catch_warnings swaps process-wide state; the lock keeps decodes in threads (the data stage reads and
    decodes with a thread pool) from restoring each other's state out of order, which would leave every later
    warning of the process captured in a dead list.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            prov["warnings"] = _messages(caught) + prov["warnings"]


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    seen: list[str] = []
    for item in caught:
        text = str(item.message).strip().splitlines()[0][:200] if str(item.message).strip() else ""
        if text and text not in seen:
            seen.append(text)
    return seen[:_MAX_WARNINGS]
