"""One place that turns a URI plus a `StorageConfig` into a filesystem.

Every reader and writer in cfgen (manifests, DICOM bytes, Parquet outputs, Ray Data `filesystem=` arguments) goes
through here, so credentials, endpoints (MinIO, moto, Ceph) and retries are handled once. Two flavours are offered
because the stack needs both: fsspec (s3fs/gcsfs) for per-object reads in Python, and `pyarrow.fs` for Ray Data and
Parquet, which are faster with Arrow's native S3 client.

Credentials come from `StorageConfig` (pydantic `SecretStr`, masked in every repr) or, when absent, from the usual
environment/boto chain: nothing is passed, so instance roles and `AWS_*` variables keep working. Nothing secret is
ever logged: log lines go through `redact`, and parameters through `safe_storage_dict`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import tempfile
import threading
import time
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from cfgen.config import StorageConfig

logger = logging.getLogger(__name__)

__all__ = [
    "split_uri",
    "is_remote",
    "join_uri",
    "fsspec_filesystem",
    "pyarrow_filesystem",
    "read_bytes",
    "write_bytes",
    "exists",
    "redact",
    "safe_storage_dict",
    "clear_filesystem_cache",
]

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+)://")
# Aliases that name the same store; s3a/s3n come from Hadoop/Spark configs users paste in.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file"}
_LOCAL = "file"


# --------------------------------------------------------------------------------------------------------- URIs
def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` -> ("s3", "bucket/key"); a plain or `file://` path -> ("file", path)."""
    uri = os.fspath(uri)
    match = _SCHEME_RE.match(uri)
    if not match:
        return _LOCAL, uri
    scheme = match.group(1).lower()
    scheme = _SCHEME_ALIASES.get(scheme, scheme)
    return scheme, uri[match.end():]


def is_remote(uri: str) -> bool:
    """True for object stores and any other non-local scheme."""
    return split_uri(uri)[0] != _LOCAL


def has_scheme(uri: str) -> bool:
    return bool(_SCHEME_RE.match(os.fspath(uri)))


def is_absolute_uri(uri: str) -> bool:
    """A URI with a scheme, or an absolute local path: joining it to a root would be wrong."""
    uri = os.fspath(uri)
    return has_scheme(uri) or os.path.isabs(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the scheme.

    A part that is itself a URI with a scheme replaces everything before it (like `os.path.join` with an absolute
    path). On object stores a leading "/" in a part is not special: keys have no root, so it is stripped. Locally,
    `os.path.join` semantics apply.
    """
    base = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        if has_scheme(part):
            base = part
            continue
        if part.startswith("./"):
            part = part[2:]
        if has_scheme(base):
            prefix = _SCHEME_RE.match(base).group(0)
            rest = base[len(prefix):]
            piece = part.lstrip("/")
            base = prefix + (rest.rstrip("/") + "/" + piece if rest else piece)
        else:
            base = os.path.join(base, part)
    return base


def parent_uri(uri: str) -> str:
    """The folder holding `uri`, keeping its scheme."""
    uri = os.fspath(uri).rstrip("/")
    if has_scheme(uri):
        prefix = _SCHEME_RE.match(uri).group(0)
        return prefix + posixpath.dirname(uri[len(prefix):])
    return os.path.dirname(uri) or "."


# --------------------------------------------------------------------------------------------- filesystems
def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _credentials(storage: StorageConfig) -> tuple[str | None, str | None, str | None]:
    return (
        _secret(storage.aws_access_key_id),
        _secret(storage.aws_secret_access_key),
        _secret(storage.aws_session_token),
    )


def _cache_key(kind: str, scheme: str, storage: StorageConfig) -> tuple:
    # Hash, not the secrets themselves: the key may end up in a repr or a debugger.
    digest = hashlib.sha256("\x00".join(c or "" for c in _credentials(storage)).encode()).hexdigest()
    return (kind, scheme, storage.endpoint_url, storage.region, storage.anon, digest)


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_PID = os.getpid()


def _cached(key: tuple, build):
    """Build a filesystem once per process: per-row reads in a Ray task must not create a client per object."""
    global _CACHE_PID
    with _CACHE_LOCK:
        if os.getpid() != _CACHE_PID:  # a forked child must not share the parent's sockets and event loop
            _CACHE.clear()
            _CACHE_PID = os.getpid()
        fs = _CACHE.get(key)
        if fs is None:
            fs = _CACHE[key] = build()
        return fs


def clear_filesystem_cache() -> None:
    """Forget cached filesystems (after credentials rotate, or between tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _build_s3fs(storage: StorageConfig):
    import s3fs

    key, secret, token = _credentials(storage)
    client_kwargs = {k: v for k, v in {"endpoint_url": storage.endpoint_url, "region_name": storage.region}.items()
                     if v}
    kwargs: dict[str, Any] = {"anon": storage.anon, "client_kwargs": client_kwargs}
    if key is not None:
        kwargs["key"] = key
    if secret is not None:
        kwargs["secret"] = secret
    if token is not None:
        kwargs["token"] = token
    # Our own cache decides reuse; the listings cache would make `exists` stale for objects written by other
    # Ray workers after this process first listed a prefix.
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **kwargs)


def _build_gcsfs(storage: StorageConfig):
    try:
        import gcsfs
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "gs:// URIs need the gcsfs package: `pip install gcsfs` (it is not a core cfgen dependency)"
        ) from err
    return gcsfs.GCSFileSystem(token="anon" if storage.anon else None, skip_instance_cache=True)


def fsspec_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `uri`, through fsspec. Local paths come back absolute."""
    storage = storage or StorageConfig()
    scheme, path = split_uri(uri)
    if scheme == _LOCAL:
        return _cached(("fsspec", _LOCAL), lambda: fsspec.filesystem("file")), os.path.abspath(path)
    if scheme == "s3":
        fs = _cached(_cache_key("fsspec", scheme, storage), lambda: _build_s3fs(storage))
        return fs, path
    if scheme == "gs":
        fs = _cached(_cache_key("fsspec", scheme, storage), lambda: _build_gcsfs(storage))
        return fs, path
    # Anything else fsspec knows (memory://, http://, ...) without credentials of ours.
    fs = _cached(("fsspec", scheme), lambda: fsspec.filesystem(scheme))
    return fs, fs._strip_protocol(uri)


def _build_pyarrow_s3(storage: StorageConfig) -> pafs.S3FileSystem:
    key, secret, token = _credentials(storage)
    kwargs: dict[str, Any] = {"anonymous": storage.anon}
    if key is not None or secret is not None:
        if key is None or secret is None:
            raise ValueError("storage: give both aws_access_key_id and aws_secret_access_key, or neither")
        kwargs.update(access_key=key, secret_key=secret)
        if token is not None:
            kwargs["session_token"] = token
    if storage.region:
        kwargs["region"] = storage.region
    if storage.endpoint_url:
        parsed = urlparse(storage.endpoint_url if "://" in storage.endpoint_url else f"http://{storage.endpoint_url}")
        if not parsed.hostname:
            raise ValueError(f"storage.endpoint_url {redact(storage.endpoint_url)!r} has no host")
        host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
        kwargs.update(endpoint_override=host, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


def pyarrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for `uri`: what Ray Data readers and writers take as `filesystem=`."""
    storage = storage or StorageConfig()
    scheme, path = split_uri(uri)
    if scheme == _LOCAL:
        return _cached(("pyarrow", _LOCAL), pafs.LocalFileSystem), os.path.abspath(path)
    if scheme == "s3":
        return _cached(_cache_key("pyarrow", scheme, storage), lambda: _build_pyarrow_s3(storage)), path
    if scheme == "gs":
        fs = _cached(_cache_key("pyarrow", scheme, storage), lambda: pafs.GcsFileSystem(anonymous=storage.anon))
        return fs, path
    fs, fs_path = fsspec_filesystem(uri, storage)
    return _cached(("pyarrow", scheme), lambda: pafs.PyFileSystem(pafs.FSSpecHandler(fs))), fs_path


# ------------------------------------------------------------------------------------------------- objects
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError]
    try:  # botocore's network errors are not OSErrors but are as transient as a reset socket
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [BotoConnectionError, HTTPClientError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT = _transient_types()


def is_transient(err: BaseException) -> bool:
    """Connection resets, timeouts, 5xx and throttling: worth another try. A missing or forbidden object is not."""
    return isinstance(err, _TRANSIENT) and not isinstance(err, _PERMANENT)


def read_bytes(
    uri: str,
    storage: StorageConfig | None = None,
    retries: int | None = None,
    backoff_s: float = 0.2,
    max_backoff_s: float = 10.0,
) -> bytes:
    """The whole object at `uri`, retried with exponential backoff on transient errors only.

    `retries` (default `storage.retries`) counts extra attempts after the first. A missing object raises
    FileNotFoundError at once: retrying it would only slow down a data set with a few bad paths.
    """
    storage = storage or StorageConfig()
    retries = storage.retries if retries is None else retries
    fs, path = fsspec_filesystem(uri, storage)
    # s3fs asks for the object's size (a HEAD) before every whole-object GET unless reads are serial; CXRs are
    # below its block size, so the HEAD only doubles the requests (measured in bench/RESULTS.md).
    options = {"max_concurrency": 1} if type(fs).__name__ == "S3FileSystem" else {}
    attempt = 0
    while True:
        try:
            return fs.cat_file(path, **options)
        except BaseException as err:
            if not is_transient(err) or attempt >= retries:
                raise
            delay = min(max_backoff_s, backoff_s * 2**attempt)
            attempt += 1
            logger.warning(
                "transient error reading %s (attempt %d of %d, retrying in %.2fs): %s",
                redact(uri), attempt, retries + 1, delay, redact(repr(err)),
            )
            time.sleep(delay)


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `uri`. Locally via a temp file and rename, so readers never see half an image.

    An object-store PUT is already all-or-nothing.
    """
    storage = storage or StorageConfig()
    fs, path = fsspec_filesystem(uri, storage)
    if not is_remote(uri):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path)[-32:])
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs.pipe_file(path, data)


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = fsspec_filesystem(uri, storage)
    return fs.exists(path)


# ----------------------------------------------------------------------------------------------- redaction
_MASK = "***"
_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@]+@")
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b")
# name=value / "name": "value" / X-Amz-Signature=... for anything named like a credential.
_NAMED_SECRET = re.compile(
    r"(?i)(\b[\w\-]*?(?:secret(?:[_\-]?(?:access[_\-]?)?key)?|passw(?:or)?d|token|access[_\-]?key(?:[_\-]?id)?"
    r"|credentials?|signature|api[_\-]?key)[\"']?\s*[:=]\s*[\"']?)(?!SecretStr\(|\*)([^\s\"'&,;})]+)"
)
# A 40-character base64 run with both cases is the shape of an AWS secret key (a hex digest has one case only).
_SECRET_KEY_SHAPE = re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])[A-Za-z0-9/+]{40}"
                               r"(?![A-Za-z0-9/+=])")
# Session tokens are long base64 blobs.
_LONG_BLOB = re.compile(r"[A-Za-z0-9/+]{100,}={0,2}")


def redact(text: str) -> str:
    """Mask what looks like AWS key ids, secret keys, session tokens, named secrets and `user:pass@` in URLs."""
    text = str(text)
    text = _URL_USERINFO.sub(lambda m: m.group(1) + _MASK + "@", text)
    text = _NAMED_SECRET.sub(lambda m: m.group(1) + _MASK, text)
    text = _ACCESS_KEY_ID.sub(_MASK, text)
    text = _LONG_BLOB.sub(_MASK, text)
    text = _SECRET_KEY_SHAPE.sub(_MASK, text)
    return text


def safe_storage_dict(storage: StorageConfig) -> dict[str, Any]:
    """The storage settings as plain values for logs and MLflow params, with every secret masked."""
    out: dict[str, Any] = {}
    for name in type(storage).model_fields:
        value = getattr(storage, name)
        if hasattr(value, "get_secret_value"):
            out[name] = _MASK if value.get_secret_value() else None
        elif isinstance(value, str):
            out[name] = redact(value)
        else:
            out[name] = value
    return out
