"""CheckpointRegistry: the one place that says which checkpoint the generator replicas should serve.

``POST /v1/reload`` sets a new target here; every generator replica polls it (``ServeArgs.reload_poll_s``),
loads the new checkpoint next to the old one while it keeps serving, swaps, and reports back. The reports
double as heartbeats, so the ingress can wait until every live replica serves the new checkpoint and a
replica that was scaled away is not waited for. A new replica (autoscaling, restart) starts on the current
target, never on a stale one.

A Serve deployment (one replica, no CPU) rather than a named actor, so that it lives and dies with the
application.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ray import serve


@dataclass
class ReplicaReport:
    version: int  # registry version whose target this replica serves
    checkpoint: str  # URI of the checkpoint it serves
    error: str | None  # why loading the target failed (it keeps serving the previous checkpoint)
    seen: float  # time.time() of the report


@serve.deployment(
    name="CheckpointRegistry",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # replicas poll it every second
)
class CheckpointRegistry:
    def __init__(self, checkpoint: str, alive_s: float = 5.0):
        self._target = checkpoint  # what replicas should load: a checkpoint folder, or a run folder
        self._version = 0
        self._alive_s = alive_s  # a replica not heard from for this long is no longer counted
        self._replicas: dict[str, ReplicaReport] = {}

    def target(self) -> tuple[int, str]:
        return self._version, self._target

    def pin(self, version: int, target: str, resolved: str) -> None:
        """A replica resolved ``target`` (e.g. a run folder) to the checkpoint ``resolved``: make every other
        replica load exactly that one, even if training writes a newer checkpoint meanwhile."""
        if version == self._version and target == self._target:
            self._target = resolved

    def set_target(self, checkpoint: str) -> int:
        self._version += 1
        self._target = checkpoint
        return self._version

    def report(self, replica: str, version: int, checkpoint: str, error: str | None = None) -> None:
        self._replicas[replica] = ReplicaReport(version, checkpoint, error, time.time())

    def status(self) -> dict:
        now = time.time()
        self._replicas = {k: r for k, r in self._replicas.items() if now - r.seen < 10 * self._alive_s}
        live = {k: asdict(r) for k, r in self._replicas.items() if now - r.seen < self._alive_s}
        return {"version": self._version, "target": self._target, "replicas": live}
