"""What reload may read (SourcePolicy) and how a checkpoint becomes servable (load_model): allowed roots and
schemes, symbolic links and '..', size caps checked before reading, unbuildable and NaN generators refused,
no server paths in messages. Real checkpoint folders on disk; no Ray."""

from __future__ import annotations

import os

import pytest
from serve_helpers import make_broken_checkpoint, make_checkpoint

from styleray.serve.args import ServeArgs
from styleray.serve.loading import LoadError, load_model
from styleray.serve.schemas import InvalidRequest
from styleray.serve.sources import run_folder

GIB = 2**30


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/r1 (served; checkpoints 1000 and 2000), runs/r2 (sibling), and a run outside the root."""
    base = tmp_path_factory.mktemp("reload")
    runs = base / "runs"
    r1 = str(runs / "r1")
    make_checkpoint(r1, seed=0, cur_nimg=1000)
    make_checkpoint(r1, seed=1, cur_nimg=2000)
    make_checkpoint(str(runs / "r2"), seed=2, cur_nimg=500)
    make_checkpoint(str(base / "elsewhere" / "r9"), seed=3, cur_nimg=500)
    return base


@pytest.fixture(scope="module")
def policy(runs):
    return ServeArgs(checkpoint=str(runs / "runs" / "r1")).source_policy()


def test_default_root_is_the_served_runs_parent(runs, policy):
    root = os.path.realpath(runs / "runs")
    assert policy.roots == (root,)
    ckpt = str(runs / "runs" / "r1" / "checkpoints" / "ckpt-000000001000")
    assert run_folder(ckpt) == str(runs / "runs" / "r1")
    assert ServeArgs(checkpoint=ckpt).source_policy().roots == (root,)  # a checkpoint folder: its run's parent
    assert policy.resolve("r2") == os.path.join(root, "r2")  # relative: a sibling run
    assert policy.resolve(str(runs / "runs" / "r2")) == os.path.join(root, "r2")
    assert policy.resolve("file://" + str(runs / "runs" / "r1")) == os.path.join(root, "r1")
    assert policy.resolve("s3://bucket/runs/r7") == "s3://bucket/runs/r7"


@pytest.mark.parametrize("target,words", [
    ("http://169.254.169.254/latest/meta-data", "the http:// scheme is not allowed"),
    ("HTTPS://example.com/x", "the https:// scheme is not allowed"),
    ("ftp://10.0.0.1/ckpt", "the ftp:// scheme is not allowed"),
    ("memory://x", "the memory:// scheme is not allowed"),
    ("/etc", "outside the folders reload may read"),
    ("../elsewhere/r9", "outside the folders reload may read"),
    ("r1/../../elsewhere/r9", "outside the folders reload may read"),
    ("r1\x00", "no NUL"),
    ("  ", "give a checkpoint"),
])
def test_refused_targets(policy, runs, target, words):
    with pytest.raises(InvalidRequest, match=words) as e:
        policy.resolve(target)
    assert str(runs) not in str(e.value)  # no server path in the message


def test_symbolic_links_out_of_the_root_are_refused(runs, policy):
    link = runs / "runs" / "sneaky"
    if not link.exists():
        os.symlink(runs / "elsewhere" / "r9", link)
    with pytest.raises(InvalidRequest, match="outside"):
        policy.resolve("sneaky")


def test_wider_roots_and_schemes_are_configuration(runs):
    args = ServeArgs(checkpoint=str(runs / "runs" / "r1"), reload_roots=(str(runs),), reload_schemes=("s3", "gs"))
    policy = args.source_policy()
    assert policy.resolve(str(runs / "elsewhere" / "r9")) == os.path.realpath(runs / "elsewhere" / "r9")
    assert policy.resolve("gs://b/r") == "gs://b/r"
    with pytest.raises(ValueError, match="not a URL scheme"):
        ServeArgs(checkpoint="r", reload_schemes=("file",))
    with pytest.raises(ValueError, match=r"trusted_proxies\n.*not an IP address"):
        ServeArgs(checkpoint="r", trusted_proxies=("not-an-ip",))


def test_remote_run_resolves_relative_names_beside_it():
    policy = ServeArgs(checkpoint="s3://b/runs/r1").source_policy()
    assert policy.roots == () and policy.resolve("r2") == "s3://b/runs/r2"
    for bad in ["../../x", "/etc"]:
        with pytest.raises(InvalidRequest):
            policy.resolve(bad)


def test_public_names_and_redaction(runs, policy):
    root = os.path.realpath(runs / "runs")
    assert policy.public(os.path.join(root, "r1", "checkpoints", "ckpt-000000001000")) == "r1/checkpoints/ckpt-000000001000"
    assert policy.public("s3://b/k") == "s3://b/k"
    text = f"[Errno 2] No such file: '{root}/r1/state.pt' and /home/someone/.cache/x and s3://b/k/x"
    assert policy.redact(text) == "[Errno 2] No such file: 'r1/state.pt' and <path> and s3://b/k/x"


def test_load_model_serves_a_run_folder_as_its_newest_checkpoint(runs, policy):
    model = load_model(policy.resolve("r1"), "cpu", policy, GIB)
    assert model.name == "ckpt-000000002000" and model.kimg == 2.0
    assert model.info["checkpoint_uri"] == "r1/checkpoints/ckpt-000000002000"


@pytest.mark.parametrize("how,words", [("unbuildable", "cannot build the generator"), ("nan", "NaN or infinite")])
def test_checkpoints_that_load_but_cannot_be_served_are_refused(runs, policy, how, words):
    """The weights load (hash and tensors fine) but the network cannot be built or samples NaN: a LoadError
    (a 422 for reload), naming the checkpoint as the client knows it and nothing else of the server."""
    uri = make_broken_checkpoint(str(runs / "runs" / f"broken-{how}"), 3000, how)
    with pytest.raises(LoadError, match=words) as e:
        load_model(policy.resolve(f"broken-{how}"), "cpu", policy, GIB)
    assert f"broken-{how}/checkpoints/ckpt-000000003000" in str(e.value) and str(runs) not in str(e.value)
    assert os.path.isdir(uri)


def test_size_cap_is_checked_before_reading(runs, policy, monkeypatch):
    """A 300 MB state.pt (sparse, so the test writes nothing) is refused by its size, unread."""
    run = runs / "runs" / "huge"
    uri = make_checkpoint(str(run), seed=0, cur_nimg=100)
    os.truncate(os.path.join(uri, "state.pt"), 300 * 2**20)
    import styleray.storage as storage

    def no_read(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(storage, "read_bytes", no_read)  # a spy: reading anything would fail the test
    with pytest.raises(LoadError, match=r"state.pt is 300.0 MiB, over the 100.0 MiB cap") as e:
        load_model(policy.resolve("huge"), "cpu", policy, 100 * 2**20)
    assert str(runs) not in str(e.value)


def test_missing_and_non_checkpoint_folders(runs, policy):
    for name, words in [("nowhere", "neither a checkpoint folder"), (".", "neither a checkpoint folder")]:
        with pytest.raises(LoadError, match=words) as e:
            load_model(policy.resolve(name), "cpu", policy, GIB)
        assert str(runs) not in str(e.value)
