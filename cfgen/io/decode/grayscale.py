"""The grayscale pipeline of DICOM PS3.4 N.2.1, from stored values to the MONOCHROME2 presentation in [0, 1].

    stored values (bits above Bits Stored masked off by pydicom)
      -> Modality LUT: Modality LUT Sequence, else Rescale Slope / Rescale Intercept
      -> VOI LUT:      VOI LUT Sequence, else Window Center / Window Width with VOI LUT Function
                       (LINEAR, LINEAR_EXACT, SIGMOID; the first of multi-valued windows), else min/max
      -> MONOCHROME1:  inverted after the VOI LUT, so that bright is dense in every output

Presentation LUT Shape is not applied on top: in the CR and DX objects it restates the Photometric Interpretation
(INVERSE with MONOCHROME1), so applying both would invert twice. Colour (RGB, YBR converted to RGB by pydicom,
PALETTE COLOR) becomes BT.601 luma instead. The choices made where the standard leaves room are listed in
`cfgen.io.decode`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cfgen.io.decode.elements import as_int, as_text, first_float
from cfgen.io.decode.image import DecodeError, clip_unit, full_scale, luminance, stretch

def present(stored: np.ndarray, ds, prov: dict[str, Any], apply_voi: bool) -> np.ndarray:
    photometric = (as_text(ds.PhotometricInterpretation) or "").upper()
    if stored.ndim == 3 and stored.shape[-1] == 1:
        stored = stored[..., 0]
    if stored.ndim == 3:
        if stored.shape[-1] != 3:
            raise DecodeError("unsupported_photometric", f"{photometric} with {stored.shape[-1]} samples per pixel")
        prov["color_to_gray"] = "bt601_luma"
        return luminance(stored) / full_scale(prov["bits_stored"])
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
            first_mapped, entries = _lut(sequence[0], ds, signed_input=as_int(ds.PixelRepresentation) == 1)
        except ValueError as exc:  # without it the window and LUTs downstream mean nothing
            raise DecodeError("corrupt_pixel_data", f"Modality LUT Sequence unusable: {exc}") from None
        prov["modality_lut"] = "modality_lut_sequence"
        return _look_up(stored, first_mapped, entries)

    slope, intercept = first_float(ds.get("RescaleSlope")), first_float(ds.get("RescaleIntercept"))
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
    low, high = as_int(ds.get("PixelPaddingValue")), as_int(ds.get("PixelPaddingRangeLimit"))
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
            signed_input = as_int(ds.PixelRepresentation) == 1 or float(values.min()) < 0  # e.g. after an intercept
            try:
                first_mapped, entries = _lut(sequence[0], ds, signed_input)
            except ValueError as exc:
                prov["warnings"].append(f"VOI LUT Sequence ignored: {exc}")
            else:
                prov["voi"] = "voi_lut_sequence"
                return stretch(_look_up(values, first_mapped, entries), float(entries.min()), float(entries.max()))

        center, width = first_float(ds.get("WindowCenter")), first_float(ds.get("WindowWidth"))
        if center is not None and width is not None:
            function = (as_text(ds.get("VOILUTFunction")) or "LINEAR").upper()
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
    return stretch(values, float(finite.min()), float(finite.max()))


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
        return clip_unit(x)
    if width <= 0:
        raise ValueError(f"Window Width {width} <= 0 is invalid for {function}")
    if function == "LINEAR_EXACT":
        x -= center
        x /= width
        x += 0.5
        return clip_unit(x)
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
    return luminance(rgb) / full_scale(bits)
