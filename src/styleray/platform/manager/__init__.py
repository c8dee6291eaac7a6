"""The training manager: a durable queue of training requests driven to completion through Ray Jobs.

    queue.py     the SQLite queue (requests, attempts, events, the manager's lease)
    requests.py  a request = `styleray train` flags (or a YAML file), checked on arrival
    jobs.py      the Ray Jobs API (token auth, timeouts, error sorting) and how an ended job is judged
    progress.py  where a run stands: metrics.jsonl and the newest committed checkpoint
    control.py   the loop: submit, watch, resume interrupted runs from their checkpoint, exactly once
    report.py    `styleray queue list` / `queue show`

Nothing here imports Ray or torch at import time.
"""

from styleray.platform.manager.control import LeaseLost, Manager, ManagerOptions, build_runtime_env, submission_id
from styleray.platform.manager.queue import Attempt, LeaseHeld, Queue, QueueError, Request, State

__all__ = [
    "Attempt", "LeaseHeld", "LeaseLost", "Manager", "ManagerOptions", "Queue", "QueueError", "Request", "State",
    "build_runtime_env", "submission_id",
]
