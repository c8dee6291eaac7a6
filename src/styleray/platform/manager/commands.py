"""`styleray queue ...` and `styleray manager`: what the CLI's thin handlers call."""

from __future__ import annotations

import json
import logging
import signal
import threading

from styleray.platform.manager import report
from styleray.platform.manager.queue import Queue

log = logging.getLogger(__name__)


def queue_add(args) -> int:
    from styleray.platform.manager.requests import check_request, load_yaml

    fields: dict = {}
    train_args: list[str] = []
    if args.config:
        fields, train_args = load_yaml(args.config)
    train_args += list(args.train_args or [])  # flags on the command line override the file's
    name = args.name or fields.get("name")
    if not name:
        raise ValueError("--name is required (or `name:` in --config)")
    priority = args.priority if args.priority is not None else int(fields.get("priority", 0))
    max_attempts = args.max_attempts if args.max_attempts is not None else int(fields.get("max_attempts", 5))
    spec = check_request(str(name), train_args, priority=priority, max_attempts=max_attempts,
                         check_data=not args.no_check)
    with Queue(args.db) as queue:
        req = queue.add(
            name=spec.name, train_args=spec.train_args, out=spec.out, target_kimg=spec.target_kimg, data=spec.data,
            config=spec.config, priority=spec.priority, max_attempts=spec.max_attempts, error=spec.error,
        )
        if spec.error:
            raise ValueError(f"request {req.id} ({req.name}) rejected and recorded as failed: {spec.error}")
        print(f"queued request {req.id} ({req.name}): {req.target_kimg:g} kimg into {req.out}, priority {req.priority} "
              f"[{queue.path}]")
    return 0


def queue_list(args) -> int:
    with Queue(args.db) as queue:
        if args.json:
            rows = [{**r.__dict__, "state": r.state.value, "train_args": list(r.train_args)} for r in queue.list()]
            print(json.dumps(rows, indent=2, default=str))
        else:
            print(report.list_table(queue, all_=not args.active))
    return 0


def queue_show(args) -> int:
    with Queue(args.db) as queue:
        print(report.show(queue, args.id))
    return 0


def queue_cancel(args) -> int:
    with Queue(args.db) as queue:
        req, att = queue.cancel(args.id)
        if att is None:
            print(f"cancelled request {req.id} ({req.name})")
            return 0
        lease = queue.lease()
        address = args.address or (lease.address if lease is not None else None)
        later = f"the manager stops job {att.submission_id} at its next poll"
        if not address:
            print(f"cancelled request {req.id} ({req.name}); {later} (or pass --address http://HEAD:8265)")
            return 0
        from styleray.platform.manager.jobs import JobsAuthError, JobsUnavailable, RayJobs

        try:
            stopped = RayJobs(address).stop(att.submission_id)
        except (JobsUnavailable, JobsAuthError) as e:
            print(f"cancelled request {req.id} ({req.name}); could not stop the job now ({e}): {later}")
            return 0
        queue.event(req.id, "stopping", f"`styleray queue cancel` stopped {att.submission_id}")
        print(f"cancelled request {req.id} ({req.name}); {'stopping' if stopped else 'no running'} job "
              f"{att.submission_id}")
    return 0


def run_manager(args) -> int:
    from styleray.platform.manager.control import LeaseLost, Manager, build_runtime_env, options_from
    from styleray.platform.manager.jobs import RayJobs
    from styleray.platform.manager.queue import LeaseHeld

    extra = None
    if args.runtime_env:
        import yaml

        with open(args.runtime_env, encoding="utf-8") as f:
            extra = yaml.safe_load(f)
        if not isinstance(extra, dict):
            raise ValueError(f"--runtime-env {args.runtime_env}: expected a mapping (a Ray runtime_env)")
    options = options_from(
        address=args.address, max_running=args.max_running, poll_s=args.poll, backoff_s=args.backoff,
        backoff_max_s=args.backoff_max, entrypoint_num_cpus=args.entrypoint_num_cpus,
        runtime_env=build_runtime_env(ship_package=args.ship_package, working_dir=args.working_dir, extra=extra)
        or None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # `ray job stop` sends SIGTERM: finish the round, release the lease
        signal.signal(sig, lambda *_: stop.set())
    with Queue(args.db) as queue:
        manager = Manager(queue, RayJobs(options.address), options)
        try:
            manager.run(stop, once=args.once)
        except LeaseHeld as e:
            raise ValueError(str(e)) from None
        except LeaseLost as e:
            log.error("%s", e)
            return 1
    return 0
