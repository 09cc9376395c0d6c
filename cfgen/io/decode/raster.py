"""PNG and JPEG files (exports such as CheXpert's and MIMIC-CXR-JPG's) to the presentation of `cfgen.io.decode`.

A JPEG stream must be complete up to EOI before either decoder sees it. Pillow decodes PNG and the 8-bit JPEG
processes, and its error on a JPEG is final. JPEG that Pillow cannot decode by design, as its frame header says
(12/16-bit precision, lossless, hierarchical, JPEG-LS), goes to pylibjpeg's libjpeg, which fills a stream that ends
early with grey instead of failing; its output must have the frame header's size. PNG must be complete up to IEND
with every critical chunk's CRC right, which Pillow does not check.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from cfgen.io.decode.codestreams import JpegFrame, jpeg_defect, jpeg_frame, png_defect
from cfgen.io.decode.image import (
    MAX_PIXELS,
    DecodedImage,
    DecodeError,
    captured_warnings,
    full_scale,
    luminance,
    new_provenance,
    stretch,
    unit_float32,
)

#: JPEG processes (SOF markers) that Pillow's libjpeg-turbo decodes at 8-bit precision: baseline, extended,
#: progressive and their arithmetic-coded twins.
PILLOW_JPEG_PROCESSES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})


def decode_png(data: bytes) -> DecodedImage:
    """Decode 1/2/4/8/16-bit grayscale, RGB(A), gray+alpha and palette PNG; 16-bit is divided by 65535."""
    return _decode_raster(data, "png")


def decode_jpeg(data: bytes) -> DecodedImage:
    """Decode JPEG: 8-bit through Pillow; 12-bit (process 2/4), lossless (process 14) and JPEG-LS through libjpeg."""
    if not data:
        raise DecodeError("empty_file", "0 bytes")
    defect = jpeg_defect(data)  # before either decoder: Pillow, too, accepts a stream whose EOI is damaged
    if defect:
        raise DecodeError("corrupt_pixel_data", f"jpeg: {defect}")
    frame = jpeg_frame(data)
    if frame is not None and (frame.marker not in PILLOW_JPEG_PROCESSES or frame.precision != 8):
        return _decode_libjpeg(data, frame)
    return _decode_raster(data, "jpeg")  # Pillow's error is final: libjpeg would decode a broken stream into filler


def _decode_libjpeg(data: bytes, frame: JpegFrame) -> DecodedImage:
    if frame.rows * frame.columns > MAX_PIXELS:
        raise DecodeError("image_too_large", f"{frame.rows} x {frame.columns} pixels, more than {MAX_PIXELS}")
    from libjpeg import decode as libjpeg_decode

    try:
        samples = np.asarray(libjpeg_decode(data))
    except Exception as exc:
        raise DecodeError("corrupt_pixel_data", f"jpeg (libjpeg): {type(exc).__name__}: {exc}") from None
    components = samples.shape[2] if samples.ndim == 3 else 1
    if samples.shape[:2] != (frame.rows or samples.shape[0], frame.columns) or components != frame.components:
        raise DecodeError("corrupt_pixel_data", f"jpeg (libjpeg): decoded {samples.shape}, but the frame header says "
                                                f"{frame.rows} x {frame.columns} x {frame.components}")
    if components not in (1, 3):
        raise DecodeError("unsupported_photometric", f"JPEG with {components} components (1 or 3 are read)")
    precision = frame.precision or (16 if samples.dtype.itemsize > 1 else 8)
    prov = new_provenance("jpeg")
    prov.update(bits_allocated=8 * samples.dtype.itemsize, bits_stored=precision, original_shape=samples.shape[:2])
    if components == 3:
        prov.update(photometric_interpretation="RGB", color_to_gray="bt601_luma")
        gray = luminance(samples)
    else:
        prov["photometric_interpretation"] = "MONOCHROME2"
        gray = samples.reshape(samples.shape[:2]).astype(np.float32)
    return DecodedImage(unit_float32(gray / full_scale(precision)), prov)


def _decode_raster(data: bytes, fmt: str) -> DecodedImage:
    from PIL import Image, ImageOps

    if not data:
        raise DecodeError("empty_file", "0 bytes")
    defect = png_defect(data) if fmt == "png" else None
    if defect:  # Pillow reads neither the CRCs of IDAT chunks nor up to IEND: a cut or damaged PNG can pass it
        raise DecodeError("corrupt_pixel_data", f"png: {defect}")
    prov = new_provenance(fmt)
    with captured_warnings(prov):
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
        frame = jpeg_frame(data)
        prov["bits_stored"] = frame.precision if frame else None
    return DecodedImage(unit_float32(gray), prov)


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
        return stretch(samples, float(finite.min()), float(finite.max()))[0] if finite.size else samples * 0
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
