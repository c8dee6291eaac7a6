"""The Serve application: HTTP ingress -> Generator replicas, plus the checkpoint registry for reloads and the
projection store (projections of uploaded images, whichever replica runs them).

    serve.yaml:  import_path: styleray.serve.app:build_app   args: {checkpoint: s3://bucket/runs/r1, ...}
    CLI:         styleray serve --checkpoint runs/r1 [--host 127.0.0.1] [--port 8000] [--replicas N]

``build_app`` is a typed app builder: Serve validates the config file's ``args`` against ``ServeArgs``.
(This module must not use ``from __future__ import annotations``: Serve inspects the builder's annotation as
a class.)
"""

import asyncio
import ipaddress
import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve import Application

from styleray.serve.api import create_api
from styleray.serve.args import ServeArgs
from styleray.serve.generator import Generator
from styleray.serve.projection_store import ProjectionStore
from styleray.serve.registry import CheckpointRegistry
from styleray.serve.schemas import InvalidRequest

log = logging.getLogger("ray.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    """Routes HTTP to the Generator; owns the API key and the reload protocol. Holds no model."""

    def __init__(self, generator, registry, args: ServeArgs, projections=None):
        self._generator = generator  # DeploymentHandle
        self._registry = registry  # DeploymentHandle
        self._projections = projections  # DeploymentHandle of ProjectionStore
        self._args = args
        key = args.api_key.get_secret_value() if args.api_key is not None else os.environ.get(args.api_key_env)
        self._api_key = key or None

    def __serve_build_asgi_app__(self):
        return create_api(self, self._api_key)

    async def call(self, method: str, request: Any = None) -> Any:
        """Call a Generator method; a request the model rejects comes back as a plain InvalidRequest (422)."""
        handle = getattr(self._generator, method)
        try:
            return await (handle.remote(request) if request is not None else handle.remote())
        except InvalidRequest as e:
            raise _plain(e) from None

    async def projections(self, method: str, *args: Any) -> Any:
        """Call a ProjectionStore method (status, images, latents of projections)."""
        if self._projections is None:
            raise InvalidRequest("this application has no projection store")
        try:
            return await getattr(self._projections, method).remote(*args)
        except InvalidRequest as e:
            raise _plain(e) from None

    async def reload(self, checkpoint: str | None, wait_s: float) -> tuple[int, dict]:
        """Resolve and verify the checkpoint, publish it, wait until every live replica serves it."""
        from styleray.platform.checkpoint import CheckpointError, resolve

        target = checkpoint or self._args.checkpoint
        try:  # loads and hash-checks it once here, so a broken checkpoint never reaches the replicas
            ckpt = await asyncio.to_thread(resolve, target)
        except CheckpointError as e:
            return 422, {"error": f"checkpoint: {e}"}
        uri, name = ckpt.uri, ckpt.name
        del ckpt
        version = await self._registry.set_target.remote(uri)
        deadline = time.monotonic() + wait_s
        while True:
            status = await self._registry.status.remote()
            replicas = status["replicas"]
            done = {k: r for k, r in replicas.items() if r["version"] >= version and r["checkpoint"] == uri}
            failed = {k: r["error"] for k, r in replicas.items() if r["version"] >= version and r["error"]}
            result = {
                "checkpoint": name, "checkpoint_uri": uri, "version": version,
                "replicas": len(replicas), "switched": len(done),
            }
            if failed:
                return 500, {**result, "error": "some replicas could not load the checkpoint", "failed": failed}
            if replicas and len(done) == len(replicas):
                return 200, result
            if time.monotonic() >= deadline:
                return 202, {**result, "pending": sorted(set(replicas) - set(done))}
            await asyncio.sleep(min(0.2, self._args.reload_poll_s / 2))


def _plain(e: InvalidRequest) -> InvalidRequest:
    """The replica's own exception (its class carries the HTTP status) out of Ray's wrapper."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, InvalidRequest) else InvalidRequest(str(cause or e))


def build_app(args: ServeArgs) -> Application:
    """The application graph: Ingress -> Generator (N replicas or autoscaled) and CheckpointRegistry."""
    if isinstance(args, dict):  # a plain dict from Python callers; Serve itself passes ServeArgs
        args = ServeArgs.model_validate(args)
    registry = CheckpointRegistry.bind(args.checkpoint, alive_s=max(5.0, 3 * args.reload_poll_s))
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
        "max_ongoing_requests": args.max_ongoing_requests,
    }
    if args.autoscaling is not None:
        options["autoscaling_config"] = args.autoscaling
    else:
        options["num_replicas"] = args.replicas
    projections = ProjectionStore.bind(kept=args.projections_kept)
    generator = Generator.options(**options).bind(args, registry, projections)
    ingress = Ingress.options(ray_actor_options={"num_cpus": args.ingress_cpus})
    return ingress.bind(generator, registry, args, projections)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(
    args: ServeArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = "styleray",
    route_prefix: str = "/",
    blocking: bool = True,
) -> None:
    """Start (or attach to) Ray, start Serve's HTTP proxy on host:port and run the app."""
    import ray

    if not is_loopback(host) and args.api_key is None and not os.environ.get(args.api_key_env):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (set %s)", host, args.api_key_env)
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix=route_prefix, blocking=blocking)
