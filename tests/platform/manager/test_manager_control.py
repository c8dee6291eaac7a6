"""The manager's decisions, step by step, against a fake Jobs API and fake run progress (no Ray, milliseconds):
exactly-once submission across crashes, resume with backoff, bounded attempts, cancellation, lost jobs."""

from __future__ import annotations

import dataclasses
import os

import pytest

from styleray.platform.manager import Manager, ManagerOptions, Queue, State, submission_id
from styleray.platform.manager.jobs import JobState, JobsUnavailable, classify, error_line
from styleray.platform.manager.progress import Progress


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class FakeJobs:
    """The Jobs API as RayJobs presents it. ``down``: unreachable; ``lose_reply``: the next submission reaches
    the cluster but its reply is lost (the manager sees JobsUnavailable)."""

    def __init__(self, clock: Clock):
        self.clock, self.jobs, self.submissions, self.entrypoints = clock, {}, [], {}
        self.down = self.lose_reply = False

    def _check(self):
        if self.down:
            raise JobsUnavailable("connection refused")

    def submit(self, sid, entrypoint, **kwargs):
        self._check()
        self.submissions.append(sid)
        if sid in self.jobs:
            return False
        self.jobs[sid] = JobState("RUNNING", start_time=self.clock(), metadata=kwargs.get("metadata"))
        self.entrypoints[sid] = entrypoint
        if self.lose_reply:
            self.lose_reply = False
            raise JobsUnavailable("read timed out")
        return True

    def info(self, sid):
        self._check()
        return self.jobs.get(sid)

    def stop(self, sid):
        self._check()
        job = self.jobs.get(sid)
        if job is None or job.terminal:
            return False
        self.end(sid, "STOPPED")
        return True

    def end(self, sid, status, exit_code=None, message=""):
        self.jobs[sid] = dataclasses.replace(self.jobs[sid], status=status, end_time=self.clock(),
                                             exit_code=exit_code, message=message)


class Runs:
    """Run folders' progress, set by the test: out -> Progress."""

    def __init__(self):
        self.progress = {}

    def __call__(self, out):
        return self.progress.get(out, Progress())

    def at(self, out, kimg, *, tick_time=None, ticks=()):
        self.progress[out] = Progress(kimg=kimg, tick_time=tick_time, checkpoint=f"{out}/checkpoints/{kimg}",
                                      checkpoint_kimg=kimg, ticks=list(ticks))


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    queue = Queue(str(tmp_path / "q.db"), clock=clock)
    jobs, runs = FakeJobs(clock), Runs()

    def manager(**kw):
        opts = ManagerOptions(address="http://head:8265", **{"backoff_s": 10.0, "backoff_max_s": 40.0, **kw})
        return Manager(queue, jobs, opts, clock=clock, progress=runs)

    def add(name="r", kimg=1.0, priority=0, max_attempts=3):
        return queue.add(name=name, settings={"data": "/d", "out": f"/runs/{name}", "kimg": kimg},
                         out=f"/runs/{name}", target_kimg=kimg, priority=priority, max_attempts=max_attempts).id

    yield dataclasses.make_dataclass("Env", ["clock", "queue", "jobs", "runs", "manager", "add"])(
        clock, queue, jobs, runs, manager, add)
    queue.close()


def sid(env, rid, n):
    return submission_id(env.queue.queue_id, rid, n)


def test_a_request_is_submitted_watched_and_finished(env):
    rid = env.add(kimg=1.0)
    m = env.manager()
    m.poll_once()
    assert env.queue.get(rid).state == State.RUNNING and env.jobs.submissions == [sid(env, rid, 1)]
    assert env.jobs.jobs[sid(env, rid, 1)].metadata["styleray_request"] == str(rid)
    assert env.jobs.entrypoints[sid(env, rid, 1)] == "styleray train --data /d --out /runs/r --kimg 1.0"
    env.runs.at("/runs/r", 0.5)
    m.poll_once()
    assert env.queue.get(rid).kimg == 0.5 and env.queue.current_attempt(rid).status == "RUNNING"
    env.runs.at("/runs/r", 1.0)
    env.jobs.end(sid(env, rid, 1), "SUCCEEDED", 0)
    m.poll_once()
    req = env.queue.get(rid)
    assert req.state == State.SUCCEEDED and req.checkpoint_kimg == 1.0 and req.attempts == 1
    m.poll_once()
    assert env.jobs.submissions == [sid(env, rid, 1)]


def test_a_manager_that_dies_before_submitting_submits_the_recorded_attempt_once(env):
    rid = env.add()
    env.jobs.down = True  # the attempt is recorded, the submission fails: as if the manager died right here
    env.manager().poll_once()
    att = env.queue.current_attempt(rid)
    assert att.status == "SUBMITTING" and att.submitted_at is None and env.jobs.submissions == []
    env.jobs.down = False
    second = env.manager()  # a new manager process
    second.poll_once()
    second.poll_once()
    assert env.jobs.submissions == [sid(env, rid, 1)]
    assert env.queue.current_attempt(rid).submitted_at is not None and env.queue.get(rid).attempts == 1


def test_a_submission_whose_reply_was_lost_is_adopted_not_repeated(env):
    rid = env.add()
    env.jobs.lose_reply = True  # the job starts on the cluster, the manager never hears back
    env.manager().poll_once()
    assert env.queue.current_attempt(rid).submitted_at is None
    env.manager().poll_once()  # finds the job under the deterministic id
    assert env.jobs.submissions == [sid(env, rid, 1)]
    assert env.queue.current_attempt(rid).submitted_at is not None
    assert [e.kind for e in env.queue.events(rid)][-1] == "adopted"


def test_an_interrupted_run_resumes_after_the_backoff_and_records_its_recovery_time(env):
    rid = env.add(kimg=1.0)
    m = env.manager()
    m.poll_once()
    env.runs.at("/runs/r", 0.4)
    env.jobs.end(sid(env, rid, 1), "FAILED", -9, "killed")
    ended = env.clock()
    env.clock.advance(2)
    m.poll_once()
    req = env.queue.get(rid)
    assert req.state == State.INTERRUPTED and req.retry_at == env.clock() + 10 and "signal 9" in req.last_error
    env.clock.advance(5)
    m.poll_once()  # not yet due
    assert env.queue.get(rid).state == State.INTERRUPTED and len(env.jobs.submissions) == 1
    env.clock.advance(5)
    m.poll_once()
    second = env.queue.current_attempt(rid)
    assert env.queue.get(rid).state == State.RETRYING and second.attempt == 2 and second.start_kimg == 0.4
    assert second.interrupted_at == ended
    assert env.jobs.entrypoints[sid(env, rid, 2)].endswith("--kimg 1.0 --resume latest")
    env.clock.advance(20)
    env.runs.at("/runs/r", 0.4, ticks=[{"kimg": 0.4, "time": ended - 1}, {"kimg": 0.45, "time": env.clock() - 3}])
    m.poll_once()
    second = env.queue.current_attempt(rid)
    assert env.queue.get(rid).state == State.RUNNING
    assert second.resumed_at == env.clock() - 3 and second.recovery_s == pytest.approx(env.clock() - 3 - ended)
    env.runs.at("/runs/r", 1.0)
    env.jobs.end(sid(env, rid, 2), "SUCCEEDED", 0)
    m.poll_once()
    assert env.queue.get(rid).state == State.SUCCEEDED and env.queue.get(rid).attempts == 2


def test_interruptions_without_progress_back_off_and_give_up(env):
    rid = env.add(max_attempts=3)
    m = env.manager()
    delays = []
    for n in (1, 2, 3):
        m.poll_once()
        env.jobs.end(sid(env, rid, n), "STOPPED")
        m.poll_once()
        req = env.queue.get(rid)
        if req.state != State.INTERRUPTED:
            break
        delays.append(req.retry_at - env.clock())
        env.clock.advance(req.retry_at - env.clock())
    assert delays == [10, 20]  # doubling per stalled attempt
    req = env.queue.get(rid)
    assert req.state == State.FAILED and req.attempts == 3 and "3 time(s) in a row" in req.last_error


def test_progress_resets_the_stall_count(env):
    rid = env.add(max_attempts=2)
    m = env.manager()
    for n, kimg in ((1, 0.1), (2, 0.2), (3, 0.3)):
        m.poll_once()
        env.runs.at("/runs/r", kimg)
        env.jobs.end(sid(env, rid, n), "STOPPED")
        m.poll_once()
        assert env.queue.get(rid).state == State.INTERRUPTED and env.queue.get(rid).stalled == 0
        env.clock.advance(10)


def test_user_errors_fail_at_once_with_the_reason(env):
    rid = env.add()
    m = env.manager()
    m.poll_once()
    msg = ("Job entrypoint command failed with exit code 2, last available logs:\nusage: styleray train ...\n"
           "styleray train: error: --data /gone does not exist or is not a folder (run `styleray prepare` first)\n")
    env.jobs.end(sid(env, rid, 1), "FAILED", 2, msg)
    m.poll_once()
    env.clock.advance(1000)
    m.poll_once()
    req = env.queue.get(rid)
    assert req.state == State.FAILED and req.attempts == 1 and "--data /gone does not exist" in req.last_error


def test_priority_order_and_max_running(env):
    low, high, mid = env.add("low", priority=0), env.add("high", priority=9), env.add("mid", priority=5)
    m = env.manager(max_running=2)
    m.poll_once()
    assert env.jobs.submissions == [sid(env, high, 1), sid(env, mid, 1)]
    env.runs.at("/runs/high", 1.0)
    env.jobs.end(sid(env, high, 1), "SUCCEEDED", 0)
    m.poll_once()
    assert env.jobs.submissions[-1] == sid(env, low, 1)


def test_an_interrupted_request_keeps_its_slot(env):
    first = env.add("first", priority=1)
    m = env.manager(max_running=1)
    m.poll_once()
    second = env.add("second", priority=9)
    env.jobs.end(sid(env, first, 1), "STOPPED")
    m.poll_once()
    assert env.queue.get(second).state == State.QUEUED  # no preemption of the interrupted one's slot
    env.clock.advance(10)
    m.poll_once()
    assert env.queue.get(first).state == State.RETRYING and env.queue.get(second).state == State.QUEUED


def test_cancel_stops_the_job_and_stays_cancelled(env):
    rid = env.add()
    m = env.manager()
    m.poll_once()
    req, att = env.queue.cancel(rid)
    assert req.state == State.CANCELLED and att.submission_id == sid(env, rid, 1)
    m.poll_once()
    assert env.jobs.jobs[sid(env, rid, 1)].status == "STOPPED"
    m.poll_once()
    assert env.queue.get(rid).state == State.CANCELLED and env.queue.current_attempt(rid).status == "STOPPED"
    assert len(env.jobs.submissions) == 1


def test_a_job_the_cluster_forgot_is_an_interruption(env):
    rid = env.add()
    m = env.manager()
    m.poll_once()
    env.jobs.jobs.clear()  # the head node restarted: its job table is gone
    m.poll_once()
    req = env.queue.get(rid)
    assert req.state == State.INTERRUPTED and "no longer knows" in req.last_error
    assert env.queue.current_attempt(rid).status == "LOST"


def test_an_unreachable_cluster_changes_nothing(env, caplog):
    rid = env.add()
    m = env.manager()
    m.poll_once()
    env.jobs.down = True
    for _ in range(3):
        m.poll_once()
    assert env.queue.get(rid).state == State.RUNNING
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # said once, not every round
    env.jobs.down = False
    env.runs.at("/runs/r", 1.0)
    env.jobs.end(sid(env, rid, 1), "SUCCEEDED", 0)
    m.poll_once()
    assert env.queue.get(rid).state == State.SUCCEEDED


def test_only_one_manager_drives_a_queue(env):
    from styleray.platform.manager import LeaseHeld, LeaseLost

    first = env.manager()
    first.start()
    env.queue._db.execute("UPDATE manager SET pid = ?", (os.getppid(),))  # as if it were another live process
    with pytest.raises(LeaseHeld, match="another manager"):
        env.manager().start()
    env.clock.advance(100)  # silent for longer than 3 polls (90 s): its lease is stale
    second = env.manager()
    second.start()
    assert "took over" in env.queue.events()[-2].detail
    with pytest.raises(LeaseLost):
        first.poll_once()
    second.close()
    assert env.queue.lease() is None


@pytest.mark.parametrize(
    "job, reached, outcome, words",
    [
        (JobState("SUCCEEDED", exit_code=0), True, "succeeded", "target"),
        (JobState("SUCCEEDED", exit_code=0), False, "interrupted", "before the target"),
        (JobState("STOPPED"), False, "interrupted", "stopped"),
        (JobState("FAILED", exit_code=-9), False, "interrupted", "signal 9"),
        (JobState("FAILED", exit_code=137), False, "interrupted", "killed"),
        (JobState("FAILED", exit_code=1, message="PlacementTimeout: no room"), False, "interrupted", "exit code 1"),
        (JobState("FAILED", exit_code=2, message="x\nstyleray train: error: --batch 5 bad"), False, "failed",
         "--batch 5"),
        (JobState("FAILED", exit_code=127, message="styleray: not found"), False, "failed", "PATH"),
        (JobState("FAILED", exit_code=1, message="ERROR training became unstable (nan) and --max-rollbacks 3 is spent"),
         False, "failed", "diverged"),
        (JobState("FAILED", error_type="RUNTIME_ENV_SETUP_FAILURE", message="pip failed"), False, "failed",
         "runtime env"),
        (JobState("FAILED", error_type="JOB_SUPERVISOR_ACTOR_DIED", message="node died"), False, "interrupted",
         "node died"),
    ],
)
def test_how_an_ended_job_is_judged(job, reached, outcome, words):
    verdict = classify(job, reached_target=reached)
    assert verdict.outcome == outcome and words in verdict.reason


def test_error_line_picks_the_error():
    message = "Job failed, last available logs:\nfoo\nstyleray train: error: bad\nbye"
    assert error_line(message) == "styleray train: error: bad"
    assert error_line("") == "no message"


def test_options_name_the_flag():
    with pytest.raises(ValueError, match="--max-running 0"):
        ManagerOptions(max_running=0)
    with pytest.raises(ValueError, match="http://HEAD:8265"):
        ManagerOptions(address="127.0.0.1:6379")


def test_run_rides_out_a_failed_round_and_stops_when_asked(env):
    import sqlite3
    import threading

    stop, rounds = threading.Event(), []
    m = env.manager(poll_s=0.01)
    real = m.poll_once

    def flaky():
        rounds.append(1)
        if len(rounds) == 1:
            raise sqlite3.OperationalError("database is locked")
        if len(rounds) == 3:
            stop.set()  # what SIGTERM does in `styleray manager`
        real()

    m.poll_once = flaky
    m.run(stop)
    assert len(rounds) == 3 and env.queue.lease() is None  # the lease is released on the way out
