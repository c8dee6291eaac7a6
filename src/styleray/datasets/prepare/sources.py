"""Where images come from and where prepared data goes: a local folder, a zip, or ``s3://bucket/prefix``.

S3 and every write go through ``styleray.storage`` (its endpoint, timeouts and credential policy, and its
atomic write: a crash never leaves a half image). A zip may be local or on S3 (``s3://bucket/raw.zip``).
"""

from __future__ import annotations

import os
import posixpath
import zipfile
from dataclasses import dataclass
from functools import lru_cache

from styleray import storage
from styleray.storage import s3_endpoint, s3_filesystem

RAW_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what prepare reads


@dataclass(frozen=True)
class Location:
    """A parsed SOURCE or OUT."""

    kind: str  # "local", "s3" or "zip"
    path: str  # local: absolute path; s3: "bucket/prefix" (no scheme, no trailing /); zip: the archive's path
    s3: bool = False  # zip only: the archive lies on S3

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.kind == "s3" or self.s3 else self.path


def parse_location(text: str, flag: str, *, allow_zip: bool) -> Location:
    """Parses `text` (the value of `flag`) into a Location; raises ValueError naming the flag."""
    if not text or not str(text).strip():
        raise ValueError(f"{flag} is empty: give a folder, a .zip or s3://bucket/prefix")
    text = str(text).strip()
    is_zip = text.lower().endswith(".zip")
    if is_zip and not allow_zip:
        raise ValueError(f"{flag} {text}: a zip cannot be an output; give a folder or s3://bucket/prefix "
                         "(zip the folder afterwards if you need one)")
    if text.startswith("s3://"):
        path = text[len("s3://"):].strip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"{flag} {text}: expected s3://bucket[/prefix]")
        return Location("zip", path, s3=True) if is_zip else Location("s3", path)
    if "://" in text:
        raise ValueError(f"{flag} {text}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(os.path.expanduser(text))
    return Location("zip", path) if is_zip else Location("local", path)


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(RAW_IMAGE_EXTENSIONS)


@dataclass
class Listing:
    files: list[tuple[str, int]]  # (relative key, size in bytes), sorted by key
    ignored: int  # files skipped: not an image extension, or hidden


def list_sources(loc: Location, *, exclude: Location | None = None) -> Listing:
    """Every image file under `loc` (recursive), relative keys with "/" separators; hidden entries skipped.

    `exclude` (the OUT location) is left out when it lies inside `loc`, so that a re-run does not read its own
    output as input.
    """
    if loc.kind == "local":
        if not os.path.isdir(loc.path):
            raise ValueError(f"SOURCE {loc.path} is not a folder, a .zip or an s3:// URI")
        raw = []
        skip = exclude.path if exclude is not None and exclude.kind == "local" else None
        for dirpath, dirnames, filenames in os.walk(loc.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and os.path.join(dirpath, d) != skip)
            for name in filenames:
                full = os.path.join(dirpath, name)
                raw.append((os.path.relpath(full, loc.path).replace(os.sep, "/"), os.path.getsize(full)))
    elif loc.kind == "s3":
        fs = s3_filesystem()
        try:
            found = fs.find(loc.path, detail=True)
        except FileNotFoundError:
            found = {}
        if not found:
            raise ValueError(f"SOURCE s3://{loc.path} holds no objects (check the bucket, prefix and endpoint "
                             f"{s3_endpoint() or 'AWS default'})")
        skip = exclude.path + "/" if exclude is not None and exclude.kind == "s3" else None
        raw = [(key[len(loc.path) + 1:], int(info.get("size") or 0)) for key, info in found.items()
               if info.get("type", "file") == "file" and key.startswith(loc.path + "/")
               and not (skip and key.startswith(skip))]
    else:
        with _open_zip(loc.path, loc.s3) as zf:
            raw = [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]
    files, ignored = [], 0
    for rel, size in raw:
        if _hidden(rel) or not is_image_name(rel) or rel.startswith("__MACOSX/"):
            ignored += 1
        else:
            files.append((rel, size))
    files.sort()
    return Listing(files, ignored)


def _open_zip(path: str, on_s3: bool) -> zipfile.ZipFile:
    if on_s3:
        return zipfile.ZipFile(s3_filesystem().open(path, "rb"))
    if not os.path.isfile(path):
        raise ValueError(f"SOURCE {path} does not exist")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"SOURCE {path} is not a readable zip: {e}") from None


@lru_cache(maxsize=4)
def _cached_zip(path: str, on_s3: bool) -> zipfile.ZipFile:
    return _open_zip(path, on_s3)  # one open archive per worker process


def read_source(loc: Location, rel: str) -> bytes:
    """The bytes of one source file (raises OSError/KeyError when it vanished)."""
    if loc.kind == "local":
        with open(os.path.join(loc.path, rel), "rb") as f:
            return f.read()
    if loc.kind == "s3":
        return s3_filesystem().cat_file(f"{loc.path}/{rel}")
    return _cached_zip(loc.path, loc.s3).read(rel)


class Store:
    """The OUT location: atomic writes, reads, listings and moves of files under one root."""

    def __init__(self, loc: Location):
        if loc.kind == "zip":
            raise ValueError("a zip cannot be an output")
        self.loc = loc

    def _full(self, rel: str) -> str:
        return os.path.join(self.loc.path, *rel.split("/")) if self.loc.kind == "local" else f"{self.loc.path}/{rel}"

    def uri(self, rel: str = "") -> str:
        if self.loc.kind == "local":
            return self._full(rel) if rel else self.loc.path
        return f"s3://{self.loc.path}/{rel}" if rel else f"s3://{self.loc.path}"

    def write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(self.uri(rel), data)

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            if self.loc.kind == "s3":
                return s3_filesystem().cat_file(self._full(rel))
            with open(self._full(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def list(self, rel_dir: str = "") -> set[str]:
        """Names of the files directly in `rel_dir` (not recursive); empty when it does not exist."""
        if self.loc.kind == "local":
            full = self._full(rel_dir) if rel_dir else self.loc.path
            try:
                return {e.name for e in os.scandir(full) if e.is_file() and not e.name.startswith(storage.TMP_PREFIX)}
            except FileNotFoundError:
                return set()
        fs = s3_filesystem()
        full = self._full(rel_dir) if rel_dir else self.loc.path
        try:
            entries = fs.ls(full, detail=True, refresh=True)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(e["name"]) for e in entries if e.get("type") == "file"}

    def move(self, src: str, dst: str) -> None:
        if self.loc.kind == "s3":
            fs = s3_filesystem()
            fs.copy(self._full(src), self._full(dst))
            fs.rm(self._full(src))
            return
        full = self._full(dst)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.replace(self._full(src), full)

    def remove(self, rel: str) -> None:
        try:
            if self.loc.kind == "s3":
                s3_filesystem().rm(self._full(rel))
            else:
                os.unlink(self._full(rel))
        except FileNotFoundError:
            pass

    def ensure(self) -> None:
        if self.loc.kind == "local":
            os.makedirs(self.loc.path, exist_ok=True)
        else:
            bucket = self.loc.path.split("/", 1)[0]
            fs = s3_filesystem()
            if not fs.exists(bucket):
                raise ValueError(f"OUT s3://{self.loc.path}: bucket {bucket!r} does not exist "
                                 f"(endpoint {s3_endpoint() or 'AWS default'})")
