"""The HTTP API (FastAPI), versioned under /v1, and the web page at /.

    GET  /v1/health                liveness: the ingress answers
    GET  /v1/ready                 readiness: the editing deployment has its model loaded (503 until then)
    GET  /v1/model                 what the model knows: attributes and values, methods, defaults, limits, version
    POST /v1/counterfactual        an X-ray + an edit spec -> the counterfactual (JSON, PNG or derived DICOM)

The counterfactual endpoint takes multipart/form-data (`file`, `spec` JSON, optional `mask`) or a raw body
(image/png, image/jpeg, application/dicom) with the spec as the `spec` query parameter; `format` chooses the
answer: `json` (prompts, method, UNet evaluations, model version, metrics, base64 PNGs of factual,
counterfactual and difference), `png` (the counterfactual; the JSON facts in X-Cfgen-* headers) or `dicom` (a
de-identified derived Secondary Capture, `cfgen.io.derived`, the batch job's builder).

Bodies are read into memory up to the limit and never written to disk (Starlette would spool multipart files over
1 MB to a temporary file: its spool limit is raised to the upload limit) nor logged. `editor` is any async callable
taking an `EditItem` and returning an `EditOutcome` (the Serve deployment's handle, or an `Editor` in a thread).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cfgen.config import JobConfig
from cfgen.serve.editor import EditItem, EditOutcome
from cfgen.serve.inputs import RequestError, check_spec, digest, parse_spec, read_image, read_mask

API_VERSION = "v1"

_MULTIPART_SCHEMA = {
    "type": "object", "required": ["file", "spec"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "DICOM, PNG or JPEG"},
                   "spec": {"type": "string", "description": "JSON edit spec, e.g. {\"set\": {\"smoking\": 1}}"},
                   "mask": {"type": "string", "format": "binary", "description": "optional: edit only here"}},
}
_REQUEST_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
}}
_ERRORS = {str(code): {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}
    for code, text in [(400, "malformed request"), (401, "missing or wrong bearer token"),
                       (413, "upload or image too large"), (415, "not an image type this server reads"),
                       (422, "valid JSON, impossible request (unknown attribute, limits, undecodable image)"),
                       (503, "the model is not ready")]}


def _png_b64(image: np.ndarray) -> str:
    from cfgen.pipeline.generate import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


def _difference_png(factual: np.ndarray, counterfactual: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + 2.0 * (counterfactual - factual), 0, 1)  # 0.5 grey = no change, x2 to see small changes


def _token(job: JobConfig) -> str | None:
    if job.serve.auth_token is not None:
        return job.serve.auth_token.get_secret_value()
    return os.environ.get("CFGEN_SERVE_TOKEN") or None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (whatever Content-Length claims)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request is {int(declared) / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request passes the limit of {limit / 2**20:g} MB")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's form parser reads a cached body instead of the spent stream
    return body


def create_app(job: JobConfig, editor: Callable[[EditItem], Awaitable[EditOutcome]],
               info: Callable[[], Awaitable[dict[str, Any]]], ready: Callable[[], Awaitable[bool]]) -> FastAPI:
    from starlette.formparsers import MultiPartParser

    from cfgen.serve.page import page_html

    limit = int(job.serve.max_upload_mb * 2**20) + 64 * 1024  # the multipart envelope on top of the file
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, limit)  # uploads stay in memory
    token = _token(job)
    app = FastAPI(title="cfgen", version=API_VERSION,
                  description="Counterfactual chest X-rays from a language-guided diffusion model.")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if token and path.startswith(f"/{API_VERSION}/") and path != f"/{API_VERSION}/health":
            given = request.headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
                return JSONResponse({"error": "a valid bearer token is required (Authorization: Bearer …)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def _page():
        return HTMLResponse(page_html(auth=bool(token)))

    @app.get(f"/{API_VERSION}/health", summary="liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"/{API_VERSION}/ready", summary="readiness: the model is loaded", responses=_ERRORS)
    async def readiness():
        if not await ready():
            return JSONResponse({"status": "loading", "error": "the model is not ready"}, status_code=503)
        return {"status": "ready"}

    @app.get(f"/{API_VERSION}/model", summary="what the model knows, methods and limits", responses=_ERRORS)
    async def model_info() -> dict[str, Any]:
        return await info()

    @app.post(f"/{API_VERSION}/counterfactual", summary="edit one X-ray", responses=_ERRORS,
              openapi_extra={"requestBody": _REQUEST_BODY})
    async def counterfactual(request: Request,
                             format: str = Query("json", pattern="^(json|png|dicom)$",  # noqa: A002
                                                 description="json, png or dicom"),
                             spec: str | None = Query(None, max_length=4096,
                                                      description="edit spec JSON, for a raw-body upload")):
        body = await _read_body(request, limit)
        content_type = request.headers.get("content-type", "")
        mask_bytes = None
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=2, max_fields=4)
            except Exception as err:  # noqa: BLE001 - a broken multipart envelope
                raise RequestError(400, f"the multipart body could not be parsed: {type(err).__name__}") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, "the multipart body needs a file field named 'file'")
            data = await upload.read()
            file_type = upload.content_type
            spec_text = form.get("spec") if isinstance(form.get("spec"), str) else spec
            mask = form.get("mask")
            mask_bytes = await mask.read() if mask is not None and not isinstance(mask, str) else None
        else:
            data, file_type, spec_text = body, content_type, spec
        parsed = parse_spec(spec_text)
        method, steps, guidance = check_spec(parsed, job)
        image, kind, header = read_image(data, file_type, job)
        factual = {**header, **parsed.factual}
        item = EditItem(image=image, factual=factual, edit=parsed.set, method=method, steps=steps, guidance=guidance,
                        seed=parsed.seed, mask=read_mask(mask_bytes, job), digest=digest(data))
        outcome = await editor(item)
        facts = {
            "factual_prompt": outcome.factual_prompt, "counterfactual_prompt": outcome.counterfactual_prompt,
            "edit": parsed.set, "edit_applied": outcome.edit_applied, "edit_error": outcome.edit_error,
            "method": method, "edit_setting": outcome.setting, "steps": steps, "guidance": guidance,
            "seed": parsed.seed,
            "unet_evaluations": outcome.unet_evaluations, "input": kind, "confined": item.mask is not None,
            "model": {k: v for k, v in (await info()).items() if k in ("model_uri", "model_version")},
            "metrics": outcome.metrics,
        }
        if format == "png":
            from cfgen.pipeline.generate import png_bytes

            headers = {"X-Cfgen-Facts": base64.b64encode(json.dumps(facts).encode()).decode()}
            return Response(png_bytes(outcome.counterfactual), media_type="image/png", headers=headers)
        if format == "dicom":
            from cfgen.io.derived import derived_dicom

            model = facts["model"]
            dicom = derived_dicom(
                outcome.counterfactual, source=data if kind == "dicom" else None,
                key=f"{item.digest}|{json.dumps(parsed.set, sort_keys=True)}|{method}|{parsed.seed}",
                image_id=item.digest, description=f"cfgen {json.dumps(parsed.set)} {method}",
                derivation=f"Counterfactual by cfgen: do({json.dumps(outcome.edit_applied)}), method {method}, "
                           f"{steps} steps, guidance {guidance}, seed {parsed.seed}, model "
                           f"{model.get('model_uri')} version {model.get('model_version')}")
            return Response(dicom, media_type="application/dicom",
                            headers={"Content-Disposition": "attachment; filename=counterfactual.dcm"})
        facts["images"] = {
            "factual": _png_b64(outcome.factual_image), "counterfactual": _png_b64(outcome.counterfactual),
            "difference": _png_b64(_difference_png(outcome.factual_image, outcome.counterfactual)),
        }
        return facts

    return app


def png_of(data: str) -> np.ndarray:
    """A base64 PNG of the JSON answer back to pixels (for clients and tests)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
