"""CheckpointRegistry: the one place that says which checkpoint the sampler replicas should serve.

Per model name (one, ``default``, today; the registry is keyed by name so that several can be served later):

- the **published target**: what every replica should serve, with a version that grows on each publish.
  ``POST /v1/reload`` publishes only a checkpoint that one replica has already built and test-sampled
  (see ``styleray.serve.reload``), so a failed reload leaves the published target unchanged.
- the **good checkpoints**: every checkpoint some replica has served (they passed the build and the test
  sample), newest last. A replica that cannot build the published target (a file gone, a node that cannot
  reach it) serves the newest good one instead and says so; it never crashes for want of a model.
- the **replica reports**: each replica reports every poll (``ServeArgs.reload_poll_s``) what it serves
  and why not the target, if it does not. Reports double as heartbeats: the ingress waits for live replicas
  only, and ``/healthz`` lists the replicas that fell back.

A Serve deployment (one replica, no CPU) rather than a named actor, so that it lives and dies with the
application. Its state is in memory: if its process is restarted it starts again from the configured
checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ray import serve

DEFAULT_MODEL = "default"
MAX_GOOD = 8  # good checkpoints remembered per model


@dataclass
class ReplicaReport:
    version: int  # registry version whose target this replica has seen
    checkpoint: str  # URI of the checkpoint it serves
    error: str | None  # why it does not serve the target (it serves `checkpoint` instead), or None
    fallback: bool  # it serves an older good checkpoint because it could not build the target
    seen: float  # time.time() of the report


@dataclass
class ModelEntry:
    target: str  # what replicas should serve: a checkpoint folder (or, before the first pin, a run folder)
    version: int = 0
    good: dict[str, float] = field(default_factory=dict)  # checkpoint URI -> when first served (insertion order)
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)


@serve.deployment(
    name="CheckpointRegistry",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # replicas poll it every second
)
class CheckpointRegistry:
    def __init__(self, checkpoint: str, alive_s: float = 5.0, model: str = DEFAULT_MODEL):
        self._models = {model: ModelEntry(target=checkpoint)}
        self._alive_s = alive_s  # a replica not heard from for this long is no longer counted

    def target(self, model: str = DEFAULT_MODEL) -> tuple[int, str]:
        entry = self._models[model]
        return entry.version, entry.target

    def fallbacks(self, model: str = DEFAULT_MODEL) -> list[str]:
        """Good checkpoints, newest first: what a replica tries when it cannot build the target."""
        return list(reversed(self._models[model].good))

    def pin(self, version: int, target: str, resolved: str, model: str = DEFAULT_MODEL) -> None:
        """A replica resolved ``target`` (e.g. a run folder) to the checkpoint ``resolved``: make every other
        replica load exactly that one, even if training writes a newer checkpoint meanwhile."""
        entry = self._models[model]
        if version == entry.version and target == entry.target:
            entry.target = resolved

    def publish(self, checkpoint: str, model: str = DEFAULT_MODEL) -> int:
        """Make ``checkpoint`` (built and test-sampled by a replica already) the target; its new version."""
        entry = self._models[model]
        entry.version += 1
        entry.target = checkpoint
        return entry.version

    def report(
        self, replica: str, version: int, checkpoint: str, error: str | None = None, fallback: bool = False,
        model: str = DEFAULT_MODEL,
    ) -> None:
        entry = self._models[model]
        now = time.time()
        entry.replicas[replica] = ReplicaReport(version, checkpoint, error, fallback, now)
        if checkpoint == entry.target:  # the published one becomes the newest good one
            entry.good.pop(checkpoint, None)
        entry.good.setdefault(checkpoint, now)
        while len(entry.good) > MAX_GOOD:
            entry.good.pop(next(iter(entry.good)))

    def status(self, model: str = DEFAULT_MODEL) -> dict:
        entry = self._models[model]
        now = time.time()
        entry.replicas = {k: r for k, r in entry.replicas.items() if now - r.seen < 10 * self._alive_s}
        live = {k: asdict(r) for k, r in entry.replicas.items() if now - r.seen < self._alive_s}
        return {"version": entry.version, "target": entry.target, "replicas": live}
