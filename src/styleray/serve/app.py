"""The Serve application: HTTP ingress -> Sampler replicas (models multiplexed by name), plus the registry of
models and checkpoints (the catalog, reloads) and the projection store (projections of uploaded images,
whichever replica runs them).

    serve.yaml:  import_path: styleray.serve.app:build_app   args: {runs: s3://bucket/runs, ...}
    CLI:         styleray serve --runs runs/ [--model NAME=RUN ...] [--host 127.0.0.1] [--port 8000]

``build_app`` is a typed app builder: Serve validates the config file's ``args`` against ``ServeArgs``.
(This module must not use ``from __future__ import annotations``: Serve inspects the builder's annotation as
a class.)
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve import Application

from styleray.serve.api import create_api
from styleray.serve.args import ServeArgs
from styleray.serve.catalog import UnknownModel
from styleray.serve.errors import Unavailable
from styleray.serve.projection_store import ProjectionStore
from styleray.serve.registry import CheckpointRegistry
from styleray.serve.reload import reload_checkpoint
from styleray.serve.sampler import SamplerDeployment
from styleray.serve.schemas import InvalidRequest

log = logging.getLogger("ray.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
HEALTH_TIMEOUT_S = 10.0
CATALOG_MAX_AGE_S = 1.0  # the ingress asks the registry for the model names at most this often (and on a miss)


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
    """Routes HTTP to the Sampler replicas holding the request's model; owns the API key, the HTTP limits, the
    model names (a cached copy of the registry's catalog) and the reload protocol. Holds no model."""

    def __init__(self, sampler, registry, args: ServeArgs, projections=None):
        self._sampler = sampler  # DeploymentHandle
        self._registry = registry  # DeploymentHandle
        self._projections = projections  # DeploymentHandle of ProjectionStore
        self._args = args
        key = args.api_key.get_secret_value() if args.api_key is not None else os.environ.get(args.api_key_env)
        self._api_key = key or None
        self._policy = args.source_policy()
        self._reload_lock = asyncio.Lock()  # one reload at a time
        self._catalog: dict = {"names": [], "default": None}
        self._catalog_at = -1e9  # time.monotonic() of the last refresh
        self._refresh: asyncio.Task | None = None
        self._handles: dict[str, Any] = {}  # model name -> the sampler handle routing to it

    def __serve_build_asgi_app__(self):
        return create_api(self, self._api_key, key_env=self._args.api_key_env, limits=self._args.http_limits())

    # -- model names ---------------------------------------------------------------------------------------

    async def model_name(self, requested: str | None) -> str:
        """The model a request is for: the one it names (404 listing the names when there is none such), or
        the default (the configured one, else the first)."""
        catalog = await self._fresh_catalog(CATALOG_MAX_AGE_S)
        name = requested or catalog["default"]
        if name is None or name not in catalog["names"]:
            catalog = await self._fresh_catalog(0.2)  # a run that has just appeared
            name = requested or catalog["default"]
        if name is None or name not in catalog["names"]:
            names = catalog["names"]
            if requested is None:
                raise UnknownModel("no models to serve yet (no run has a committed checkpoint); see GET /v1/models",
                                   names)
            raise UnknownModel(f"model {requested[:80]!r} is not served; models: {', '.join(names) or 'none yet'}",
                               names)
        return name

    async def _fresh_catalog(self, max_age_s: float) -> dict:
        if time.monotonic() - self._catalog_at > max_age_s:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.get_running_loop().create_task(self._read_catalog())
            await asyncio.shield(self._refresh)
        return self._catalog

    async def _read_catalog(self) -> None:
        with replica_errors():
            self._catalog = await self._registry.catalog.remote()
        self._catalog_at = time.monotonic()

    def _routed(self, name: str):
        """The sampler handle for ``name``: Ray routes to a replica that holds it (multiplexing)."""
        if name not in self._handles:
            self._handles[name] = self._sampler.options(multiplexed_model_id=name)
        return self._handles[name]

    # -- what the routes call (api.Backend) ------------------------------------------------------------------

    async def call(self, method: str, request: Any = None, model: str | None = None) -> Any:
        name = await self.model_name(model)
        handle = getattr(self._routed(name), method)
        with replica_errors():
            return await (handle.remote(request) if request is not None else handle.remote())

    async def models(self) -> dict:
        """GET /v1/models: every model with the checkpoint it serves."""
        with replica_errors():
            listing = await self._registry.models.remote()
        return {"models": listing, "default": next((m["name"] for m in listing if m["default"]), None),
                "scan_interval_s": self._args.scan_interval_s, "models_per_replica": self._args.models_per_replica}

    async def projections(self, method: str, *args: Any) -> Any:
        """Call a ProjectionStore method (status, images, latents of projections)."""
        if self._projections is None:
            raise InvalidRequest("this application has no projection store")
        with replica_errors():
            return await getattr(self._projections, method).remote(*args)

    async def health(self) -> tuple[int, dict]:
        """200 ok / 200 degraded (a model serves a fallback, or cannot be served) / 503 no replica answered."""
        try:
            ping = await asyncio.wait_for(self._sampler.ping.remote(), timeout=HEALTH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy; say which
            return 503, {"status": "unavailable", "error": f"no sampler replica answered: {type(e).__name__}"}
        try:
            models = await asyncio.wait_for(self._registry.status.remote(), HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the registry restarting: the replica's own word is enough
            models = {}
        fallback = {f"{n} on {k}": r["error"] for n, m in models.items() for k, r in m["replicas"].items() if r["fallback"]}
        for n, fb in ping["fallback"].items():
            fallback.setdefault(f"{n} on {ping['replica']}", fb["error"])
        unavailable = {n: next(iter(m["failures"].values())) for n, m in models.items() if m["failures"]}
        replicas = {k for m in models.values() for k in m["replicas"]}
        body = {"status": "degraded" if fallback or unavailable else "ok", "models": len(models),
                "replicas": len(replicas), "fallback": fallback or None, "unavailable": unavailable or None}
        return 200, body

    async def reload(self, model: str | None, checkpoint: str | None, wait_s: float) -> tuple[int, dict]:
        name = await self.model_name(model)
        async with self._reload_lock:
            with replica_errors():
                return await reload_checkpoint(self._sampler, self._registry, self._policy, name, checkpoint, wait_s,
                                               self._args.reload_poll_s)


def build_app(args: ServeArgs) -> Application:
    """The application graph: Ingress -> Sampler (N replicas or autoscaled, K models each) and CheckpointRegistry."""
    if isinstance(args, dict):  # a plain dict from Python callers; Serve itself passes ServeArgs
        args = ServeArgs.model_validate(args)
    registry = CheckpointRegistry.bind(args, alive_s=max(5.0, 3 * args.reload_poll_s))
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
