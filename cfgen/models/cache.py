"""Model folders on object storage, copied once to a local cache (torch and diffusers read local folders)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from cfgen.config import StorageConfig


def cache_root() -> Path:
    return Path(os.environ.get("CFGEN_CACHE", Path(tempfile.gettempdir()) / "cfgen-cache"))


def local_copy(uri: str, storage: StorageConfig | None) -> str:
    """A local copy of the folder at `uri` (s3://, gs://), keyed by URI; local paths are returned as they are.

    The copy lands in a temporary folder renamed into place, so a crash mid-download never leaves a half folder
    that a later run would take for the model."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    from cfgen.io.storage import fsspec_filesystem

    fs, path = fsspec_filesystem(uri, storage or StorageConfig())
    root = cache_root()
    target = root / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    marker = target / ".complete"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root))
        fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
        marker.touch()
    return str(target)


def put_folder(local: str, uri: str, storage: StorageConfig | None) -> str:
    """Upload a local folder to `uri` (object storage) or copy it to a local path; returns the URI."""
    if "://" in uri and not uri.startswith("file://"):
        from cfgen.io.storage import fsspec_filesystem

        fs, path = fsspec_filesystem(uri, storage or StorageConfig())
        fs.put(local.rstrip("/") + "/", path.rstrip("/"), recursive=True)
        return uri
    dest = uri.removeprefix("file://")
    if Path(dest).resolve() != Path(local).resolve():
        shutil.copytree(local, dest, dirs_exist_ok=True)
    return dest
