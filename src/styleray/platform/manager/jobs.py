"""The Ray Jobs API as the manager needs it: submit an attempt once, watch it, stop it, judge how it ended.

``RayJobs`` wraps ``ray.job_submission.JobSubmissionClient``:
  - token auth: the cluster's token (``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, or
    ``~/.ray/auth_token``, as Ray itself looks for it) is sent as a bearer header, so the manager works
    whether or not its own environment says ``RAY_AUTH_MODE=token``; a refusal names the fix;
  - every HTTP request has a timeout (the SDK has none, and a hung dashboard must not hang the manager);
  - errors are sorted into: not found (None), already submitted (False), the cluster is unreachable or busy
    (JobsUnavailable: try again next poll), and a rejection that would only repeat (SubmitRejected).

``classify`` decides what an ended job means for its request: done, an interruption to resume from the last
checkpoint, or a failure that another attempt would only repeat (a bad flag, missing data, divergence).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 30.0
_STATUS = re.compile(r"status code (\d{3})")


class JobsUnavailable(RuntimeError):
    """The Jobs API cannot be reached or is not ready; nothing was decided, try again later."""


class JobsAuthError(ValueError):
    """The Jobs API refused our token (or wanted one)."""


class SubmitRejected(ValueError):
    """The Jobs API rejected a submission for a reason that would only repeat (e.g. a bad runtime_env)."""


@dataclass(frozen=True)
class JobState:
    """What the manager needs of Ray's JobDetails (times in Unix seconds)."""

    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    message: str = ""
    error_type: str | None = None
    metadata: dict[str, str] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "succeeded", "interrupted" or "failed"
    reason: str


# ---------------------------------------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------------------------------------


def auth_token() -> str | None:
    """The cluster token as Ray looks for it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token: {e.strerror or e}") from None
        if not token:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={path} is empty: it should hold the cluster's token")
        return token
    default = os.path.expanduser(os.path.join("~", ".ray", "auth_token"))
    if os.path.exists(default):
        with open(default, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


def _auth_error(address: str, e: Exception) -> JobsAuthError:
    have = "a token was sent but the cluster rejected it" if auth_token() else "no token was found"
    return JobsAuthError(
        f"the Jobs API at {address} refused the request ({have}): give the manager the cluster's token with "
        "RAY_AUTH_TOKEN_PATH=<file> or RAY_AUTH_TOKEN (on the head node `ray get-auth-token` prints it; "
        f"it lives in ~/.ray/auth_token there) [{e}]"
    )


# ---------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------


def _make_client(address: str | None, headers: dict[str, str], timeout_s: float):
    from ray.job_submission import JobSubmissionClient

    class _TimedClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):  # the SDK's one HTTP call site
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return _TimedClient(address, headers=headers or None)


class RayJobs:
    """The Jobs API of one cluster (``address``: http://HEAD:8265; None: Ray's default, e.g. inside a job)."""

    def __init__(self, address: str | None, *, timeout_s: float = HTTP_TIMEOUT_S):
        self.address = address
        self.timeout_s = timeout_s
        self._client = None

    def _api(self):
        if self._client is None:
            from ray.exceptions import AuthenticationError

            try:
                self._client = _make_client(self.address, _headers(), self.timeout_s)
            except AuthenticationError as e:
                raise _auth_error(self.address or "the default address", e) from None
            except (ConnectionError, RuntimeError, OSError) as e:
                where = self.address or "the default address"
                raise JobsUnavailable(f"cannot reach the Jobs API at {where}: {e}") from e
        return self._client

    def _call(self, fn, *args, **kwargs):
        """Run an SDK call, translating its errors (see module doc). Returns (status code or None, result)."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return None, fn(*args, **kwargs)
        except AuthenticationError as e:
            raise _auth_error(self.address or "the default address", e) from None
        except (requests.exceptions.RequestException, ConnectionError) as e:
            raise JobsUnavailable(f"Jobs API at {self.address}: {type(e).__name__}: {e}") from e
        except RuntimeError as e:
            m = _STATUS.search(str(e))
            if m is None:
                raise JobsUnavailable(f"Jobs API at {self.address}: {e}") from e
            return int(m.group(1)), str(e)

    def info(self, submission_id: str) -> JobState | None:
        """The job's state; None if the cluster does not know it."""
        code, res = self._call(self._api().get_job_info, submission_id)
        if code == 404 or (code is not None and "does not exist" in res):
            return None
        if code is not None:
            raise JobsUnavailable(f"Jobs API at {self.address}: {res}")
        return _job_state(res)

    def submit(self, submission_id: str, entrypoint: str, *, runtime_env: dict[str, Any] | None = None,
               metadata: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None) -> bool:
        """Submit under ``submission_id``; True if submitted now, False if that id already existed."""
        code, res = self._call(
            self._api().submit_job, entrypoint=entrypoint, submission_id=submission_id,
            runtime_env=runtime_env or None, metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus,
        )
        if code is None:
            return True
        if "already exists" in res:
            return False
        if 400 <= code < 500:
            raise SubmitRejected(f"the Jobs API rejected {submission_id}: {res}")
        raise JobsUnavailable(f"submitting {submission_id}: {res}")  # e.g. "No available agent", try again

    def stop(self, submission_id: str) -> bool:
        """Ask the job to stop (SIGTERM, then SIGKILL); False if it had already ended or is unknown."""
        code, res = self._call(self._api().stop_job, submission_id)
        if code is None:
            return bool(res)
        if code == 404 or "does not exist" in res:
            return False
        raise JobsUnavailable(f"stopping {submission_id}: {res}")

    def logs(self, submission_id: str) -> str:
        code, res = self._call(self._api().get_job_logs, submission_id)
        return "" if code is not None else res

    def list(self) -> list[tuple[str | None, JobState]]:
        """(submission id, state) of every job the cluster knows."""
        code, res = self._call(self._api().list_jobs)
        if code is not None:
            raise JobsUnavailable(f"listing jobs: {res}")
        return [(j.submission_id, _job_state(j)) for j in res]


def _headers() -> dict[str, str]:
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _job_state(d) -> JobState:
    ms = lambda t: t / 1000.0 if t else None  # noqa: E731 - Ray reports milliseconds
    status = getattr(d.status, "value", d.status)
    return JobState(
        status=str(status),
        start_time=ms(d.start_time),
        end_time=ms(d.end_time),
        exit_code=getattr(d, "driver_exit_code", None),
        message=d.message or "",
        error_type=getattr(getattr(d, "error_type", None), "value", getattr(d, "error_type", None)),
        metadata=dict(d.metadata or {}),
    )


# ---------------------------------------------------------------------------------------------------------
# How a job ended
# ---------------------------------------------------------------------------------------------------------

_PERMANENT_ERROR_TYPES = ("RUNTIME_ENV_SETUP_FAILURE",)


def error_line(message: str, limit: int = 600) -> str:
    """The line of a job's message/log tail that says what went wrong."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\berror:|Error\b|ERROR", ln) and "last available logs" not in ln:
            return ln[:limit]
    return (lines[-1] if lines else "no message")[:limit]


def classify(job: JobState, *, reached_target: bool) -> Verdict:
    """What an ended job means for its request (see module doc)."""
    code = job.exit_code
    if job.status == "SUCCEEDED":
        if reached_target:
            return Verdict("succeeded", "reached the target kimg")
        return Verdict("interrupted", "the job exited 0 before the target kimg")
    if job.status == "STOPPED":
        return Verdict("interrupted", "the job was stopped (ray job stop, or the cluster stopped it)")
    # FAILED
    if job.error_type in _PERMANENT_ERROR_TYPES:
        return Verdict("failed", f"the job's runtime env could not be set up: {error_line(job.message)}")
    if code == 2:  # `styleray train` exits 2 on a user error (bad flag or value, missing data)
        return Verdict("failed", f"styleray train rejected the request: {error_line(job.message)}")
    if code in (126, 127):
        return Verdict(
            "failed",
            f"the cluster could not run the entrypoint (exit {code}): is styleray installed there and on the PATH "
            "of the shell that ran `ray start`? (or pass --ship-package)",
        )
    if code == 1 and "became unstable" in job.message:
        return Verdict("failed", f"training diverged: {error_line(job.message)}")
    if code is not None and code < 0:
        return Verdict("interrupted", f"the job's driver was killed by signal {-code}")
    if code in (137, 143):
        return Verdict("interrupted", f"the job's driver was killed (exit {code})")
    if code is None:
        return Verdict("interrupted", f"the job failed without an exit code ({job.error_type or 'no type'}): "
                                      f"{error_line(job.message)}")
    return Verdict("interrupted", f"the job failed with exit code {code}: {error_line(job.message)}")
