"""`styleray queue ...` and `styleray manager`: what the CLI's thin handlers call. The queue actions return the
text the command prints."""

from __future__ import annotations

import json
import logging
import signal
import threading

from styleray.platform.manager import report
from styleray.platform.manager.queue import Queue

log = logging.getLogger(__name__)


def queue_add(db: str | None, settings: dict, *, name: str | None, priority: int = 0, max_attempts: int = 5,
              check_data: bool = True, unknown_flags: list[str] | None = None) -> str:
    """Check a request and add it (a rejected one is recorded as failed, and ValueError says why)."""
    from styleray.platform.manager.requests import check_request

    if not name:
        raise ValueError("--name is required (or `name:` in --config)")
    spec = check_request(str(name), settings, priority=int(priority), max_attempts=int(max_attempts),
                         check_data=check_data, unknown_flags=unknown_flags)
    with Queue(db) as queue:
        req = queue.add(
            name=spec.name, settings=spec.settings, out=spec.out, target_kimg=spec.target_kimg, data=spec.data,
            config=spec.config, priority=spec.priority, max_attempts=spec.max_attempts, error=spec.error,
        )
        if spec.error:
            raise ValueError(f"request {req.id} ({req.name}) rejected and recorded as failed: {spec.error}")
        return (f"queued request {req.id} ({req.name}): {req.target_kimg:g} kimg into {req.out}, "
                f"priority {req.priority} [{queue.path}]")


def queue_list(db: str | None, *, active_only: bool = False, as_json: bool = False) -> str:
    with Queue(db) as queue:
        if as_json:
            rows = [{**r.__dict__, "state": r.state.value} for r in queue.list()]
            return json.dumps(rows, indent=2, default=str)
        return report.list_table(queue, all_=not active_only)


def queue_show(db: str | None, ref: str | int) -> str:
    """`queue show ID|NAME` (a name: its newest request)."""
    with Queue(db) as queue:
        return report.show(queue, queue.find(ref).id)


def queue_cancel(db: str | None, request_id: int, *, address: str | None = None) -> str:
    with Queue(db) as queue:
        req, att = queue.cancel(request_id)
        if att is None:
            return f"cancelled request {req.id} ({req.name})"
        lease = queue.lease()
        address = address or (lease.address if lease is not None else None)
        later = f"the manager stops job {att.submission_id} at its next poll"
        if not address:
            return f"cancelled request {req.id} ({req.name}); {later} (or pass --address http://HEAD:8265)"
        from styleray.platform.manager.jobs import JobsAuthError, JobsUnavailable, RayJobs

        try:
            stopped = RayJobs(address).stop(att.submission_id)
        except (JobsUnavailable, JobsAuthError) as e:
            return f"cancelled request {req.id} ({req.name}); could not stop the job now ({e}): {later}"
        queue.event(req.id, "stopping", f"`styleray queue cancel` stopped {att.submission_id}")
        return (f"cancelled request {req.id} ({req.name}); {'stopping' if stopped else 'no running'} job "
                f"{att.submission_id}")


def run_manager(db: str | None, *, address: str | None = None, max_running: int = 1, poll_s: float = 30.0,
                backoff_s: float = 30.0, backoff_max_s: float = 900.0, once: bool = False, ship_package: bool = False,
                working_dir: str | None = None, runtime_env_file: str | None = None,
                entrypoint_num_cpus: float | None = None) -> int:
    """Drive the queue until SIGTERM/SIGINT (or one round with ``once``); 1 when the lease was lost."""
    from styleray.platform.manager.control import LeaseLost, Manager, build_runtime_env, options_from
    from styleray.platform.manager.jobs import RayJobs
    from styleray.platform.manager.queue import LeaseHeld

    extra = _read_runtime_env(runtime_env_file) if runtime_env_file else None
    options = options_from(
        address=address, max_running=max_running, poll_s=poll_s, backoff_s=backoff_s, backoff_max_s=backoff_max_s,
        entrypoint_num_cpus=entrypoint_num_cpus,
        runtime_env=build_runtime_env(ship_package=ship_package, working_dir=working_dir, extra=extra) or None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # `ray job stop` sends SIGTERM: finish the round, release the lease
        signal.signal(sig, lambda *_: stop.set())
    with Queue(db) as queue:
        manager = Manager(queue, RayJobs(options.address), options)
        try:
            manager.run(stop, once=once)
        except LeaseHeld as e:
            raise ValueError(str(e)) from None
        except LeaseLost as e:
            log.error("%s", e)
            return 1
    return 0


def _read_runtime_env(path: str) -> dict:
    from styleray.settings import read_yaml  # YAML is a superset of JSON

    extra = read_yaml(path, "--runtime-env")
    if not isinstance(extra, dict):
        raise ValueError(f"--runtime-env {path}: expected a mapping (a Ray runtime_env)")
    return extra
