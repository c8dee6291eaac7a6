"""Models by name without Ray: the naming rule and its duplicates, which runs a scan finds (never a run being
written), which checkpoint a run serves (best.json's choice, else the newest committed), and the record that
`styleray queue show` reads. Real files in tmp_path; milliseconds each."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from serve_helpers import make_checkpoint

from styleray.platform.served import served_as, write_record
from styleray.serve.args import ServeArgs
from styleray.serve.catalog import (
    Source,
    assign_names,
    check_name,
    choose_checkpoint,
    explicit_sources,
    find_runs,
    name_for,
)

RES = 16


@pytest.fixture(scope="module")
def ckpt_template(tmp_path_factory):
    """One real checkpoint, copied wherever a test needs a run (building one takes ~0.3 s)."""
    return make_checkpoint(str(tmp_path_factory.mktemp("template") / "run"), seed=0, cur_nimg=1000, resolution=RES,
                           c_dim=0)


def run_with(root, rel: str, template: str, names=("ckpt-000000001000",)) -> str:
    run = os.path.join(root, rel)
    for name in names:
        shutil.copytree(template, os.path.join(run, "checkpoints", name))
    return run


def test_name_rule():
    assert name_for("heroes") == "heroes" and name_for("s3://b/runs/heroes-256/") == "heroes-256"
    assert name_for("my run (2)") == "my-run--2-" and name_for(".hidden") == "hidden"
    assert name_for("...") is None and name_for("x" * 80) == "x" * 64
    with pytest.raises(ValueError, match="1-64 characters"):
        check_name("a/b")


def test_duplicate_names_follow_the_stated_rule(tmp_path):
    root = str(tmp_path)
    explicit = [Source("heroes", "/elsewhere/heroes", True, "models")]
    sources, notes = assign_names(explicit, ["zeta", "heroes", "old/zeta", "b/zeta", "a.zeta"], root)
    assert sources[0] == explicit[0]
    by_rel = {s.relpath: s.name for s in sources if s.relpath}
    assert by_rel["zeta"] == "zeta"  # rule 3: the run nearer to ROOT gets the plain name
    assert by_rel["b/zeta"] == "b.zeta" and by_rel["old/zeta"] == "old.zeta"  # rule 4: its path, with dots
    assert by_rel["a.zeta"] == "a.zeta"
    assert any("two runs named 'zeta'" in n and "old/zeta as 'old.zeta'" in n for n in notes), notes
    # rule 1: 'heroes' is the operator's; the run found under ROOT would be 'heroes' by path too: not served
    assert "heroes" not in by_rel and any(n.startswith("heroes: not served") for n in notes), notes
    # rule 2: a name once given stays with its run, even when a nearer run of that name appears later
    later, notes = assign_names([], ["zeta", "old/zeta"], root, previous={"zeta": os.path.join(root, "old/zeta")})
    assert {s.relpath: s.name for s in later} == {"old/zeta": "zeta"}  # the top-level one's path name is 'zeta' too
    assert notes == ["zeta: not served: its names 'zeta' and 'zeta' are taken"]


def test_explicit_sources_and_their_checks(tmp_path):
    (ckpt,) = [s for s in explicit_sources(str(tmp_path / "runs/r1/checkpoints/ckpt-000000001000"), {})]
    assert ckpt.name == "r1" and not ckpt.follow and ckpt.origin == "checkpoint"
    both = explicit_sources(None, {"a": "/runs/a", "b": "/runs/b/checkpoints/ckpt-000000000500"})
    assert [(s.name, s.follow) for s in both] == [("a", True), ("b", False)]
    with pytest.raises(ValueError, match="given twice"):
        explicit_sources("/runs/a", {"a": "/other"})
    with pytest.raises(ValueError, match="nothing to serve"):
        ServeArgs()
    with pytest.raises(ValueError, match="model name 'a b'"):
        ServeArgs(models={"a b": "/runs/x"})
    assert ServeArgs(runs="/runs").source_policy().roots == (os.path.realpath("/runs"),)


def test_scan_finds_committed_runs_only(tmp_path, ckpt_template):
    root = tmp_path / "runs"
    run_with(root, "a", ckpt_template)
    run_with(root, "sweep/t1", ckpt_template)
    run_with(root, "deep/x/y", ckpt_template)  # three levels down: beyond scan_depth 2
    (root / "empty" / "checkpoints").mkdir(parents=True)  # a run that has written nothing yet
    half = run_with(root, "half", ckpt_template)
    os.remove(os.path.join(half, "checkpoints", "ckpt-000000001000", "meta.json"))  # written, not committed
    (root / ".hidden" / "checkpoints").mkdir(parents=True)
    found = find_runs(str(root), depth=2)
    assert found == ["a", "empty", "half", "sweep/t1"]
    assert "deep/x/y" in find_runs(str(root), depth=3)
    assert choose_checkpoint(str(root / "empty")) is None and choose_checkpoint(str(root / "half")) is None


def test_a_run_serves_best_json_choice_else_its_newest(tmp_path, ckpt_template):
    run = run_with(tmp_path, "r", ckpt_template, names=("ckpt-000000001000", "ckpt-000000002000", "ckpt-000000003000"))
    os.remove(os.path.join(run, "checkpoints", "ckpt-000000003000", "meta.json"))  # still being written
    choice = choose_checkpoint(run)
    assert (choice.name, choice.chosen_by, choice.resolution, choice.classes) == ("ckpt-000000002000", "newest", RES, 0)
    with open(os.path.join(run, "best.json"), "w") as f:
        json.dump({"checkpoint": "ckpt-000000001000", "criterion": "fid", "value": 12.5}, f)
    meta_path = os.path.join(run, "checkpoints", "ckpt-000000001000", "meta.json")
    meta = json.load(open(meta_path))
    meta["metrics"] = {"fid": 12.5, "kid": 0.01}
    json.dump(meta, open(meta_path, "w"))
    choice = choose_checkpoint(run)
    assert (choice.name, choice.chosen_by, choice.fid, choice.kid) == ("ckpt-000000001000", "best.json", 12.5, 0.01)
    with open(os.path.join(run, "best.json"), "w") as f:
        json.dump({"checkpoint": "ckpt-000000009000"}, f)  # pruned or not there: the newest committed instead
    assert choose_checkpoint(run).name == "ckpt-000000002000"


def test_the_record_tells_under_which_name_a_run_is_served(tmp_path):
    root = str(tmp_path / "runs")
    os.makedirs(root)
    assert served_as(os.path.join(root, "heroes")) is None  # nobody watches
    write_record(root, {"heroes": {"run": os.path.join(root, "heroes"), "checkpoint": "ckpt-000000001000"},
                        "old.heroes": {"run": os.path.join(root, "old", "heroes"), "checkpoint": None}}, 10.0)
    assert served_as(os.path.join(root, "heroes")).name == "heroes"
    nested = served_as(os.path.join(root, "old", "heroes") + "/")
    assert nested.name == "old.heroes" and nested.root == root
    unlisted = served_as(os.path.join(root, "new"))
    assert unlisted.name is None and unlisted.scan_interval_s == 10.0


@pytest.fixture
def bucket(tmp_path):
    """A bucket on a moto S3 server on 127.0.0.1 (AWS itself cannot be reached here)."""
    from serve_helpers import start_moto

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint, proc = start_moto(str(tmp_path / "moto.log"))
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update({**env, "AWS_ENDPOINT_URL": endpoint})
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    try:
        from styleray import storage

        storage.filesystem("s3://catalog")[0].mkdir("catalog")
        yield "s3://catalog/runs"
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        proc.terminate()
        proc.wait(timeout=10)


def test_runs_under_an_s3_prefix_are_found_named_and_recorded(bucket, ckpt_template):
    """The same scan over s3:// (moto): committed runs only, a run added later is found by the next scan
    (listings are not cached), and the served-names record is written and read back there."""
    from styleray import storage

    def upload(rel: str, committed: bool = True) -> None:
        for name in os.listdir(ckpt_template):
            if committed or name != "meta.json":
                with open(os.path.join(ckpt_template, name), "rb") as f:
                    storage.write_bytes(f"{bucket}/{rel}/checkpoints/ckpt-000000001000/{name}", f.read())

    upload("heroes")
    upload("writing", committed=False)  # meta.json is the commit marker on object stores
    assert find_runs(bucket, 2) == ["heroes", "writing"]
    assert choose_checkpoint(f"{bucket}/writing") is None
    choice = choose_checkpoint(f"{bucket}/heroes")
    assert choice.checkpoint == f"{bucket}/heroes/checkpoints/ckpt-000000001000" and choice.resolution == RES
    upload("sweep/t1")
    assert find_runs(bucket, 2) == ["heroes", "writing", "sweep/t1"]
    write_record(bucket, {"heroes": {"run": f"{bucket}/heroes", "checkpoint": choice.name}}, 10.0)
    assert served_as(f"{bucket}/heroes").name == "heroes"
    assert served_as(f"{bucket}/sweep/t1").name is None  # watched, not (yet) served
