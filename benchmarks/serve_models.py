"""The ``models`` scenario of ``serve_load.py``: many models from one endpoint (issue 18).

    python benchmarks/serve_load.py --scenario models [--models 3] [--clients 32] [--resolution 64]
                                    [--models-per-replica 3,2] [--max-replicas 2] [--seconds 20]

Writes ``--models`` freshly initialised cpu-tiny runs (different weights) under one ROOT and serves them with
``runs=ROOT`` on a private Ray cluster, Serve on 127.0.0.1. For each K in ``--models-per-replica``, a new
application (one sampler replica at start, autoscaled up to ``--max-replicas``):

1. Cold vs warm, and memory as models grow: model by model, the first request (the replica loads the model on
   a thread: the cold cost), then ``--warm`` requests of it (the warm cost); the resident memory (RSS) of the
   sampler replica process before the first model and after each.
2. Load: ``--clients`` closed-loop clients spread evenly over the models (client i asks model i mod N, random
   seeds) for ``--seconds``: p50/p99 and req/s per model and overall, the errors, and the sampler replicas
   running at the end. With K below the number of models, one replica thrashes (every switch of model is a
   load): the figure shows what too small a K costs.

Each answer's X-Model header is checked against the model asked for (a mismatch counts as an error).
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import statistics
import tempfile
import time


def make_runs(root: str, n: int, resolution: int) -> list[str]:
    """n runs under root, m0..m{n-1}, each one checkpoint of a differently seeded cpu-tiny network."""
    import torch

    from serve_load import make_checkpoint

    names = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        make_checkpoint(os.path.join(root, f"m{i}"), resolution)
        names.append(f"m{i}")
    return names


def sampler_rss_mb(app: str) -> list[float]:
    """Resident memory (MiB) of each live sampler replica process of application ``app`` (its pid asked of
    the replica actor itself: the state API needs the dashboard, which this cluster does not run)."""
    import psutil
    import ray

    prefix = f"SERVE_REPLICA::{app}#Sampler#"
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    pids = [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(lambda self: os.getpid()))
            for a in actors]
    return [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]


def running_samplers(app: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments["Sampler"].replica_states.get("RUNNING", 0)


async def cold_and_warm(base: str, names: list[str], app: str, warm: int) -> list[dict]:
    """Per model, in order: the first request's latency, the median of ``warm`` more, the replica RSS after."""
    import httpx

    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        rows.append({"model": "(none loaded)", "rss_mb": sampler_rss_mb(app)})
        for name in names:
            t0 = time.perf_counter()
            r = await client.get("/v1/sample", params={"seed": 1, "model": name})
            cold = time.perf_counter() - t0
            assert r.status_code == 200 and r.headers["X-Model"] == name, (r.status_code, r.text[:200])
            lat = []
            for seed in range(2, 2 + warm):
                t0 = time.perf_counter()
                r = await client.get("/v1/sample", params={"seed": seed, "model": name})
                assert r.status_code == 200
                lat.append(time.perf_counter() - t0)
            rows.append({"model": name, "cold_ms": 1000 * cold, "warm_ms": 1000 * statistics.median(lat),
                         "rss_mb": sampler_rss_mb(app)})
    return rows


async def spread_load(base: str, names: list[str], clients: int, seconds: float) -> dict[str, dict]:
    """``clients`` closed loops, client i on model i mod len(names): latencies and errors per model."""
    import httpx

    from serve_load import percentile

    lat: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, int] = {n: 0 for n in names}
    until = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:

        async def worker(i: int):
            name, rng = names[i % len(names)], random.Random(i)
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                try:
                    r = await client.get("/v1/sample", params={"seed": rng.randrange(2**32), "model": name})
                    ok = r.status_code == 200 and r.headers.get("X-Model") == name
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat[name].append(time.perf_counter() - t0)
                else:
                    errors[name] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - started
    out = {}
    for name, values in [*lat.items(), ("all", [x for v in lat.values() for x in v])]:
        out[name] = {"requests": len(values), "rps": len(values) / wall,
                     "errors": sum(errors.values()) if name == "all" else errors[name],
                     "p50_ms": 1000 * statistics.median(values) if values else float("nan"),
                     "p99_ms": 1000 * percentile(values, 99) if values else float("nan")}
    return out


def run_models(args) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve_load import free_port
    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    root = tempfile.mkdtemp(prefix="serve-models-")
    names = make_runs(root, args.models, args.resolution)
    port = free_port()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load average at start {os.getloadavg()}; "
          f"{len(names)} models of {args.resolution} px under {root}; {args.clients} clients for {args.seconds:g} s")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for k in [int(x) for x in args.models_per_replica.split(",")]:
            app = f"k{k}"
            serve_args = ServeArgs(runs=root, models_per_replica=k, min_replicas=1, max_replicas=args.max_replicas,
                                   target_ongoing_requests=args.target_ongoing, upscale_delay_s=2,
                                   downscale_delay_s=30, cpus_per_replica=min(1.0, args.cpus / 4))
            serve.run(build_app(serve_args), name=app, route_prefix=f"/{app}")
            base = f"http://127.0.0.1:{port}/{app}"
            print_cold(k, asyncio.run(cold_and_warm(base, names, app, args.warm)))
            result = asyncio.run(spread_load(base, names, args.clients, args.seconds))
            print_load(k, result, running_samplers(app), sampler_rss_mb(app))
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"load average at the end {os.getloadavg()}")


def print_cold(k: int, rows: list[dict]) -> None:
    print(f"\nK={k}: cold (first request, loads the model) vs warm (median of the next ones), replica RSS after\n")
    print("| model | cold ms | warm ms | sampler RSS MiB |")
    print("|---|---:|---:|---:|")
    for r in rows:
        rss = ", ".join(f"{x:.0f}" for x in r["rss_mb"])
        if "cold_ms" in r:
            print(f"| {r['model']} | {r['cold_ms']:.0f} | {r['warm_ms']:.0f} | {rss} |")
        else:
            print(f"| {r['model']} | | | {rss} |")


def print_load(k: int, result: dict[str, dict], replicas: int, rss: list[float]) -> None:
    print(f"\nK={k}: clients spread over the models; {replicas} sampler replica(s) running at the end "
          f"(RSS MiB {', '.join(f'{x:.0f}' for x in rss)})\n")
    print("| model | requests | errors | req/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in result.items():
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
