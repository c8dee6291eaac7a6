"""The manager's control loop: take requests from the queue, run them as Ray jobs, resume interrupted ones.

One ``poll_once`` (every ``--poll`` seconds):

    watch      every running/retrying request: its attempt's Ray job status, the run's progress (metrics.jsonl,
               newest checkpoint); a retrying request turns running at its first tick after the restart, and
               the seconds from the interruption to that tick are recorded on the attempt
    judge      an ended job (jobs.classify): succeeded at the target kimg; failed for good (user error,
               divergence: the reason goes on the request); or interrupted (stopped, driver killed, node or
               head lost): due again after a backoff, resumed from the last checkpoint by resubmitting the same
               `styleray train` command with --resume latest (training does only the remaining kimg)
    stop       jobs of cancelled requests
    launch     due retries first (an interrupted request keeps its slot), then queued requests by priority
               (high first, then oldest), up to --max-running

Exactly-once submission. Attempt N of request R has the submission id ``styleray-<queue id>-r<R>-a<N>``. The
attempt is written to the queue (status SUBMITTING) *before* it is submitted, and confirmed after. A manager
that crashes in between finds, when it (or another) starts again, an unconfirmed attempt: if the cluster
knows that id the job is adopted, otherwise it is submitted now under the same id; a second submission of
the same id is refused by Ray and adopted too. So no attempt ever runs twice.

Bounded retries. An interrupted attempt that ended without a new checkpoint counts as stalled; after
``max_attempts`` stalled attempts in a row the request fails (progress resets the count, so a long run on
spot instances can be interrupted any number of times). The backoff doubles with each stalled attempt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from styleray import storage
from styleray.platform.manager.jobs import (
    JobsAuthError,
    JobsUnavailable,
    SubmitRejected,
    Verdict,
    classify,
    error_line,
)
from styleray.platform.manager.progress import Progress, read_progress
from styleray.platform.manager.queue import (
    ACTIVE,
    HOLDS_SLOT,
    LOST,
    Attempt,
    Queue,
    Request,
    State,
)
from styleray.platform.manager.requests import train_argv
from styleray.settings import SettingsError

log = logging.getLogger(__name__)

KIMG_EPS = 1e-6
MAX_FAILED_ROUNDS = 10  # rounds in a row that raise before the manager gives up (a bug, not a hiccup)


class LeaseLost(RuntimeError):
    """Another manager took over this queue."""


@dataclass(frozen=True)
class ManagerOptions:
    address: str | None = None  # Jobs API, http://HEAD:8265; None: Ray's default (RAY_ADDRESS, or inside a job)
    max_running: int = 1  # requests holding the cluster at once
    poll_s: float = 30.0  # seconds between polls
    backoff_s: float = 30.0  # wait before resubmitting an interrupted request; doubles per stalled attempt
    backoff_max_s: float = 900.0  # the longest backoff
    entrypoint: str = "styleray train"  # the command each attempt runs, before the request's train flags
    runtime_env: dict[str, Any] | None = None  # Ray runtime_env of every job (working_dir, py_modules, env_vars)
    entrypoint_num_cpus: float | None = None  # CPUs reserved for the job's driver (None: Ray's default, 0)
    stale_after_s: float | None = None  # another manager's lease is stale after this silence (None: 3 polls, >= 30s)

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"--max-running {self.max_running} must be >= 1")
        if not self.poll_s > 0:
            raise ValueError(f"--poll {self.poll_s} must be > 0 seconds")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"--backoff {self.backoff_s} must be >= 0 and <= --backoff-max {self.backoff_max_s}")
        if self.address is not None and not self.address.startswith(("http://", "https://")):
            raise ValueError(
                f"--address {self.address} must be the Jobs API (dashboard) URL, e.g. http://HEAD:8265 "
                "(not the GCS address HOST:6379)"
            )

    @property
    def lease_stale_s(self) -> float:
        return self.stale_after_s if self.stale_after_s is not None else max(3 * self.poll_s, 30.0)


def submission_id(queue_id: str, request_id: int, attempt: int) -> str:
    """The Ray submission id of attempt ``attempt`` of a request: the same on every manager, every time."""
    return f"styleray-{queue_id}-r{request_id}-a{attempt}"


def build_runtime_env(*, ship_package: bool = False, working_dir: str | None = None,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The runtime_env of the training jobs: ``extra`` (a user's runtime_env), the S3 endpoint and region
    (not credentials: those belong to the cluster), and optionally this machine's styleray package
    (``py_modules``, so the cluster runs exactly this code) or a working_dir."""
    env: dict[str, Any] = dict(extra or {})
    env_vars = storage.forwarded_env()
    env_vars.update(env.get("env_vars") or {})
    if env_vars:
        env["env_vars"] = env_vars
    if ship_package:
        import styleray

        env["py_modules"] = list(env.get("py_modules") or []) + [os.path.dirname(os.path.abspath(styleray.__file__))]
    if working_dir:
        if not os.path.isdir(working_dir) and "://" not in working_dir:
            raise ValueError(f"--working-dir {working_dir} is not a folder (or a remote URI)")
        env["working_dir"] = os.path.abspath(working_dir) if "://" not in working_dir else working_dir
    return env


class Manager:
    """Drives one queue on one cluster. ``poll_once`` is one step; ``run`` loops until stopped."""

    def __init__(
        self,
        queue: Queue,
        jobs,  # RayJobs, or anything with its info/submit/stop methods
        options: ManagerOptions,
        *,
        clock: Callable[[], float] = time.time,
        progress: Callable[[str], Progress] = read_progress,
    ):
        self.queue, self.jobs, self.options = queue, jobs, options
        self.clock, self.read_progress = clock, progress
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._started = False
        self._unavailable: str | None = None
        self._stopping: set[str] = set()  # jobs this manager has asked to stop

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take the queue's lease (LeaseHeld if a live manager has it)."""
        self.queue.acquire_lease(
            owner=self.owner, address=self.options.address, poll_s=self.options.poll_s,
            stale_after_s=self.options.lease_stale_s,
        )
        self._started = True
        log.info(
            "managing %s on %s: --max-running %d, --poll %gs, --backoff %gs..%gs",
            self.queue.path, self.options.address or "the default Ray address", self.options.max_running,
            self.options.poll_s, self.options.backoff_s, self.options.backoff_max_s,
        )

    def close(self) -> None:
        if self._started:
            self.queue.release_lease(self.owner)
            self._started = False

    def run(self, stop: threading.Event | None = None, *, once: bool = False) -> None:
        """Poll until ``stop`` is set (SIGTERM in the CLI) or, with ``once``, a single time."""
        stop = stop or threading.Event()
        self.start()
        errors = 0
        try:
            while True:
                began = self.clock()
                try:
                    self.poll_once()
                    errors = 0
                except (LeaseLost, JobsAuthError):
                    raise
                except Exception:  # noqa: BLE001 - a daemon rides out a locked database or a storage hiccup
                    errors += 1
                    log.exception("round failed (%d in a row of at most %d)", errors, MAX_FAILED_ROUNDS)
                    if once or errors >= MAX_FAILED_ROUNDS:
                        raise
                if once or stop.wait(max(0.0, self.options.poll_s - (self.clock() - began))):
                    break
        finally:
            self.close()

    def poll_once(self) -> None:
        """One round: watch and judge active requests, stop cancelled jobs, launch what is due."""
        if not self._started:
            self.start()
        if not self.queue.heartbeat(self.owner):
            self._started = False
            raise LeaseLost(f"another manager took over {self.queue.path}; this one stops")
        try:
            for req in self.queue.list(ACTIVE):
                self._watch(req)
            for req, att in self.queue.unfinished_attempts_of((State.CANCELLED, State.FAILED, State.SUCCEEDED)):
                self._stop_leftover(req, att)
            self._launch()
        except JobsUnavailable as e:
            if self._unavailable != str(e):
                log.warning("the cluster is unavailable; nothing decided this round: %s", e)
                self.queue.event(None, "unavailable", str(e))
            self._unavailable = str(e)
            return
        if self._unavailable:
            log.info("the cluster is reachable again")
            self._unavailable = None

    # ------------------------------------------------------------------------------------------ decisions

    def _decide(self, req: Request, expected, new: State, kind: str, detail: str, **fields) -> bool:
        ok = self.queue.transition(req.id, expected, new, event=(kind, detail), **fields)
        if ok:
            log.info("request %d (%s): %s -> %s: %s", req.id, req.name, req.state.value, new.value, detail)
        else:
            log.info("request %d (%s) changed meanwhile; not %s", req.id, req.name, kind)
        return ok

    def _note(self, req: Request, kind: str, detail: str) -> None:
        log.info("request %d (%s): %s", req.id, req.name, detail)
        self.queue.event(req.id, kind, detail)

    def _progress(self, req: Request) -> Progress:
        try:
            p = self.read_progress(req.out)
        except Exception as e:  # noqa: BLE001 - storage hiccups must not stop the loop; retried next poll
            log.warning("request %d: cannot read progress from %s: %s", req.id, req.out, e)
            return Progress(kimg=req.kimg, checkpoint=req.checkpoint, checkpoint_kimg=req.checkpoint_kimg)
        changed = (p.kimg, p.checkpoint) != (req.kimg, req.checkpoint)
        if changed and (p.kimg is not None or p.checkpoint is not None):
            self.queue.update(req.id, kimg=p.kimg, checkpoint=p.checkpoint, checkpoint_kimg=p.checkpoint_kimg)
        return p

    # ------------------------------------------------------------------------------------------ watch

    def _watch(self, req: Request) -> None:
        att = self.queue.current_attempt(req.id)
        if att is None:  # cannot happen through this module; repair rather than stall
            self._decide(req, req.state, State.QUEUED, "repaired", "active without an attempt: queued again")
            return
        job = self.jobs.info(att.submission_id)
        now = self.clock()
        if job is None:
            if att.submitted_at is None:
                self._note(req, "resubmit", f"attempt {att.attempt} was recorded but never confirmed: submitting "
                                            f"{att.submission_id} now")
                self._submit(req, att)
                return
            att = self.queue.update_attempt(att, status=LOST, job_ended_at=now,
                                            message="the cluster no longer knows this job")
            progress = self._progress(req)
            att = self.queue.update_attempt(att, end_kimg=progress.checkpoint_kimg)
            self._ended(req, att, Verdict("interrupted", f"the cluster no longer knows job {att.submission_id} "
                                                         "(its head node restarted?)"), now)
            return
        if att.submitted_at is None:
            att = self.queue.update_attempt(att, submitted_at=job.start_time or now)
            self._note(req, "adopted", f"{att.submission_id} had reached the cluster before a manager stopped: adopted")
        progress = self._progress(req)
        if job.status != att.status and not job.terminal:
            att = self.queue.update_attempt(att, status=job.status, job_started_at=job.start_time)
        if req.state == State.RETRYING:
            if self._check_resumed(req, att, progress):
                req = self.queue.get(req.id)
        if not job.terminal:
            return
        att = self.queue.update_attempt(
            att, status=job.status, job_started_at=job.start_time, job_ended_at=job.end_time or now,
            exit_code=job.exit_code, end_kimg=progress.checkpoint_kimg,
            message=None if job.status == "SUCCEEDED" else error_line(job.message),
        )
        reached = progress.checkpoint_kimg is not None and progress.checkpoint_kimg >= req.target_kimg - KIMG_EPS
        self._ended(req, att, classify(job, reached_target=reached), att.job_ended_at or now)

    def _check_resumed(self, req: Request, att: Attempt, progress: Progress) -> bool:
        tick = progress.first_tick_after(att.submitted_at or att.created_at)
        if tick is None:
            return False
        resumed_at = float(tick["time"])
        recovery = resumed_at - att.interrupted_at if att.interrupted_at else None
        self.queue.update_attempt(att, resumed_at=resumed_at, recovery_s=recovery)
        since = f", {recovery:.1f}s after the interruption" if recovery is not None else ""
        start = f"{att.start_kimg:.3f}" if att.start_kimg is not None else "none"
        return self._decide(
            req, State.RETRYING, State.RUNNING, "resumed",
            f"attempt {att.attempt} trains again: tick at {float(tick['kimg']):.3f} kimg "
            f"(checkpoint {start} kimg){since}",
        )

    def _ended(self, req: Request, att: Attempt, verdict: Verdict, ended_at: float) -> None:
        req = self.queue.get(req.id)
        if req.state not in ACTIVE:
            return  # cancelled meanwhile
        sid = att.submission_id
        if verdict.outcome == "succeeded":
            self._decide(req, ACTIVE, State.SUCCEEDED, "succeeded",
                         f"{sid} reached {att.end_kimg:.3f} of {req.target_kimg:g} kimg", last_error=None)
            return
        if verdict.outcome == "failed":
            self._decide(req, ACTIVE, State.FAILED, "failed", f"{sid}: {verdict.reason}", last_error=verdict.reason)
            return
        progressed = att.end_kimg is not None and (att.start_kimg is None or att.end_kimg > att.start_kimg + KIMG_EPS)
        stalled = 0 if progressed else req.stalled + 1
        if stalled >= req.max_attempts:
            reason = (f"interrupted {stalled} time(s) in a row without a new checkpoint (--max-attempts "
                      f"{req.max_attempts}); last: {verdict.reason}")
            self._decide(req, ACTIVE, State.FAILED, "failed", f"{sid}: {reason}", last_error=reason, stalled=stalled)
            return
        delay = min(self.options.backoff_s * 2 ** max(stalled - 1, 0), self.options.backoff_max_s)
        at = f"{att.end_kimg:.3f}" if att.end_kimg is not None else "no"
        self._decide(
            req, ACTIVE, State.INTERRUPTED, "interrupted",
            f"{sid}: {verdict.reason}; checkpoint at {at} kimg; resuming in {delay:g}s", last_error=verdict.reason,
            stalled=stalled, retry_at=self.clock() + delay,
        )

    def _stop_leftover(self, req: Request, att: Attempt) -> None:
        """The job of a request that finished or was cancelled while the job may still run."""
        job = self.jobs.info(att.submission_id)
        if job is None:
            self.queue.update_attempt(att, status="STOPPED" if att.submitted_at is None else LOST,
                                      job_ended_at=self.clock(), message=f"request {req.state.value}")
        elif job.terminal:
            self.queue.update_attempt(att, status=job.status, job_ended_at=job.end_time, exit_code=job.exit_code)
        elif att.submission_id not in self._stopping:  # ask once; Ray escalates to SIGKILL by itself
            self._stopping.add(att.submission_id)
            if self.jobs.stop(att.submission_id):
                self._note(req, "stopping", f"request {req.state.value}: stopping {att.submission_id}")

    # ------------------------------------------------------------------------------------------ launch

    def _launch(self) -> None:
        now = self.clock()
        for req in self.queue.list((State.INTERRUPTED,)):  # they keep their slots
            if req.retry_at is None or req.retry_at <= now:
                self._start(req)
        tried: set[int] = set()
        while self.queue.count(HOLDS_SLOT) < self.options.max_running:
            req = self.queue.next_queued()
            if req is None or req.id in tried:
                break
            tried.add(req.id)
            self._start(req)

    def _start(self, req: Request) -> bool:
        progress = self._progress(req)
        n = req.attempts + 1
        # a resume: the run's own checkpoints, whatever attempt 1 resumed from
        resume = "latest" if n > 1 and progress.checkpoint is not None else None
        try:
            argv = train_argv(req.settings, resume=resume)
        except SettingsError as e:  # stored by an older styleray, or edited by hand
            self._decide(req, (State.QUEUED, State.INTERRUPTED), State.FAILED, "failed", str(e), last_error=str(e))
            return False
        entrypoint = f"{self.options.entrypoint} {shlex.join(argv)}"
        prev = self.queue.current_attempt(req.id)
        att = self.queue.start_attempt(
            req, submission_id=submission_id(self.queue.queue_id, req.id, n), entrypoint=entrypoint,
            new_state=State.RUNNING if n == 1 else State.RETRYING, start_kimg=progress.checkpoint_kimg,
            interrupted_at=prev.job_ended_at if prev is not None else None,
        )
        if att is None:
            return False
        start = f"from checkpoint {progress.checkpoint_kimg:.3f} kimg" if progress.checkpoint else "from scratch"
        log.info("request %d (%s): attempt %d %s -> %s", req.id, req.name, n, start, att.submission_id)
        self._submit(self.queue.get(req.id), att)
        return True

    def _submit(self, req: Request, att: Attempt) -> None:
        metadata = {
            "styleray_queue": self.queue.queue_id,
            "styleray_request": str(req.id),
            "styleray_attempt": str(att.attempt),
            "styleray_name": req.name[:100],
        }
        try:
            fresh = self.jobs.submit(
                att.submission_id, att.entrypoint, runtime_env=self.options.runtime_env, metadata=metadata,
                entrypoint_num_cpus=self.options.entrypoint_num_cpus,
            )
        except SubmitRejected as e:
            self.queue.update_attempt(att, status="FAILED", message=str(e), job_ended_at=self.clock())
            self._decide(req, ACTIVE, State.FAILED, "failed", str(e), last_error=str(e))
            return
        except JobsUnavailable as e:
            self._note(req, "submit-later", f"{att.submission_id} not submitted yet ({e}); next poll tries again")
            return
        self.queue.update_attempt(att, status="PENDING", submitted_at=self.clock())
        how = "submitted" if fresh else "was already on the cluster: adopted"
        self._note(req, "submitted" if fresh else "adopted", f"{att.submission_id} {how}: {att.entrypoint}")


def options_from(**kwargs) -> ManagerOptions:
    """ManagerOptions from keyword arguments, ignoring None (the CLI's unset flags)."""
    fields = {f.name for f in dataclasses.fields(ManagerOptions)}
    return ManagerOptions(**{k: v for k, v in kwargs.items() if k in fields and v is not None})
