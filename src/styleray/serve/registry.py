"""CheckpointRegistry: the one place that says which models exist and which checkpoint each should serve.

Per model name (``catalog.py`` says where names come from and how they are given):

- the **published target**: the checkpoint every replica holding the model should serve, with a version
  that grows on each publish. ``POST /v1/reload`` publishes only a checkpoint that one replica has already
  built and test-sampled (``reload.py``); a followed run's new choice (its ``best.json`` or newest committed
  checkpoint, seen by a scan) is published as it is found.
- the **good checkpoints**: every checkpoint some replica has served (they passed the build and the test
  sample), newest last. A replica that cannot build the published target serves the newest good one instead
  and says so; it never crashes for want of a model.
- the **replica reports**: each replica reports, every poll (``ServeArgs.reload_poll_s``), what it serves of
  each model it holds, and why not the target if it does not; a model it could not load at all is reported
  as a failure (``GET /v1/models`` shows it, the model answers 503). Reports double as heartbeats.

The catalog is scanned every ``scan_interval_s`` on a thread (storage is never read on the event loop): new
runs become models, removed runs stop being listed, duplicate names are logged with the rule that settled
them. With ``runs``, the registry writes ``ROOT/.styleray-served.json`` (``styleray.platform.served``) so
that ``styleray queue show`` can say under which name a run is served.

A Serve deployment (one replica, no CPU), living and dying with the application. Its state is in memory:
restarted, it starts again from the configuration and a fresh scan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from ray import serve

from styleray.serve.args import ServeArgs
from styleray.serve.catalog import (
    Choice,
    Source,
    UnknownModel,
    assign_names,
    choose_checkpoint,
    committed,
    describe,
    explicit_sources,
    find_runs,
    join,
)

log = logging.getLogger("ray.serve")

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
    source: Source
    target: str | None  # a checkpoint folder (or, before the first pin, a run folder); None: nothing committed yet
    version: int = 0
    good: dict[str, float] = field(default_factory=dict)  # checkpoint URI -> when first served (insertion order)
    replicas: dict[str, ReplicaReport] = field(default_factory=dict)
    failures: dict[str, tuple[str, float]] = field(default_factory=dict)  # replica -> (why nothing loads, seen)
    choice: Choice | None = None  # the scan's last choice (followed runs)
    listing: Choice | None = None  # the published target, described


@serve.deployment(
    name="CheckpointRegistry",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,
    logging_config={"enable_access_log": False},  # replicas poll it every second
)
class CheckpointRegistry:
    async def __init__(self, args: ServeArgs, alive_s: float = 5.0):
        self._args = args
        self._alive_s = alive_s  # a replica not heard from for this long is no longer counted
        self._policy = args.source_policy()
        self._explicit = explicit_sources(args.checkpoint, dict(args.models))
        self._models: dict[str, ModelEntry] = {}
        self._noted: set[str] = set()
        self._recorded: dict | None = None
        self.scans = 0
        await self.scan()
        self._scanner = asyncio.get_running_loop().create_task(self._scan_forever())

    # -- the catalog ---------------------------------------------------------------------------------------

    async def scan(self) -> int:
        """Look at the sources once (on a thread): new runs, new choices, removed runs. The scan count."""
        previous = {n: e.source.uri for n, e in self._models.items() if e.source.origin == "runs"}
        targets = {n: e.target for n, e in self._models.items() if e.listing is None or e.listing.checkpoint != e.target}
        sources, choices, notes, described = await asyncio.to_thread(self._survey, previous, targets)
        self._apply(sources, choices, described)
        for note in notes:
            if note not in self._noted:
                self._noted.add(note)
                log.warning("models: %s", note)
        if self._args.runs is not None:
            await self._write_record()
        self.scans += 1
        return self.scans

    def _survey(self, previous: dict[str, str], targets: dict[str, str | None]):
        """(sources, followed runs' choices, notes, descriptions of unlisted targets): storage reads only."""
        a = self._args
        found = {rel: choose_checkpoint(join(a.runs, rel)) for rel in find_runs(a.runs, a.scan_depth)} if a.runs else {}
        ready = [rel for rel, choice in found.items() if choice is not None]  # a run is listed once it has one
        sources, notes = assign_names(self._explicit, ready, a.runs or "", previous)
        if len(sources) > a.max_models:
            notes.append(f"{len(sources)} models found, serving the first {a.max_models} (max_models)")
            sources = sources[: a.max_models]
        choices = {s.name: found[s.relpath] if s.relpath else choose_checkpoint(s.uri) for s in sources if s.follow}
        described = {}
        for name, target in targets.items():
            choice = choices.get(name)
            if target is not None and (choice is None or choice.checkpoint != target) and committed(target):
                described[name] = describe(target, "configured")
        return sources, choices, notes, described

    def _apply(self, sources: list[Source], choices: dict[str, Choice | None], described: dict[str, Choice]) -> None:
        names = {s.name for s in sources}
        for gone in [n for n in self._models if n not in names]:
            log.info("model %s: %s is gone; no longer served", gone, self._policy.public(self._models.pop(gone).source.uri))
        for s in sources:
            entry = self._models.get(s.name)
            if entry is None:
                entry = self._models[s.name] = ModelEntry(s, None if s.follow else s.uri)
                log.info("model %s: %s (%s)", s.name, self._policy.public(s.uri), s.origin)
            choice = choices.get(s.name)
            if choice is not None and (entry.choice is None or choice.checkpoint != entry.choice.checkpoint):
                entry.choice = choice
                self._publish(entry, choice.checkpoint, choice)
                log.info("model %s: serves %s (%s, %.1f kimg)", s.name, self._policy.public(choice.checkpoint),
                         choice.chosen_by, choice.kimg)
            if s.name in described and entry.target == described[s.name].checkpoint:
                how = "reload" if s.follow or entry.version > 0 else "configured"
                entry.listing = replace(described[s.name], chosen_by=how)

    async def _scan_forever(self) -> None:
        while True:
            await asyncio.sleep(self._args.scan_interval_s)
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - an unreadable ROOT for a while must not stop the scans
                log.warning("models: scan failed: %s: %s", type(e).__name__, e)

    async def _write_record(self) -> None:
        from styleray.platform.served import write_record

        models = {n: {"run": e.source.uri, "checkpoint": (e.listing.name if e.listing else None),
                      "kimg": (e.listing.kimg if e.listing else None)}
                  for n, e in self._models.items() if e.source.origin == "runs"}
        if models == self._recorded:
            return
        try:
            await asyncio.to_thread(write_record, self._args.runs, models, self._args.scan_interval_s)
            self._recorded = models
        except Exception as e:  # noqa: BLE001 - a read-only ROOT: serving goes on, queue show cannot tell
            if self._recorded is None:
                log.warning("models: cannot write the record of served names under %s: %s", self._args.runs, e)
            self._recorded = {}

    def catalog(self) -> dict:
        """What the ingress needs per request: the names and the default."""
        return {"names": list(self._models), "default": self.default_name()}

    def default_name(self) -> str | None:
        wanted = self._args.default_model
        if wanted is not None and wanted in self._models:
            return wanted
        return next(iter(self._models), None)

    def models(self) -> list[dict]:
        """``GET /v1/models``: every model, with the checkpoint it serves and what the replicas say."""
        return [self._listing(name, entry) for name, entry in self._models.items()]

    def _listing(self, name: str, e: ModelEntry) -> dict:
        p, c = self._policy, e.listing
        live = self._live(e)
        failures = {k: err for k, (err, seen) in e.failures.items() if time.time() - seen < self._alive_s}
        if e.target is None:
            status = "waiting"  # no committed checkpoint yet
        elif failures and not live:
            status = "unavailable"
        else:
            status = "degraded" if any(r["fallback"] for r in live.values()) or failures else "ok"
        return {
            "name": name, "default": name == self.default_name(), "origin": e.source.origin,
            "run": p.public(e.source.uri), "follows_run": e.source.follow,
            "checkpoint": c.name if c else None, "checkpoint_uri": p.public(e.target) if e.target else None,
            "chosen_by": c.chosen_by if c else None, "kimg": c.kimg if c else None,
            "resolution": c.resolution if c else None, "classes": c.classes if c else None,
            "fid": c.fid if c else None, "kid": c.kid if c else None, "version": e.version,
            "replicas": len(live), "status": status,
            "error": next(iter(failures.values()), None) or next((r["error"] for r in live.values() if r["error"]), None),
        }

    def _entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            names = list(self._models)
            raise UnknownModel(f"model {name!r} is not served; models: {', '.join(names) or 'none yet'}", names) \
                from None

    # -- targets -------------------------------------------------------------------------------------------

    def target(self, name: str) -> tuple[int, str | None]:
        entry = self._entry(name)
        return entry.version, entry.target

    def source(self, name: str) -> str:
        """What ``POST /v1/reload`` without a checkpoint loads: the run's current choice, or the configured path."""
        entry = self._entry(name)
        return entry.choice.checkpoint if entry.choice is not None else entry.source.uri

    def fallbacks(self, name: str) -> list[str]:
        """Good checkpoints, newest first: what a replica tries when it cannot build the target."""
        return list(reversed(self._entry(name).good))

    def pin(self, name: str, version: int, target: str, resolved: str) -> None:
        """A replica resolved ``target`` (e.g. a run folder) to the checkpoint ``resolved``: make every other
        replica load exactly that one, even if training writes a newer checkpoint meanwhile."""
        entry = self._entry(name)
        if version == entry.version and target == entry.target:
            entry.target = resolved

    def publish(self, name: str, checkpoint: str) -> int:
        """Make ``checkpoint`` (built and test-sampled by a replica already) the target; its new version."""
        return self._publish(self._entry(name), checkpoint, None)

    def _publish(self, entry: ModelEntry, checkpoint: str, listing: Choice | None) -> int:
        entry.version += 1
        entry.target = checkpoint
        entry.listing = listing
        return entry.version

    def report(self, replica: str, name: str, version: int, checkpoint: str, error: str | None = None,
               fallback: bool = False) -> None:
        entry = self._models.get(name)
        if entry is None:  # a model removed from the catalog, still cached by the replica
            return
        now = time.time()
        entry.replicas[replica] = ReplicaReport(version, checkpoint, error, fallback, now)
        entry.failures.pop(replica, None)
        if checkpoint == entry.target:  # the published one becomes the newest good one
            entry.good.pop(checkpoint, None)
        entry.good.setdefault(checkpoint, now)
        while len(entry.good) > MAX_GOOD:
            entry.good.pop(next(iter(entry.good)))

    def failed(self, replica: str, name: str, error: str) -> None:
        """A replica could build no checkpoint of ``name`` (it answers 503 for it)."""
        entry = self._models.get(name)
        if entry is not None:
            entry.failures[replica] = (error, time.time())
            entry.replicas.pop(replica, None)

    def forget(self, replica: str, name: str) -> None:
        """A replica evicted ``name`` (its K models were full): it no longer reports for it."""
        entry = self._models.get(name)
        if entry is not None:
            entry.replicas.pop(replica, None)

    def _live(self, entry: ModelEntry) -> dict[str, dict]:
        now = time.time()
        entry.replicas = {k: r for k, r in entry.replicas.items() if now - r.seen < 10 * self._alive_s}
        return {k: asdict(r) for k, r in entry.replicas.items() if now - r.seen < self._alive_s}

    def status(self, name: str | None = None) -> dict:
        """One model's version, target and live replica reports; without a name, every model's."""
        if name is None:
            return {n: self.status(n) for n in self._models}
        entry = self._entry(name)
        failures = {k: err for k, (err, seen) in entry.failures.items() if time.time() - seen < self._alive_s}
        return {"version": entry.version, "target": entry.target, "replicas": self._live(entry), "failures": failures}
