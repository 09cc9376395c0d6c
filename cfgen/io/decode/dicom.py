"""DICOM files to the presentation of `cfgen.io.decode`: reading the data set, checking what its pixels need,
decoding the first frame through pydicom's pixel backends, and handing it to the grayscale pipeline
(`cfgen.io.decode.grayscale`).

Real files lack parts of the standard's structure: no preamble or file meta header (PACS exports, anonymisers that
strip group 0002), a compressed codestream without its Transfer Syntax UID, missing optional Image Pixel attributes.
What can be recovered is, and recorded in the provenance's "assumed"; what cannot raises `DecodeError`.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from cfgen.io.decode.codestreams import JPEG_SOI, j2k_defect, jpeg_defect, jpeg_frame_marker, jpeg_ls_near, rle_defect
from cfgen.io.decode.elements import as_int, as_text, floats
from cfgen.io.decode.grayscale import present
from cfgen.io.decode.image import MAX_PIXELS, DecodedImage, DecodeError, captured_warnings, new_provenance, unit_float32

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

def decode_dicom(data: bytes, *, apply_voi: bool = True) -> DecodedImage:
    """Decode the first frame of a DICOM file into the MONOCHROME2 presentation in [0, 1].

    `apply_voi=False` ignores the file's VOI LUT and window and maps min/max to [0, 1].
    """
    if not data:
        raise DecodeError("empty_file", "0 bytes")
    prov = new_provenance("dicom")
    with captured_warnings(prov):
        ds = _read_dataset(data)
        try:
            prov["transfer_syntax_uid"] = _ensure_transfer_syntax(ds, prov)
            _describe(ds, prov)
            _check_pixel_module(ds, prov)
            _lift_functional_groups(ds, frame=0)
            stored = _decode_first_frame(ds, prov)
            prov["original_shape"] = tuple(int(n) for n in stored.shape[:2])
            prov["pixel_spacing_mm"], prov["pixel_spacing_source"] = _pixel_spacing(ds)
            pixels = present(stored, ds, prov, apply_voi)
        except DecodeError:
            raise
        except Exception as exc:  # pydicom parses elements lazily: a damaged one fails where it is first read
            raise DecodeError("corrupt_header", f"{type(exc).__name__}: {exc}") from None
    return DecodedImage(unit_float32(pixels), prov)


def _read_dataset(data: bytes):
    import pydicom

    if data[:4] == b"DICM":  # 'DICM' without the 128-byte preamble, written by a few exporters
        data = bytes(128) + data
    part10 = data[128:132] == b"DICM"  # a Part 10 file: DICOM, whatever it holds
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # untrusted bytes: pydicom raises anything from InvalidDicomError to struct.error
        if part10:
            raise DecodeError("corrupt_header", f"{type(exc).__name__}: {exc}") from None
        raise DecodeError("not_dicom", f"unreadable as DICOM ({type(exc).__name__}: {exc})") from None
    _refuse_cut_off_pixel_data(data, ds, part10)
    # Without the DICM marker, `force=True` turns any bytes into a data set of random tags: ask for an element that
    # every image object has.
    if not part10 and not _has_evidence(ds):
        raise DecodeError("not_dicom", "no SOP, study, Rows/Columns or Pixel Data element found")
    _refuse_cut_off_element(data, ds, part10)
    return ds


def _has_evidence(ds) -> bool:
    try:
        return any(tag in ds for tag in _DICOM_EVIDENCE)
    except Exception:  # a data set of garbage tags can fail even to be searched
        return False


def _refuse_cut_off_pixel_data(data: bytes, ds, part10: bool) -> None:
    """Refuse a file that ends inside its encapsulated Pixel Data.

    pydicom reads such a file, which lacks the sequence delimiter, as an empty data set and only warns ("End of file
    reached before delimiter"), which would make it a file without pixels. Read up to the pixels alone, the same
    bytes still give the header: a header longer than the whole data set tells a cut-off file from one without
    Pixel Data.
    """
    import pydicom

    try:
        if any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
            return
        header = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        cut_off = len(header) > len(ds) and (part10 or _has_evidence(header))
    except Exception:  # the header itself is unreadable: the callers report that
        return
    if cut_off:
        raise DecodeError(
            "corrupt_pixel_data", f"the {len(data)}-byte file ends inside its Pixel Data (no sequence delimiter)"
        )


def _refuse_cut_off_element(data: bytes, ds, part10: bool) -> None:
    """Refuse a file that ends inside the value of its last element, or before its first one.

    pydicom reads a value that runs past the end of the file as a shorter value, without a word: Pixel Data cut
    short, or a header cut in the middle of a UID.
    """
    if len(ds) == 0:
        if part10:
            raise DecodeError("corrupt_header", f"no data element after the file meta header ({len(data)} bytes)")
        return
    try:
        last = ds.get_item(max(ds.keys()))  # the raw element, its value not yet converted
        missing = last.value_tell + last.length - len(data)
        undefined = last.length == 0xFFFFFFFF  # encapsulated: `_refuse_cut_off_pixel_data` covers it
    except Exception:
        return
    if missing > 0 and not undefined:
        reason = "corrupt_pixel_data" if last.tag == 0x7FE00010 else "corrupt_header"
        raise DecodeError(
            reason, f"the {len(data)}-byte file ends inside element {last.tag}: {missing} bytes of its value are missing"
        )


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
        process = jpeg_frame_marker(frame)
        if process == 0xF7:
            return str(JPEGLSLossless if jpeg_ls_near(frame) == 0 else JPEGLSNearLossless)
        uids = {0xC0: JPEGBaseline8Bit, 0xC1: JPEGExtended12Bit, 0xC3: JPEGLossless}
        return str(uids[process]) if process in uids else None
    if len(frame) >= 64:  # RLE: a 64-byte header of 16 little-endian offsets, the first segment at 64
        segments, first_offset = int.from_bytes(frame[:4], "little"), int.from_bytes(frame[4:8], "little")
        if 1 <= segments <= 15 and first_offset == 64:
            return str(RLELossless)
    return None


def _describe(ds, prov: dict[str, Any]) -> None:
    prov["modality"] = as_text(ds.get("Modality"))
    prov["view_position"] = as_text(ds.get("ViewPosition"))
    prov["sop_instance_uid"] = as_text(ds.get("SOPInstanceUID"))
    prov["n_frames"] = max(1, as_int(ds.get("NumberOfFrames")) or 1)


def _check_pixel_module(ds, prov: dict[str, Any]) -> None:
    """Refuse what cannot be decoded; give missing optional Image Pixel attributes their defaults (PS3.3 C.7.6.3)."""
    from pydicom.pixels import get_decoder

    keyword = next((kw for kw in _PIXEL_DATA_KEYWORDS if kw in ds), None)
    if keyword is None or not ds[keyword].value:
        hint = " (Rows and Columns are there: the file may end before its pixels)" if "Rows" in ds else ""
        raise DecodeError("no_pixel_data", f"SOP class {as_text(ds.get('SOPClassUID'))} holds no Pixel Data{hint}")
    missing = [kw for kw in ("Rows", "Columns", "BitsAllocated") if (as_int(ds.get(kw)) or 0) < 1]
    if missing:
        raise DecodeError("missing_pixel_attributes", f"missing or zero: {', '.join(missing)}")

    bits_allocated = as_int(ds.BitsAllocated)
    n_pixels = as_int(ds.Rows) * as_int(ds.Columns)
    if n_pixels > MAX_PIXELS:  # a damaged Rows or Columns must not allocate gigabytes before the codec fails
        raise DecodeError("image_too_large", f"{ds.Rows} x {ds.Columns} pixels, more than {MAX_PIXELS}")
    samples = as_int(ds.get("SamplesPerPixel"))
    if samples is None:
        samples = 1
        ds.SamplesPerPixel = samples
        prov["assumed"].append("SamplesPerPixel")
    if not as_text(ds.get("PhotometricInterpretation")):  # ACR-NEMA files predate the attribute
        ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
        prov["assumed"].append("PhotometricInterpretation")
    bits_stored = as_int(ds.get("BitsStored"))
    if bits_stored is None or not 0 < bits_stored <= bits_allocated:
        ds.BitsStored = bits_stored = bits_allocated
        prov["assumed"].append("BitsStored")
    if as_int(ds.get("HighBit")) is None:
        ds.HighBit = bits_stored - 1
    if as_int(ds.get("PixelRepresentation")) not in (0, 1):
        ds.PixelRepresentation = 0
        prov["assumed"].append("PixelRepresentation")
    prov.update(
        photometric_interpretation=as_text(ds.PhotometricInterpretation),
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=as_int(ds.PixelRepresentation),
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

    _check_first_frame_codestream(ds, prov)
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


def _check_first_frame_codestream(ds, prov: dict[str, Any]) -> None:
    """Refuse an encapsulated first frame whose codestream ends early (`cfgen.io.decode.codestreams`).

    pydicom's JPEG, JPEG-LS and JPEG 2000 plugins (libjpeg, openjpeg) decode such a frame into filler without an
    error, and a file cut short in transfer keeps a valid encapsulation when the cut falls between fragments.
    """
    from pydicom.encaps import get_frame
    from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

    uid = UID(prov["transfer_syntax_uid"])
    if uid in JPEGTransferSyntaxes or uid in JPEGLSTransferSyntaxes:
        defect_of = jpeg_defect
    elif uid in JPEG2000TransferSyntaxes:
        defect_of = j2k_defect
    elif uid == RLELossless:
        defect_of = rle_defect
    else:
        return
    if "PixelData" not in ds:
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=prov["n_frames"], extended_offsets=offsets)
    except Exception as exc:
        raise DecodeError("corrupt_pixel_data", f"no first frame in the encapsulated Pixel Data ({exc})") from None
    defect = defect_of(frame)
    if defect:
        raise DecodeError("corrupt_pixel_data", f"first frame: {defect}")


def _pixel_spacing(ds) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) spacing in mm from PixelSpacing (calibrated), else ImagerPixelSpacing (at the detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        numbers = floats(value)
        if len(numbers) == 1:  # VM 1 is non-conformant but seen: square pixels
            numbers = numbers * 2
        if len(numbers) >= 2 and all(n is not None and math.isfinite(n) and n > 0 for n in numbers[:2]):
            return (numbers[0], numbers[1]), keyword
    return None, None
