"""Decode chest X-ray files (DICOM, PNG, JPEG) into one grayscale presentation, with provenance.

Every cfgen stage sees an image as float32 in [0, 1], shape (rows, columns), where bright means dense (bone, fluid,
devices): the MONOCHROME2 presentation. For DICOM that is the grayscale pipeline of PS3.4 N.2.1 applied to the stored
values of the first frame (`cfgen.io.decode.grayscale`).

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
table rather than a crash. A file whose pixel data ends early, in any format, fails as "corrupt_pixel_data": the
lenient codecs (libjpeg, openjpeg) are only given codestreams that end where their format says they must.

Modules, one per format family, their dependencies pointing down:

    cfgen.io.decode              sniff_format, decode_image: dispatch on the bytes' signature
    .dicom                       DICOM data sets, transfer syntaxes, the first frame (pydicom's pixel backends)
    .grayscale                   the PS3.4 grayscale pipeline: Modality LUT, VOI LUT / window, MONOCHROME1
    .raster                      PNG and JPEG files (Pillow; libjpeg for 12-bit, lossless and JPEG-LS)
    .codestreams                 JPEG/JPEG-LS/JPEG 2000 markers and PNG chunks: what a stream declares, is it complete
    .elements, .image            DICOM element values; DecodedImage, DecodeError, REASONS and shared pixel arithmetic
"""

from __future__ import annotations

from pathlib import PurePosixPath

from cfgen.io.decode.codestreams import JPEG_SOI, PNG_SIGNATURE
from cfgen.io.decode.dicom import decode_dicom
from cfgen.io.decode.grayscale import window
from cfgen.io.decode.image import (
    BT601_LUMA,
    MAX_PIXELS,
    REASONS,
    DecodedImage,
    DecodeError,
    luminance,
    new_provenance,
)
from cfgen.io.decode.raster import decode_jpeg, decode_png

__all__ = [
    "BT601_LUMA",
    "MAX_PIXELS",
    "REASONS",
    "JPEG_SOI",
    "PNG_SIGNATURE",
    "DecodedImage",
    "DecodeError",
    "decode_image",
    "decode_dicom",
    "decode_jpeg",
    "decode_png",
    "luminance",
    "new_provenance",
    "sniff_format",
    "window",
]

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


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
