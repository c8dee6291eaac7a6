"""The manager's durable queue (and its migration from stored flags), request checking (settings from flags and
YAML), progress reading, auth token lookup and the `styleray queue` commands: no Ray, no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from styleray.cli import main
from styleray.platform import checkpoint as ckpt_lib
from styleray.platform.manager import Queue, QueueError, State, report
from styleray.platform.manager.jobs import auth_token
from styleray.platform.manager.progress import CHECKPOINTS_DIR, checkpoint_uris, read_progress
from styleray.platform.manager.requests import check_request, train_argv
from styleray.settings import load_file


def _add(q: Queue, name="r", **kw):
    return q.add(name=name, settings={"data": "/d", "out": f"/runs/{name}"}, out=f"/runs/{name}", target_kimg=1.0,
                 **kw)


def test_the_queue_survives_reopening(tmp_path):
    path = str(tmp_path / "sub" / "q.db")
    with Queue(path) as q:
        rid = _add(q, "a", priority=3).id
        queue_id = q.queue_id
        assert q.transition(rid, State.QUEUED, State.RUNNING, event=("x", "started"))
    with Queue(path) as q:
        req = q.get(rid)
        assert q.queue_id == queue_id and req.state == State.RUNNING and req.priority == 3
        assert [e.detail for e in q.events(rid)][-1] == "started"


def test_state_changes_are_compare_and_set(tmp_path):
    with Queue(str(tmp_path / "q.db")) as q, Queue(str(tmp_path / "q.db")) as other:
        rid = _add(q).id
        other.cancel(rid)  # another process cancels while the manager looks at a queued request
        assert not q.transition(rid, State.QUEUED, State.RUNNING)
        assert q.get(rid).state == State.CANCELLED
        with pytest.raises(QueueError, match="already cancelled"):
            q.cancel(rid)
        with pytest.raises(QueueError, match="no request 99"):
            q.get(99)


def test_queued_requests_come_by_priority_then_age(tmp_path):
    with Queue(str(tmp_path / "q.db")) as q:
        ids = [_add(q, n, priority=p).id for n, p in (("a", 0), ("b", 5), ("c", 5), ("d", 1))]
        order = []
        while (nxt := q.next_queued()) is not None:
            order.append(nxt.id)
            q.transition(nxt.id, State.QUEUED, State.RUNNING)
        assert order == [ids[1], ids[2], ids[3], ids[0]]


def test_two_active_requests_cannot_share_a_run_folder(tmp_path):
    with Queue(str(tmp_path / "q.db")) as q:
        first = _add(q, "a")
        with pytest.raises(QueueError, match="run folder of request"):
            _add(q, "a")
        q.cancel(first.id)
        assert _add(q, "a").state == State.QUEUED


def test_requests_are_checked_against_the_train_settings(tmp_path):
    spec = check_request("x", {"out": "rel/run", "data": "d", "kimg": "2", "lr": "fast"})
    assert spec.error and "--lr" in spec.error and "'fast'" in spec.error
    assert spec.out == os.path.abspath("rel/run") and spec.target_kimg == 2
    assert spec.settings == {"out": "rel/run", "data": "d", "kimg": "2", "lr": "fast"}  # recorded as given
    with pytest.raises(ValueError, match="needs --out"):
        check_request("x", {"data": "d"})
    spec = check_request("x", {"data": "s3://b/d", "out": "s3://b/r"}, check_data=False)
    assert "--kimg is required" in spec.error
    spec = check_request("x", {"data": "rel/d", "out": "s3://b/r", "kimg": "3"}, check_data=False)
    assert spec.error is None
    assert spec.settings == {"data": os.path.abspath("rel/d"), "out": "s3://b/r", "kimg": 3.0}
    spec = check_request("x", {"data": "d", "out": "o", "kimg": "3"}, check_data=False, unknown_flags=["--bogus", "1"])
    assert "unknown --bogus 1" in spec.error


def test_a_request_resolves_its_config_from_the_data(tiny_data, tmp_path):
    spec = check_request("x", {"data": tiny_data, "out": str(tmp_path / "r"), "preset": "cpu-tiny", "batch": "4"})
    assert spec.error is None and spec.config["model"]["resolution"] == 16
    assert spec.target_kimg == spec.config["train"]["kimg"] > 0  # the preset's length when --kimg is not given
    spec = check_request("x", {"data": tiny_data, "out": str(tmp_path / "r"), "preset": "cpu-tiny",
                               "resolution": "24"})
    assert "--resolution" in spec.error and "'24': must be a power of two" in spec.error


def test_yaml_requests_and_train_files_are_one_schema(tmp_path):
    path = tmp_path / "req.yaml"
    path.write_text("name: heroes\npriority: 4\ntrain:\n  data: /d\n  out: /o\n  kimg: 50\n  mirror: true\n"
                    "  cond: false\n  cpus_per_worker: 0.5\n")
    fields, settings = load_file(str(path))
    assert fields == {"name": "heroes", "priority": 4}
    assert settings == {"data": "/d", "out": "/o", "kimg": 50, "mirror": True, "cond": False, "cpus_per_worker": 0.5}
    spec = check_request(fields["name"], settings, check_data=False)
    assert spec.error is None and train_argv(spec.settings) == [
        "--data", "/d", "--out", "/o", "--kimg", "50.0", "--mirror", "--cpus-per-worker", "0.5"]
    path.write_text("data: /d\nout: /o\nkimg: 5\n")  # flat: every key is a train setting
    assert load_file(str(path)) == ({}, {"data": "/d", "out": "/o", "kimg": 5})
    path.write_text("train: {data: /d}\nextra: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_file(str(path))
    spec = check_request("x", {"data": ["a", "b"], "out": "/o", "kimg": 1}, check_data=False)
    assert "expected text" in spec.error


def test_a_resume_sets_resume_latest():
    resumed = ["--data", "/d", "--out", "/o", "--resume", "latest"]
    assert train_argv({"data": "/d", "out": "/o", "resume": "none"}, resume="latest") == resumed
    assert train_argv({"data": "/d", "out": "/o"}, resume="latest") == resumed
    assert train_argv({"data": "/d", "out": "/o", "resume": "/ck"}) == ["--data", "/d", "--out", "/o", "--resume", "/ck"]


def test_a_queue_of_stored_flags_is_migrated(tmp_path):
    """Schema 1 stored `styleray train` flags; opening it converts them to settings (unparseable ones kept)."""
    import sqlite3

    path = str(tmp_path / "old.db")
    with Queue(path) as q:
        _add(q, "good")
        _add(q, "bad")
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE requests RENAME COLUMN settings TO train_args")
    db.execute("UPDATE requests SET train_args = ? WHERE name = 'good'",
               (json.dumps(["--data", "/d", "--out", "/runs/good", "--kimg", "2", "--mirror"]),))
    db.execute("UPDATE requests SET train_args = ? WHERE name = 'bad'", (json.dumps(["--out", "/o", "--lr", "x"]),))
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.commit()
    db.close()
    with Queue(path) as q:
        good, bad = q.list()
        assert good.settings == {"data": "/d", "out": "/runs/good", "kimg": 2.0, "mirror": True}
        assert bad.settings == {"argv": ["--out", "/o", "--lr", "x"]}
        assert "(none:" in report.show(q, bad.id) and "styleray train --data /d" in report.show(q, good.id)


def test_progress_reads_the_metrics_tail_and_committed_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / CHECKPOINTS_DIR).mkdir(parents=True)
    for kimg in (0.02, 0.04, 0.06):
        d = run / CHECKPOINTS_DIR / ckpt_lib.checkpoint_name(kimg * 1000)
        d.mkdir()
        if kimg < 0.06:  # the newest is not committed (no meta.json): it does not count
            (d / "meta.json").write_text(json.dumps({"kimg": kimg}))
    (run / CHECKPOINTS_DIR / ".tmp-abc").mkdir()
    lines = [json.dumps({"tick": i, "kimg": i * 0.02, "time": 100.0 + i}) for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"tick": 4, "ki')  # a line being written
    p = read_progress(str(run))
    assert p.kimg == pytest.approx(0.06) and p.tick_time == 103.0
    assert p.checkpoint_kimg == 0.04 and p.checkpoint.endswith("ckpt-000000000040")
    assert p.first_tick_after(101.5)["tick"] == 2 and p.first_tick_after(200) is None
    assert checkpoint_uris(str(run)) == ckpt_lib.list_checkpoints(str(run))  # the same naming as checkpoint.py
    assert read_progress(str(tmp_path / "nothing-yet")).kimg is None


def test_the_token_is_found_as_ray_finds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", " tok ")
    assert auth_token() == "tok"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "t").write_text("filetok\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_token() == "filetok"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None


def test_queue_commands(tiny_data, tmp_path, capsys):
    db = str(tmp_path / "q.db")
    base = ["--preset", "cpu-tiny", "--batch", "4", "--kimg", "0.5"]
    assert main(["queue", "add", "--db", db, "--name", "a", "--data", tiny_data, "--out", str(tmp_path / "a"),
                 *base]) == 0
    yaml_path = tmp_path / "b.yaml"
    yaml_path.write_text(f"name: b\npriority: 2\ntrain:\n  data: {tiny_data}\n  out: {tmp_path / 'b'}\n"
                         "  preset: cpu-tiny\n  batch: 4\n  kimg: 1\n")
    assert main(["queue", "add", "--db", db, "--config", str(yaml_path), "--kimg", "2"]) == 0  # the flag wins
    capsys.readouterr()
    assert main(["queue", "list", "--db", db]) == 0
    table = capsys.readouterr().out
    assert "none is running" in table and table.index(" b ") < table.index(" a ")  # priority first
    assert "0.00/2" in table
    assert main(["queue", "show", "--db", db, "1"]) == 0
    shown = capsys.readouterr().out
    assert "request 1: a" in shown and "attempts: none yet" in shown and "--kimg 0.5" in shown
    assert main(["queue", "cancel", "--db", db, "1"]) == 0
    assert "cancelled request 1" in capsys.readouterr().out
    assert main(["queue", "list", "--db", db, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["state"] for r in rows} == {"a": "cancelled", "b": "queued"}
    with pytest.raises(SystemExit):
        main(["queue", "cancel", "--db", db, "1"])
    assert "already cancelled" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["manager", "--db", db, "--address", "127.0.0.1:6379", "--once"])
    assert "http://HEAD:8265" in capsys.readouterr().err


def test_list_table_shows_progress_and_the_manager(tmp_path):
    clock = [1000.0]
    with Queue(str(tmp_path / "q.db"), clock=lambda: clock[0]) as q:
        rid = _add(q).id
        q.transition(rid, State.QUEUED, State.RUNNING)
        q.update(rid, kimg=0.25)
        q.acquire_lease(owner="me", address="http://h:8265", poll_s=30, stale_after_s=90)
        text = report.list_table(q, now=1010.0)
        assert "[#####---------------]" in text and "25%" in text and "running" in text
        assert f"pid {os.getpid()}" in text and "http://h:8265" in text and "SILENT" not in text
        assert "SILENT" in report.list_table(q, now=1200.0)


def test_the_queue_commands_do_not_import_ray_or_torch(tmp_path):
    code = ("import sys; from styleray.cli import main; main(['queue', 'list', '--db', sys.argv[1]]); "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.db")], check=True, capture_output=True)


def test_queue_show_by_name_prints_the_model_name_a_serve_app_serves_it_under(tmp_path, capsys):
    """`queue show NAME`: a finished run under a folder a serve app watches (its .styleray-served.json record,
    written by `styleray serve --runs`) shows the model name; one not listed yet says when it will be."""
    from styleray.platform.served import write_record

    root = tmp_path / "runs"
    root.mkdir()
    db = str(tmp_path / "q.db")
    with Queue(db) as q:
        done = q.add(name="heroes", settings={"data": "/d", "out": str(root / "heroes")}, out=str(root / "heroes"),
                     target_kimg=1.0)
        fresh = q.add(name="faces", settings={"data": "/d", "out": str(root / "faces")}, out=str(root / "faces"),
                      target_kimg=1.0)
        for rid in (done.id, fresh.id):
            assert q.transition(rid, State.QUEUED, State.SUCCEEDED, event=("x", "done"))
        assert "served as" not in report.show(q, done.id)  # no serve app watches runs/
    write_record(str(root), {"heroes": {"run": str(root / "heroes"), "checkpoint": "ckpt-000000001000"}}, 10.0)
    assert main(["queue", "show", "heroes", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "request 1: heroes" in out
    assert f"served as  model 'heroes' (ckpt-000000001000) by the serve app watching {root}" in out
    assert main(["queue", "show", str(fresh.id), "--db", db]) == 0
    out = capsys.readouterr().out
    assert "served as  - (not yet" in out and "rescans every 10 s" in out
    with pytest.raises(SystemExit) as e:
        main(["queue", "show", "nobody", "--db", db])
    assert e.value.code == 2 and "no request named 'nobody'" in capsys.readouterr().err
