"""Every file styleray reads or writes, local or ``s3://``, behind one small interface (fsspec; pyarrow where
Ray wants a pyarrow filesystem).

- One atomic write (``write_bytes``): a local file is written to a hidden temporary sibling (``.tmp-*``) and
  renamed over the target; an S3 object is one PUT, visible whole or not at all. A crash never leaves a half
  file that looks whole.
- One S3 set-up: the endpoint from the usual AWS variables (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``),
  so MinIO, Ceph or moto work like AWS; short connect timeouts and bounded retries, so an unreachable endpoint
  fails in seconds.
- One credential policy: credentials are never passed through configs, job entrypoints or filesystem objects.
  Every process (driver, Ray workers, jobs) reads them from its own environment or the instance role, through
  the AWS SDK's usual chain. Only *where* S3 is (endpoint, region; ``LOCATION_ENV_VARS``) travels to workers and
  jobs, with ``forwarded_env``.

Nothing here imports Ray.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from typing import Any
from urllib.parse import urlparse


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


# Where S3 is: safe to forward to Ray workers and jobs (see forwarded_env). Credentials never are.
LOCATION_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
TMP_PREFIX = ".tmp-"  # a file being written (readers and listings skip it)
CONNECT_TIMEOUT_S = 5.0  # an unreachable endpoint fails in seconds, not after minutes of retries
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint from the usual AWS variables, or None (AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        }
    }
    endpoint = s3_endpoint()
    if endpoint:
        kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    return kwargs


def forwarded_env() -> dict[str, str]:
    """Where this process finds S3 (endpoint, region), for processes that may run elsewhere (Ray workers on
    other nodes, jobs). Never credentials: each process takes those from its own environment or role."""
    return {k: os.environ[k] for k in LOCATION_ENV_VARS if os.environ.get(k)}


def apply_env(env: dict[str, str]) -> None:
    """Adopt forwarded S3 locations, without overriding what this process already has."""
    for k, v in env.items():
        if k in LOCATION_ENV_VARS:
            os.environ.setdefault(k, v)


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path within it) for a local path or s3:// URI, as Ray Train and Ray Data want
    them. The S3 endpoint and credentials are read here, once, so the filesystem object carries them to
    every Ray process it is shipped to."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if uri.startswith("s3://"):
        kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": READ_TIMEOUT_S}
        endpoint = s3_endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
            # A custom endpoint has no region to discover; asking EC2 metadata for one would stall.
            kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        elif os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        # No credentials in the object: it is pickled to Ray processes, which find their own (see above).
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run in another working directory); URIs unchanged."""
    uri = str(uri)
    return uri if is_remote(uri) else os.path.abspath(uri.removeprefix("file://"))


def check_writable(uri: str, flag: str = "--out") -> None:
    """Write and delete a small probe file; ValueError naming ``flag`` if the storage cannot be reached."""
    probe = join(uri, unique_tmp_name(".probe"))
    try:
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure here means the run could not save its work
        hint = ""
        if str(uri).startswith("s3://"):
            endpoint = s3_endpoint()
            hint = (
                f" (endpoint {endpoint or 'AWS default'}; check AWS_ENDPOINT_URL, the credentials, "
                "and that the bucket exists)"
            )
        raise ValueError(f"{flag} {uri} is not writable: {type(e).__name__}: {e}{hint}") from e


def s3_filesystem():
    """The fsspec S3 filesystem: this process's endpoint, the timeouts and retries (cached by fsspec)."""
    import fsspec

    return fsspec.filesystem("s3", **_s3_kwargs())


def filesystem(uri: str):
    """(fsspec filesystem, path within it) for a local path or a remote URI."""
    import fsspec

    uri = str(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
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
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=os.path.dirname(path) or ".")
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
