"""The training manager on a real Ray cluster (`ray start --head` on 127.0.0.1, token auth on): issue 7's tests.

The manager loop is driven step by step in this process (``Manager.poll_once``), except where it runs as a Ray
job (one round, in the first test) and in the test that kills it, where it is a real `styleray manager`
process. Runs use the cpu-tiny preset at 16 px and train in the job's driver (``--no-ray``): a Ray Train job
costs ~20-45 s more to start on a loaded 2-core machine, and the manager treats both alike
(benchmarks/manager_recovery.py measures resuming Ray Train runs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from manager_cluster import VENV_BIN, RayHead
from styleray.cli import main
from styleray.platform.manager import Manager, ManagerOptions, Queue, State, report
from styleray.platform.manager.jobs import JobsAuthError, JobsUnavailable, RayJobs

pytestmark = pytest.mark.slow

TICK = 0.02  # kimg per tick: 5 steps of batch 4


@pytest.fixture(scope="module")
def head():
    h = RayHead(num_cpus=2)
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def token_env(head):
    """This process talks to the cluster with its token, found the way Ray finds it (RAY_AUTH_TOKEN_PATH)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", head.token_path)
        yield


@pytest.fixture
def jobs(head, token_env) -> RayJobs:
    return RayJobs(head.url)


def train_flags(data, out, kimg: float) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--preset", "cpu-tiny", "--resolution", "16", "--batch", "4",
            "--tick", str(TICK), "--snap", "1", "--kimg", str(kimg), "--no-ray", "--no-progress"]


def add(db, name: str, flags: list[str], *extra: str) -> int:
    assert main(["queue", "add", "--db", str(db), "--name", name, *extra, *flags]) == 0
    with Queue(str(db)) as q:
        return max(r.id for r in q.list())


def options(head, **kw) -> ManagerOptions:
    return ManagerOptions(address=head.url, **{"poll_s": 0.3, "backoff_s": 0.5, **kw})


def drive(manager: Manager, done, what: str, timeout: float = 150.0, every=None) -> None:
    """Poll until ``done()``; a failure shows the queue and the newest job's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.poll_once()
        if every is not None:
            every()
        if done():
            return
        time.sleep(manager.options.poll_s)  # the manager's poll interval, not a synchronisation
    raise AssertionError(f"not {what} after {timeout:.0f}s\n{_diagnose(manager.queue, manager.jobs)}")


def wait_for(condition, what: str, timeout: float = 150.0, diagnose=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"not {what} after {timeout:.0f}s\n{diagnose()}")


def _try_submit(jobs: RayJobs, submission_id: str, entrypoint: str) -> bool:
    try:
        jobs.submit(submission_id, entrypoint)
    except JobsUnavailable:  # "No available agent" while the head node settles
        return False
    return True


def _diagnose(queue: Queue, jobs: RayJobs) -> str:
    text = report.list_table(queue)
    for att in queue.attempts()[-1:]:
        text += f"\n--- events of request {att.request_id}:\n" + report.show(queue, att.request_id)
        try:
            text += f"\n--- log of {att.submission_id}:\n" + jobs.logs(att.submission_id)[-3000:]
        except Exception as e:  # noqa: BLE001 - best effort diagnostics
            text += f"\n(no log: {e})"
    return text


def read_ticks(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------


def test_a_request_runs_to_its_target_kimg(head, jobs, tiny_data, tmp_path, monkeypatch):
    db, out = tmp_path / "queue.db", tmp_path / "run"
    rid = add(db, "one", train_flags(tiny_data, out, kimg=0.06))
    with Queue(str(db)) as q:
        # The manager as a Ray job (the cluster's default address and token): one round submits the request
        mgr_job = f"manager-{q.queue_id}"
        wait_for(lambda: _try_submit(jobs, mgr_job, f"styleray manager --once --db {db}"), "manager job submitted")
        wait_for(lambda: jobs.info(mgr_job).terminal,
                 "manager job done", diagnose=lambda: jobs.logs(mgr_job))
        assert jobs.info(mgr_job).status == "SUCCEEDED", jobs.logs(mgr_job)
        assert q.get(rid).state == State.RUNNING and q.lease() is None
        # ... and in this process from then on
        manager = Manager(q, jobs, options(head))
        drive(manager, lambda: q.get(rid).state.terminal, "finished")
        req = q.get(rid)
        assert req.state == State.SUCCEEDED, _diagnose(q, jobs)
        assert req.attempts == 1 and req.kimg == pytest.approx(0.06) and req.checkpoint_kimg == pytest.approx(0.06)
        assert req.checkpoint == str(out / "checkpoints" / "ckpt-000000000060")
        (att,) = q.attempts(rid)
        assert att.status == "SUCCEEDED" and att.exit_code == 0 and att.recovery_s is None
        assert att.submission_id == f"styleray-{q.queue_id}-r{rid}-a1"
        job = jobs.info(att.submission_id)
        assert job.metadata["styleray_request"] == str(rid) and job.metadata["styleray_queue"] == q.queue_id
        assert [round(r["kimg"], 3) for r in read_ticks(out)] == [0.02, 0.04, 0.06]
        table = report.list_table(q)
        assert "succeeded" in table and "100%" in table and f"pid {os.getpid()}" in table
        manager.close()
        assert "none is running" in report.list_table(q)

    # Token auth is real: a wrong token is refused with a message that names the fix
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(JobsAuthError, match="RAY_AUTH_TOKEN_PATH"):
        RayJobs(head.url).info("anything")


def test_a_killed_job_resumes_from_its_checkpoint(head, jobs, tiny_data, tmp_path):
    """The job's driver (the training process) is SIGKILLed mid-training; the manager resubmits the same command,
    which resumes from the newest checkpoint and trains only the remaining kimg. (With Ray Train the same
    happens, only slower: benchmarks/manager_recovery.py interrupts Ray Train runs.)"""
    db, out, target = tmp_path / "queue.db", tmp_path / "run", 0.4
    rid = add(db, "killed", train_flags(tiny_data, out, kimg=target))
    with Queue(str(db)) as q:
        manager = Manager(q, jobs, options(head))
        drive(manager, lambda: (q.get(rid).checkpoint_kimg or 0) >= 2 * TICK, "checkpointed twice")
        driver = head.find_process("styleray", "train", str(out))
        assert driver is not None, "no driver process found"
        at_kill = q.get(rid).checkpoint_kimg
        driver.send_signal(signal.SIGKILL)
        assert at_kill < target, "training finished before the kill: raise the target"
        drive(manager, lambda: q.get(rid).state.terminal, "finished after the kill")

        req = q.get(rid)
        assert req.state == State.SUCCEEDED, _diagnose(q, jobs)
        assert req.attempts == 2 and req.checkpoint_kimg == pytest.approx(target)
        first, second = q.attempts(rid)
        assert first.status == "FAILED" and first.exit_code in (-9, 137), first
        assert first.end_kimg >= at_kill and second.start_kimg == pytest.approx(first.end_kimg)
        assert second.status == "SUCCEEDED" and "--resume latest" in second.entrypoint
        assert second.interrupted_at == pytest.approx(first.job_ended_at)
        assert second.resumed_at > second.submitted_at > second.interrupted_at
        assert 0 < second.recovery_s < 300
        kinds = [e.kind for e in q.events(rid)]
        assert kinds.index("interrupted") < kinds.index("resumed") < kinds.index("succeeded")

        ticks = read_ticks(out)
        resumed = [t for t in ticks if t["time"] >= second.submitted_at]
        assert [t["resumed_kimg"] for t in resumed] == pytest.approx([second.start_kimg] * len(resumed))
        assert resumed[0]["kimg"] == pytest.approx(second.start_kimg + TICK)  # only the remaining kimg
        assert resumed[-1]["kimg"] == pytest.approx(target)
        assert len(resumed) == round((target - second.start_kimg) / TICK)
        print(f"\nrecovery: {second.recovery_s:.1f}s from the driver's death to the first tick of attempt 2")


def test_a_killed_manager_restarts_without_duplicating_the_job(head, jobs, tiny_data, tmp_path):
    db, out = tmp_path / "queue.db", tmp_path / "run"
    rid = add(db, "steady", train_flags(tiny_data, out, kimg=0.3))
    env = {**head.client_env(), "STYLERAY_QUEUE": str(db)}
    cmd = [os.path.join(VENV_BIN, "styleray"), "manager", "--address", head.url, "--poll", "0.5", "--backoff", "1"]
    logs = [open(tmp_path / f"manager{i}.log", "w+", encoding="utf-8") for i in (1, 2)]
    first = subprocess.Popen(cmd, env=env, stdout=logs[0], stderr=subprocess.STDOUT)
    second = None
    try:
        with Queue(str(db)) as q:
            def job_running() -> bool:
                att = q.current_attempt(rid)
                return att is not None and att.status == "RUNNING"

            log_of = lambda f: lambda: (f.seek(0), f.read()[-3000:])[1]  # noqa: E731
            wait_for(job_running, "running under the first manager", diagnose=log_of(logs[0]))
            first.kill()
            first.wait()
            assert q.lease().pid == first.pid  # it died holding the lease
            second = subprocess.Popen(cmd, env=env, stdout=logs[1], stderr=subprocess.STDOUT)
            wait_for(lambda: q.get(rid).state.terminal, "finished under the second manager", diagnose=log_of(logs[1]))
            second.send_signal(signal.SIGTERM)  # as `ray job stop` would: it finishes the round and exits
            assert second.wait(timeout=60) == 0
            assert q.lease() is None

            req = q.get(rid)
            assert req.state == State.SUCCEEDED and req.attempts == 1 and req.kimg == pytest.approx(0.3)
            ours = [sid for sid, job in jobs.list() if (job.metadata or {}).get("styleray_queue") == q.queue_id]
            assert ours == [f"styleray-{q.queue_id}-r{rid}-a1"]
            assert any(e.kind == "manager" and f"took over from pid {first.pid}" in e.detail for e in q.events())
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()

    # The `ray` CLI sees the same single job, with the cluster's token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH)
    listed = subprocess.run([os.path.join(VENV_BIN, "ray"), "job", "list", "--address", head.url],
                            env=head.client_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count(f"submission_id='styleray-{q.queue_id}-r{rid}-a") == 1


def test_requests_run_in_priority_order(head, jobs, tiny_data, tmp_path):
    db = tmp_path / "queue.db"
    low = add(db, "low", train_flags(tiny_data, tmp_path / "low", kimg=0.04), "--priority", "1")
    high = add(db, "high", train_flags(tiny_data, tmp_path / "high", kimg=0.04), "--priority", "5")
    with Queue(str(db)) as q:
        manager = Manager(q, jobs, options(head, max_running=1))
        running = []
        drive(manager, lambda: q.get(low).state.terminal and q.get(high).state.terminal, "both finished",
              every=lambda: running.append(q.count((State.RUNNING, State.RETRYING))))
        assert q.get(high).state == q.get(low).state == State.SUCCEEDED, _diagnose(q, jobs)
        assert max(running) == 1
        (h,), (lo,) = q.attempts(high), q.attempts(low)
        assert h.submitted_at < lo.submitted_at and h.job_ended_at <= lo.submitted_at

        # `styleray queue cancel` stops a running request's job itself (at the manager's address, with the token)
        doomed = add(db, "doomed", train_flags(tiny_data, tmp_path / "doomed", kimg=5.0))
        drive(manager, lambda: q.current_attempt(doomed) is not None and q.current_attempt(doomed).status == "RUNNING",
              "running")
        assert main(["queue", "cancel", "--db", str(db), str(doomed)]) == 0
        drive(manager, lambda: q.current_attempt(doomed).finished, "stopped")
        assert q.get(doomed).state == State.CANCELLED and q.current_attempt(doomed).status == "STOPPED"
        kinds = [e.kind for e in q.events(doomed)]
        assert kinds.index("cancelled") < kinds.index("stopping")


def test_bad_requests_fail_fast_with_the_reason(head, jobs, tiny_data, tmp_path):
    db = tmp_path / "queue.db"
    with pytest.raises(SystemExit) as e:  # an unknown train flag: rejected on arrival, recorded with the reason
        main(["queue", "add", "--db", str(db), "--name", "typo", *train_flags(tiny_data, tmp_path / "a", 0.04),
              "--learning-rate", "0.1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):  # data that does not exist
        main(["queue", "add", "--db", str(db), "--name", "nodata",
              *train_flags(tmp_path / "missing", tmp_path / "b", 0.04)])
    # data that vanishes after the request was queued: the job itself fails at once (exit 2), no retries
    data = shutil.copytree(tiny_data, tmp_path / "data")
    gone = add(db, "gone", train_flags(data, tmp_path / "c", 0.04))
    shutil.rmtree(data)
    with Queue(str(db)) as q:
        typo, nodata = (r for r in q.list() if r.id != gone)
        assert typo.state == State.FAILED and "--learning-rate" in typo.last_error and typo.attempts == 0
        assert nodata.state == State.FAILED and "missing" in nodata.last_error and nodata.attempts == 0
        manager = Manager(q, jobs, options(head))
        drive(manager, lambda: q.get(gone).state.terminal, "failed", timeout=120)
        req = q.get(gone)
        assert req.state == State.FAILED and req.attempts == 1, _diagnose(q, jobs)
        assert "rejected the request" in req.last_error and str(data) in req.last_error
        assert q.attempts(gone)[0].exit_code == 2
        assert "rejected the request" in report.show(q, gone)
