"""From a decoded image to the fixed-size integer array every cfgen stage consumes.

`decode_and_preprocess` is the one call per image of training, generation and serving, so all of them see the same
pixels for the same file. The steps are small functions that can be used and tested on their own:

    decode_image -> to_fixed_size (aspect-preserving resize, then pad or centre-crop to a square) -> quantize

Resampling: reducing (the usual case, 2000-3000 pixel radiographs to 64-512) averages the source pixels each output
pixel covers (PIL's BOX filter on float32, i.e. area interpolation). It cannot overshoot, so no halos appear around
wires and pacemakers, and it preserves region means, on which the discovery statistics (mean lung intensity) rest.
Enlarging (small images) uses Lanczos, clipped to [0, 1] against its ringing.

Geometry (in the provenance) maps a source pixel coordinate to the output, in both modes, as

    output = (source - (crop top, crop left)) * scale + (pad top, pad left)

to within half an output pixel (the padded side is rounded to whole pixels).

"pad" fits the whole image inside the square and fills the rest with 0, the black background of a radiograph;
"crop" fills the square and cuts the centre out of the long side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cfgen.io.decode import DecodedImage, decode_image

if TYPE_CHECKING:
    from cfgen.config import DecodeConfig

ResizeMode = Literal["pad", "crop"]


def resize_geometry(shape: tuple[int, ...], size: int, mode: ResizeMode = "pad") -> dict[str, Any]:
    """Where a (rows, columns) image lands in a size x size square: scale, padding, source crop box, filter."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"resize mode {mode!r} is neither 'pad' nor 'crop'")
    if size < 1:
        raise ValueError(f"output size {size} must be at least 1")
    rows, columns = int(shape[0]), int(shape[1])
    if rows < 1 or columns < 1:
        raise ValueError(f"cannot resize an empty image of shape {tuple(shape)}")
    if mode == "pad":
        scale = size / max(rows, columns)
        resized = (min(size, max(1, round(rows * scale))), min(size, max(1, round(columns * scale))))
        top, left = (size - resized[0]) // 2, (size - resized[1]) // 2
        pad = (top, size - resized[0] - top, left, size - resized[1] - left)
        crop = (0.0, 0.0, float(rows), float(columns))
    else:
        scale = size / min(rows, columns)
        side = min(rows, columns)  # the square of the source that fills the output
        # Centred to a whole source pixel: a half-pixel offset would blur even an image that needs no scaling.
        top, left = float((rows - side) // 2), float((columns - side) // 2)
        resized = (size, size)
        pad = (0, 0, 0, 0)
        crop = (top, left, top + side, left + side)
    return {
        "resize_mode": mode,
        "output_size": size,
        "scale": scale,  # output pixels per source pixel, the same along rows and columns
        "resized_shape": resized,  # the image content inside the square, before padding
        "pad": pad,  # (top, bottom, left, right) output pixels of 0
        "crop": crop,  # (top, left, bottom, right) box of the source that was kept, in source pixels
        "resample": "box" if scale < 1 else "lanczos",
    }


def to_fixed_size(pixels: np.ndarray, size: int, mode: ResizeMode = "pad") -> np.ndarray:
    """Resize a 2-D float image in [0, 1] to size x size, keeping its aspect ratio; float32 in [0, 1]."""
    return _resample(pixels, resize_geometry(np.shape(pixels), size, mode))


def quantize(pixels: np.ndarray, dtype: Literal["uint8", "uint16"] = "uint8") -> np.ndarray:
    """[0, 1] floats to the full range of uint8 or uint16, rounded to nearest; out-of-range values are clipped."""
    if dtype not in ("uint8", "uint16"):
        raise ValueError(f"dtype {dtype!r} is neither 'uint8' nor 'uint16'")
    full = np.iinfo(dtype).max
    unit = np.clip(np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return np.rint(unit * full).astype(dtype)


def preprocess(decoded: DecodedImage, cfg: DecodeConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """A decoded image to a (size, size) uint8/uint16 array and its provenance, extended by the geometry."""
    geometry = resize_geometry(decoded.pixels.shape, cfg.size, cfg.resize_mode)
    pixels = quantize(_resample(decoded.pixels, geometry), cfg.dtype)
    return pixels, {**decoded.provenance, **geometry, "dtype": cfg.dtype}


def decode_and_preprocess(
    data: bytes, cfg: DecodeConfig, uri: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Bytes of a DICOM, PNG or JPEG file to the fixed-size array of `cfg` and its provenance.

    Raises `cfgen.io.decode.DecodeError` (with a `reason`) for files that are not usable images.
    """
    return preprocess(decode_image(data, uri, apply_voi=cfg.apply_voi), cfg)


def _resample(pixels: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    size = geometry["output_size"]
    rows, columns = geometry["resized_shape"]
    top, left, bottom, right = geometry["crop"]
    if (rows, columns) == pixels.shape and (top, left) == (0, 0) and (bottom, right) == pixels.shape:
        content = pixels  # already the right size: no resampling, no blur
    else:
        resample = Image.Resampling.BOX if geometry["resample"] == "box" else Image.Resampling.LANCZOS
        image = Image.fromarray(np.ascontiguousarray(pixels))  # float32 -> mode "F"
        content = np.asarray(image.resize((columns, rows), resample, box=(left, top, right, bottom)))
    out = np.zeros((size, size), dtype=np.float32)
    pad_top, _, pad_left, _ = geometry["pad"]
    out[pad_top : pad_top + rows, pad_left : pad_left + columns] = np.clip(content, 0.0, 1.0)
    return out


def read_mask(uri: str | None, decode: DecodeConfig, storage=None, dilation: int = 0) -> np.ndarray | None:
    """A segmentation mask (e.g. the lungs) at `uri`, decoded and resized like the images, as booleans grown by
    `dilation` pixels; None where there is no mask or it cannot be read (the caller decides what that means)."""
    if not uri:
        return None
    from cfgen.io.storage import read_bytes

    try:
        pixels, _ = decode_and_preprocess(read_bytes(uri, storage), decode, uri=uri)
    except Exception:  # noqa: BLE001 - an unreadable mask is no mask, for the caller to record
        return None
    region = np.asarray(pixels, dtype=np.float64) / np.iinfo(pixels.dtype).max > 0.5
    if dilation and region.any():
        from scipy.ndimage import binary_dilation

        region = binary_dilation(region, iterations=dilation)
    return region
