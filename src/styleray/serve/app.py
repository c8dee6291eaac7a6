"""The Serve application: HTTP ingress -> Sampler replicas, plus the checkpoint registry for reloads and the
projection store (projections of uploaded images, whichever replica runs them).

    serve.yaml:  import_path: styleray.serve.app:build_app   args: {checkpoint: s3://bucket/runs/r1, ...}
    CLI:         styleray serve --checkpoint runs/r1 [--host 127.0.0.1] [--port 8000] [--replicas N]

``build_app`` is a typed app builder: Serve validates the config file's ``args`` against ``ServeArgs``.
(This module must not use ``from __future__ import annotations``: Serve inspects the builder's annotation as
a class.)
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from styleray.serve.api import create_api
from styleray.serve.args import ServeArgs
from styleray.serve.errors import Unavailable
from styleray.serve.projection_store import ProjectionStore
from styleray.serve.registry import CheckpointRegistry
from styleray.serve.reload import reload_checkpoint
from styleray.serve.sampler import SamplerDeployment
from styleray.serve.schemas import InvalidRequest

log = logging.getLogger("ray.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HEALTH_TIMEOUT_S = 10.0


@contextlib.contextmanager
def replica_errors():
    """A request the model rejects -> its InvalidRequest (422, or the status its class carries: 404, 409, 429,
    ...); no replica to take it -> Unavailable (503)."""
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    try:
        yield
    except InvalidRequest as e:  # Ray's RayTaskError(InvalidRequest) subclasses it; .cause is the original
        cause = getattr(e, "cause", None)
        raise (cause if isinstance(cause, InvalidRequest) else InvalidRequest(str(cause or e))) from None
    except (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
            GetTimeoutError, asyncio.TimeoutError) as e:
        raise Unavailable(f"no sampler replica could take the request ({type(e).__name__}); retry shortly") from None


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    """Routes HTTP to the Sampler; owns the API key, the HTTP limits and the reload protocol. Holds no model."""

    def __init__(self, sampler, registry, args: ServeArgs, projections=None):
        self._sampler = sampler  # DeploymentHandle
        self._registry = registry  # DeploymentHandle
        self._projections = projections  # DeploymentHandle of ProjectionStore
        self._args = args
        key = args.api_key.get_secret_value() if args.api_key is not None else os.environ.get(args.api_key_env)
        self._api_key = key or None
        self._policy = args.source_policy()
        self._reload_lock = asyncio.Lock()  # one reload at a time

    def __serve_build_asgi_app__(self):
        return create_api(self, self._api_key, key_env=self._args.api_key_env, limits=self._args.http_limits())

    async def call(self, method: str, request: Any = None) -> Any:
        handle = getattr(self._sampler, method)
        with replica_errors():
            return await (handle.remote(request) if request is not None else handle.remote())

    async def projections(self, method: str, *args: Any) -> Any:
        """Call a ProjectionStore method (status, images, latents of projections)."""
        if self._projections is None:
            raise InvalidRequest("this application has no projection store")
        with replica_errors():
            return await getattr(self._projections, method).remote(*args)

    async def health(self) -> tuple[int, dict]:
        """200 ok / 200 degraded (some replica serves a fallback) / 503 no replica answered."""
        try:
            ping = await asyncio.wait_for(self._sampler.ping.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy; say which
            return 503, {"status": "unavailable", "error": f"no sampler replica answered: {type(e).__name__}"}
        try:
            replicas = (await asyncio.wait_for(self._registry.status.remote(), HEALTH_TIMEOUT_S))["replicas"]
        except Exception:  # noqa: BLE001 - the registry restarting: the replica's own word is enough
            replicas = {}
        fallback = {k: r["error"] for k, r in replicas.items() if r["fallback"]}
        if ping["fallback"]:
            fallback.setdefault(ping["replica"], ping["fallback"]["error"])
        body = {"status": "degraded" if fallback else "ok", "checkpoint": ping["checkpoint"],
                "replicas": len(replicas), "fallback": fallback or None}
        return 200, body

    async def reload(self, checkpoint: str | None, wait_s: float) -> tuple[int, dict]:
        async with self._reload_lock:
            with replica_errors():
                return await reload_checkpoint(
                    self._sampler, self._registry, self._policy, self._args.checkpoint, checkpoint, wait_s,
                    self._args.reload_poll_s,
                )


def build_app(args: ServeArgs) -> Application:
    """The application graph: Ingress -> Sampler (N replicas or autoscaled) and CheckpointRegistry."""
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
    sampler = SamplerDeployment.options(**options).bind(args, registry, projections)
    ingress = Ingress.options(ray_actor_options={"num_cpus": args.ingress_cpus})
    return ingress.bind(sampler, registry, args, projections)


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
