"""``POST /v1/reload?model=NAME``, transactionally: try the checkpoint on one replica, then publish, then wait.

1. The name is checked against the ``SourcePolicy`` (allowed roots and schemes; relative names are beside
   the model's run) before anything is read. Without a name: the model's run again (its best.json choice or
   newest checkpoint for a followed run, else its configured path).
2. One sampler replica (one that holds the model, when one does) builds the generator and draws a test sample
   (``SamplerDeployment.trial``); if that fails the answer is 422 with the reason and the published target
   is unchanged, so no replica ever tries it and a replica restarted later starts on the checkpoint that works.
3. The checkpoint that was tested (a run folder resolved to its concrete checkpoint) is published in the
   registry for that model, and the ingress waits until every live replica holding the model reports
   serving it (a replica that does not hold it loads the new one when it is next asked for it).

Answers: 200 every replica holding the model switched; 202 some had not within ``wait_s``; 409 some replicas
could not build it (they keep serving what they served, and ``/healthz`` says ``degraded``); 422 refused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from styleray.serve.schemas import InvalidRequest
from styleray.serve.sources import SourcePolicy


async def reload_checkpoint(
    sampler: Any, registry: Any, policy: SourcePolicy, name: str, checkpoint: str | None, wait_s: float,
    poll_s: float,
) -> tuple[int, dict]:
    """The reload protocol above; ``sampler`` and ``registry`` are deployment handles."""
    from styleray import storage

    source = await registry.source.remote(name)
    try:
        target = policy.with_base(source).resolve(checkpoint) if checkpoint else storage.absolute(source)
    except InvalidRequest as e:
        return 422, {"error": str(e), "model": name}
    version, published = await registry.target.remote(name)
    try:
        trial = await sampler.options(multiplexed_model_id=name).trial.remote(name, target)
    except InvalidRequest as e:  # LoadError: could not be built or test-sampled; nothing was published
        reason = str(getattr(e, "cause", None) or e)
        shown = policy.public(published) if published else None
        return 422, {"error": reason, "model": name, "published": shown, "version": version}
    version = await registry.publish.remote(name, trial["uri"])
    return await wait_for_replicas(registry, name, trial, version, wait_s, poll_s)


async def wait_for_replicas(registry: Any, name: str, trial: dict, version: int, wait_s: float,
                            poll_s: float) -> tuple[int, dict]:
    uri = trial["uri"]
    deadline = time.monotonic() + wait_s
    while True:
        replicas = (await registry.status.remote(name))["replicas"]
        done = {k for k, r in replicas.items() if r["version"] >= version and r["checkpoint"] == uri}
        failed = {k: r["error"] for k, r in replicas.items() if r["version"] >= version and r["error"] and k not in done}
        result = {
            "model": name, "checkpoint": trial["checkpoint"], "checkpoint_uri": trial["checkpoint_uri"],
            "kimg": trial["kimg"], "version": version, "replicas": len(replicas), "switched": len(done),
        }
        if failed:
            message = "published, but some replicas could not build it; they keep serving their checkpoint"
            return 409, {**result, "error": message, "failed": failed}
        if len(done) == len(replicas):  # none holding the model: it loads the new one on its next request
            return 200, result
        if time.monotonic() >= deadline:
            return 202, {**result, "pending": sorted(set(replicas) - done)}
        await asyncio.sleep(min(0.2, poll_s / 2))
