"""Local paths and s3:// URIs behind one small interface (fsspec), with atomic writes.

S3-compatible endpoints come from the usual AWS variables (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3``),
so a MinIO or moto server works like AWS itself. Nothing here imports Ray.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from typing import Any


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _s3_kwargs() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for a local path or a remote URI."""
    import fsspec

    uri = str(uri)
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **_s3_kwargs())
        return fs, uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under uri; [] if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically: a temporary sibling renamed over the target (one PUT on object stores)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open(path, "wb") as f:  # an object PUT is atomic: readers see the old or the new object
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_text(uri: str, text: str) -> None:
    """Append to a text file (local: O_APPEND; remote: read-modify-write, fine for small logs)."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        old = fs.cat_file(path) if fs.exists(path) else b""
        with fs.open(path, "wb") as f:
            f.write(old + text.encode())
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def rename_dir(src: str, dst: str) -> None:
    """Local directories: atomic rename. Remote: copy then delete (callers use a commit marker instead)."""
    if is_remote(src):
        fs, s = filesystem(src)
        _, d = filesystem(dst)
        fs.copy(s, d, recursive=True)
        fs.rm(s, recursive=True)
    else:
        os.replace(filesystem(src)[1], filesystem(dst)[1])


def unique_tmp_name(prefix: str = ".tmp") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
