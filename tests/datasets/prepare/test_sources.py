"""Where raw images come from and where prepared data goes: SOURCE/OUT parsing, listings of folders and zips,
and the output store's atomic writes and moves (S3 runs in test_prepare_s3.py against moto)."""

from __future__ import annotations

import os
import zipfile

import pytest

from styleray.datasets.prepare.sources import Location, Store, list_sources, parse_location, read_source


@pytest.mark.parametrize("text, flag, allow_zip, message", [
    ("", "SOURCE", True, "SOURCE is empty"),
    ("data.zip", "OUT", False, "OUT data.zip: a zip cannot be an output"),
    ("s3://", "SOURCE", True, "expected s3://bucket[/prefix]"),
    ("http://example.com/raw", "SOURCE", True, "only local paths and s3:// URIs are supported"),
])
def test_bad_locations_name_the_flag(text, flag, allow_zip, message):
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("]", "\\]")):
        parse_location(text, flag, allow_zip=allow_zip)


def test_locations_parse():
    assert parse_location("s3://bucket/raw/", "SOURCE", allow_zip=True) == Location("s3", "bucket/raw")
    assert parse_location("s3://bucket/raw.zip", "SOURCE", allow_zip=True) == Location("zip", "bucket/raw.zip", s3=True)
    local = parse_location("rel/raw", "SOURCE", allow_zip=True)
    assert local.kind == "local" and local.path == os.path.abspath("rel/raw") and local.uri == local.path


def test_a_folder_lists_images_recursively_and_counts_the_rest(tmp_path):
    root = tmp_path / "raw"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("a.png", "sub/b.JPG", "sub/c.webp", ".hidden/d.png", ".e.png", "notes.txt"):
        (root / name).write_bytes(b"x" * 3)
    out = root / "out"  # OUT inside SOURCE: never read back as input
    out.mkdir()
    (out / "f.png").write_bytes(b"x")
    listing = list_sources(parse_location(str(root), "SOURCE", allow_zip=True),
                           exclude=parse_location(str(out), "OUT", allow_zip=False))
    assert listing.files == [("a.png", 3), ("sub/b.JPG", 3), ("sub/c.webp", 3)]
    assert listing.ignored == 2  # .e.png and notes.txt (hidden folders are not walked)
    assert read_source(Location("local", str(root)), "sub/b.JPG") == b"xxx"


def test_a_zip_lists_and_reads_its_members(tmp_path):
    path = tmp_path / "raw.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("figs/a.png", b"png-bytes")
        zf.writestr("__MACOSX/figs/._a.png", b"resource fork")
        zf.writestr("readme.md", b"text")
    loc = parse_location(str(path), "SOURCE", allow_zip=True)
    listing = list_sources(loc)
    assert listing.files == [("figs/a.png", 9)] and listing.ignored == 2
    assert read_source(loc, "figs/a.png") == b"png-bytes"
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a readable zip"):
        list_sources(parse_location(str(tmp_path / "bad.zip"), "SOURCE", allow_zip=True))
    with pytest.raises(ValueError, match="is not a folder, a .zip or an s3:// URI"):
        list_sources(parse_location(str(tmp_path / "missing"), "SOURCE", allow_zip=True))


def test_the_store_writes_atomically_lists_moves_and_removes(tmp_path):
    store = Store(parse_location(str(tmp_path / "out"), "OUT", allow_zip=False))
    store.ensure()
    store.write("cache/a.png", b"one")
    store.write("cache/a.png", b"two")
    (tmp_path / "out" / "cache" / ".tmp-half").write_bytes(b"a write in progress")
    assert store.read("cache/a.png") == b"two" and store.read("cache/none.png") is None
    assert store.list("cache") == {"a.png"} and store.list("nothing") == set()
    store.move("cache/a.png", "a.png")
    assert store.list() == {"a.png"} and store.read("a.png") == b"two"
    store.remove("a.png")
    store.remove("a.png")  # removing what is gone is fine
    assert store.list() == set()
    with pytest.raises(ValueError, match="a zip cannot be an output"):
        Store(Location("zip", str(tmp_path / "x.zip")))
