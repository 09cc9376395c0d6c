"""What every decoder of `cfgen.io.decode` returns or raises, and the pixel arithmetic they share.

A decoder returns a `DecodedImage`: float32 pixels in [0, 1], bright = dense, and a provenance dict with the keys of
`new_provenance`, the same for DICOM, PNG and JPEG. It raises `DecodeError`, whose `reason` is one of `REASONS`,
for a file that cannot become an image.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
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


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an (..., 3) array, in the input's units, as float32."""
    r, g, b = BT601_LUMA
    rgb = np.asarray(rgb, dtype=np.float32)
    return r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]


def stretch(values: np.ndarray, low: float, high: float) -> tuple[np.ndarray, bool]:
    """Map [low, high] to [0, 1]; an image without contrast becomes zeros (and reports it has none)."""
    if not high > low:
        return np.zeros(np.shape(values), np.float32), False
    stretched = np.array(values, dtype=np.float32)
    stretched -= low
    stretched /= high - low
    return clip_unit(stretched), True


def full_scale(bits: int | None) -> float:
    return float(2 ** int(bits) - 1) if bits else 255.0


def unit_float32(pixels: np.ndarray) -> np.ndarray:
    """Our own intermediate as contiguous float32 in [0, 1]: NaN to 0, +-inf clipped to 1 and 0 (in place)."""
    pixels = np.require(pixels, dtype=np.float32, requirements=["C", "W"])
    np.copyto(pixels, 0.0, where=np.isnan(pixels))
    return clip_unit(pixels)


def clip_unit(values: np.ndarray) -> np.ndarray:
    np.maximum(values, 0.0, out=values)
    return np.minimum(values, 1.0, out=values)


_WARNINGS_LOCK = threading.Lock()


@contextmanager
def captured_warnings(prov: dict[str, Any]):
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
