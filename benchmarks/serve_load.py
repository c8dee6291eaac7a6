"""Load test of the Serve application over loopback: GET /v1/sample at several concurrencies, batching on and
off, and the time to the first byte of a 30-frame morph.

    python benchmarks/serve_load.py [--resolution 32] [--concurrency 1,8,32] [--requests 400] [--seconds 15]

Starts a private Ray cluster (``--cpus``, default 2) and Serve on 127.0.0.1, serves a freshly initialised
cpu-tiny checkpoint (or ``--checkpoint``), and prints one markdown table. Every level is bounded by both a
request count and a time limit; traffic goes to 127.0.0.1 only. The client runs on the same machine, so on a
small machine it competes with the server for CPU: compare rows of one run, not absolute figures across
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import socket
import statistics
import tempfile
import time


def make_checkpoint(run_dir: str, resolution: int) -> str:
    from styleray.config import RunConfig, resolve_preset
    from styleray.models.training import StyleGAN2Trainer
    from styleray.platform.checkpoint import save_checkpoint

    model, train = resolve_preset("cpu-tiny", resolution=resolution, train_overrides={"batch": 4})
    trainer = StyleGAN2Trainer(model, train)
    meta = {"cur_nimg": 0, "kimg": 0.0, "tick": 0}
    return save_checkpoint(run_dir, trainer.state_dict(), config=RunConfig(model, train).to_dict(), meta=meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def load(base: str, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """``concurrency`` clients in closed loops of GET /v1/sample with random seeds, until either bound."""
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    issued = 0
    rng = random.Random(concurrency)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker():
            nonlocal errors, issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                r = await client.get("/v1/sample", params={"seed": rng.randrange(2**32)})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    batch_sizes.append(int(r.headers.get("X-Batch-Size", "1")))
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_batch": statistics.fmean(batch_sizes),
    }


async def morph_ttfb(base: str, repeats: int) -> tuple[float, float]:
    """Median time to the first byte and to the last byte of a 30-frame morph (2 seeds, 29 steps)."""
    import httpx

    firsts, totals = [], []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for i in range(repeats):
            t0 = time.perf_counter()
            async with client.stream("GET", "/v1/morph", params={"seeds": f"{i},{i + 1000}", "steps": 29}) as r:
                assert r.status_code == 200 and r.headers["X-Frames"] == "30", r.status_code
                first = None
                async for _ in r.aiter_raw():
                    first = first or time.perf_counter()
            firsts.append(first - t0)
            totals.append(time.perf_counter() - t0)
    return 1000 * statistics.median(firsts), 1000 * statistics.median(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint (default: a fresh cpu-tiny one)")
    p.add_argument("--resolution", type=int, default=32, help="resolution of the fresh checkpoint")
    p.add_argument("--concurrency", default="1,8,32", help="client counts")
    p.add_argument("--requests", type=int, default=400, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=15.0, help="at most this long per level")
    p.add_argument("--warmup", type=int, default=20, help="requests before each configuration is measured")
    p.add_argument("--cpus", type=float, default=2, help="CPUs of the private Ray cluster")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--morph-repeats", type=int, default=5)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    tmp = tempfile.mkdtemp(prefix="serve-load-")
    checkpoint = args.checkpoint or make_checkpoint(tmp, args.resolution)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    ttfb = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batching in (True, False):
            serve_args = ServeArgs(
                checkpoint=checkpoint,
                batching=batching,
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000,
                cpus_per_replica=1,
            )
            serve.run(build_app(serve_args), name="styleray", route_prefix="/")
            asyncio.run(load(base, 4, args.warmup, 30))
            for c in levels:
                r = asyncio.run(load(base, c, args.requests, args.seconds))
                rows.append({"batching": "on" if batching else "off", "concurrency": c, **r})
                print(f"batching {'on ' if batching else 'off'} c={c:3d}: {r}", flush=True)
            if batching:
                ttfb = asyncio.run(morph_ttfb(base, args.morph_repeats))
    finally:
        serve.shutdown()
        ray.shutdown()

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; "
          f"checkpoint {checkpoint}; {args.resolution}px; max_batch_size {args.max_batch_size}, "
          f"batch wait {args.batch_wait_ms} ms")
    print()
    print("| batching | clients | requests | errors | req/s | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} |")
    by = {(r["batching"], r["concurrency"]): r["rps"] for r in rows}
    for c in levels:
        print(f"batching speed-up at {c} clients: {by[('on', c)] / by[('off', c)]:.2f}x")
    if ttfb is not None:
        print(f"30-frame morph (GIF, batching app): time to first byte {ttfb[0]:.0f} ms, complete {ttfb[1]:.0f} ms (median of {args.morph_repeats})")


if __name__ == "__main__":
    main()
