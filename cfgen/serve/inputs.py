"""Uploads to validated edit items, with the limits a public endpoint needs; every refusal is a `RequestError`
with the HTTP status and a message that says what to change.

Nothing here writes an upload to disk or logs its bytes or its metadata: the image is decoded from memory by the
data plane's own decoder (`cfgen.io.preprocess.decode_and_preprocess`, the same that ingest uses) after its
declared size has been checked against `serve.max_pixels` from the header alone (a PNG that declares 100,000 x
100,000 pixels is refused before a byte of it is inflated).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cfgen.config import JobConfig, _normalize_edits

#: Content types accepted for an image, by the family they announce.
IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "application/dicom": "dicom",
               "application/octet-stream": None}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class EditSpec(BaseModel):
    """What to do with the uploaded image (JSON: the multipart field `spec`, or the `spec` query parameter of a raw
    upload)."""

    model_config = ConfigDict(extra="forbid")

    set: dict[str, Any] = Field(description="attributes to set, e.g. {\"smoking\": 1} or {\"age\": {\"shift\": 10}}",
                                min_length=1)
    factual: dict[str, Any] = Field({}, description="the patient's known metadata (sex, age, findings, smoking); "
                                                    "missing ones are left out of the prompt, as in training; a "
                                                    "DICOM's own PatientSex and PatientAge fill sex and age")
    method: Literal["ddim", "sdedit", "p2p", "null_text", "direct", "ddpm"] | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=1.0)

    _set = field_validator("set")(lambda cls, v: _normalize_edits([v])[0])


def parse_spec(text: str | bytes | None) -> EditSpec:
    if text is None or (isinstance(text, (str, bytes)) and not text.strip()):
        raise RequestError(422, "an edit spec is required: JSON like {\"set\": {\"smoking\": 1}}")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the edit spec is not valid JSON: {err}") from None
    try:
        return EditSpec.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in err.errors())
        raise RequestError(422, f"invalid edit spec: {problems}") from None
    except ValueError as err:
        raise RequestError(422, f"invalid edit spec: {err}") from None


def check_spec(spec: EditSpec, job: JobConfig) -> tuple[str, int, float]:
    """(method, steps, guidance) after the limits and the model's attributes; RequestError otherwise."""
    from cfgen.pipeline.plan import check_edit

    s = job.serve
    if len(spec.set) > s.max_edits:
        raise RequestError(422, f"at most {s.max_edits} attributes can be set in one request, got {len(spec.set)}")
    try:
        check_edit(spec.set, job.data.prompt)
    except ValueError as err:
        raise RequestError(422, str(err)) from None
    unknown = sorted(set(spec.factual) - set(job.data.prompt.attributes))
    if unknown:
        raise RequestError(422, f"factual metadata {unknown} are not attributes of this model: "
                                f"{list(job.data.prompt.attributes)}")
    steps = spec.steps or job.edit.num_inference_steps
    if steps > s.max_steps:
        raise RequestError(422, f"steps {steps} exceeds this server's limit of {s.max_steps}")
    guidance = spec.guidance or job.edit.guidance_scale
    if guidance > s.max_guidance:
        raise RequestError(422, f"guidance {guidance} exceeds this server's limit of {s.max_guidance}")
    method = spec.method or job.edit.method
    if method != "ddpm" and (job.edit.edit_guidance != 1.0 or job.edit.edit_threshold != 0.0 or job.edit.hold):
        raise RequestError(422, f"this server edits directed ddpm (or holds {job.edit.hold}); method {method!r} is "
                                "not available with it")
    return method, steps, guidance


def _dicom_header(data: bytes):
    import pydicom

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is the client's malformed file
        raise RequestError(422, f"the DICOM could not be read: {type(err).__name__}") from None


def declared_pixels(data: bytes, kind: str, header=None) -> int:
    """Rows x columns (x frames) the file says it holds, from its header only (`header`: a DICOM's, if read)."""
    if kind == "dicom":
        ds = header if header is not None else _dicom_header(data)
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        if not rows or not cols:
            raise RequestError(422, "the DICOM has no image (Rows/Columns missing): is it an image object?")
        return rows * cols * max(1, frames)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
            w, h = im.size
    except Exception as err:  # noqa: BLE001
        raise RequestError(422, f"the {kind.upper()} could not be read: {type(err).__name__}") from None
    return int(w) * int(h)


def dicom_metadata(ds) -> dict[str, Any]:
    """Sex and age from a DICOM header (PatientSex M/F, PatientAge like 063Y), to complete the factual prompt."""
    out: dict[str, Any] = {}
    sex = str(ds.get("PatientSex") or "").strip().upper()
    if sex in ("F", "M"):
        out["sex"] = sex
    age = str(ds.get("PatientAge") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in "YMWD":
        years = int(age[:3]) / {"Y": 1, "M": 12, "W": 52, "D": 365}[age[3]]
        out["age"] = round(years, 1)
    return out


def read_image(data: bytes, content_type: str | None, job: JobConfig) -> tuple[np.ndarray, str, dict[str, Any]]:
    """(uint8 [S,S] at the model's size, its kind, header metadata) of an uploaded file."""
    from cfgen.io.decode import DecodeError, sniff_format
    from cfgen.io.preprocess import decode_and_preprocess
    from cfgen.metrics.image import as_unit_float

    s = job.serve
    if not data:
        raise RequestError(422, "the upload is empty")
    if len(data) > s.max_upload_mb * 2**20:
        raise RequestError(413, f"the upload is {len(data) / 2**20:.1f} MB; the limit is {s.max_upload_mb:g} MB")
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared and declared not in IMAGE_TYPES:
        raise RequestError(415, f"content type {declared!r} is not an image this server reads: send "
                                "image/png, image/jpeg or application/dicom")
    kind = sniff_format(data)
    if kind is None:
        raise RequestError(415 if declared in ("", "application/octet-stream") else 422,
                           "the bytes are not a PNG, a JPEG or a DICOM (Part 10, with the DICM preamble)")
    if IMAGE_TYPES.get(declared) not in (None, kind):
        raise RequestError(415, f"the content type says {declared} but the bytes are a {kind.upper()}")
    header = _dicom_header(data) if kind == "dicom" else None  # parsed once: size check and metadata
    pixels = declared_pixels(data, kind, header)
    if pixels > s.max_pixels:
        raise RequestError(413, f"the image declares {pixels:,} pixels; the limit is {s.max_pixels:,}")
    decode = job.data.decode.model_copy(update={"dtype": "uint8"})
    try:
        image, _ = decode_and_preprocess(data, decode)
    except DecodeError as err:
        raise RequestError(422, f"the image could not be decoded: {err.reason}: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - a decoder crash on hostile bytes is still the client's file
        raise RequestError(422, f"the image could not be decoded: {type(err).__name__}") from None
    image = np.clip(np.rint(as_unit_float(image) * 255), 0, 255).astype(np.uint8)
    meta = dicom_metadata(header) if header is not None else {}
    return image, kind, meta


def read_mask(data: bytes | None, job: JobConfig) -> np.ndarray | None:
    """An optional mask upload (PNG/JPEG/DICOM, bright = editable) at the model's size, as 0/1 float."""
    if not data:
        return None
    image, _, _ = read_image(data, None, job)
    mask = (image > 127).astype(np.float32)
    if not mask.any():
        raise RequestError(422, "the mask is empty: nothing would be edited")
    return mask


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
