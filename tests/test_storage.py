"""The storage layer: one atomic write, one S3 set-up, one credential policy (no credentials travel)."""

from __future__ import annotations

import os
import pickle

import pytest

from styleray import storage


def test_a_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.bin"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path / "sub") == ["f.bin"]

    def crash(fd):  # the process dies between writing the bytes and renaming them into place
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"partial")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path / "sub") == ["f.bin"]  # old content, no debris


def test_only_where_s3_is_travels_never_credentials(monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1",
                 "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                 "AWS_SESSION_TOKEN": "t0ken-value"}.items():
        monkeypatch.setenv(k, v)
    assert storage.forwarded_env() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1"}
    fs, path = storage.pyarrow_filesystem("s3://bucket/run")
    assert path == "bucket/run"
    shipped = pickle.dumps(fs)  # what Ray sends to its workers
    assert b"s3cr3t-value" not in shipped and b"t0ken-value" not in shipped and b"AKIDEXAMPLE" not in shipped
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    storage.apply_env({"AWS_DEFAULT_REGION": "us-east-2", "AWS_SECRET_ACCESS_KEY": "from-a-config"})
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-2" and os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"


def test_s3_fails_fast_with_bounded_retries(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs = storage.s3_filesystem()
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:9"}
    assert fs.config_kwargs["connect_timeout"] == storage.CONNECT_TIMEOUT_S <= 10
    assert fs.config_kwargs["retries"]["max_attempts"] == storage.MAX_ATTEMPTS
    with pytest.raises(ValueError, match="--out s3://nowhere/run is not writable: .*endpoint http://127.0.0.1:9"):
        storage.check_writable("s3://nowhere/run", "--out")
