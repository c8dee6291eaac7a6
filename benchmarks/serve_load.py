"""Load test of the Serve application over loopback: GET /v1/sample at several concurrencies, batching on and
off, and the time to the first byte of a 30-frame morph.

    python benchmarks/serve_load.py [--resolution 32] [--concurrency 1,8,32] [--requests 400] [--seconds 15]

Starts a private Ray cluster (``--cpus``, default 2) and Serve on 127.0.0.1 with two copies of the
application side by side, batching on (``/on``) and off (``/off``), both serving a freshly initialised cpu-tiny
checkpoint (or ``--checkpoint``). For each client count the two are measured in alternating rounds, so that
load from other work on a shared machine falls on both alike. Every level is bounded by a request count and
a time limit; traffic goes to 127.0.0.1 only. The client runs on the same machine and competes with the
server for CPU: compare rows of one run, not absolute figures across machines. Prints one markdown table.
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
    from styleray.config import RunSpec, resolve_preset
    from styleray.models.training import StyleGAN2Trainer
    from styleray.platform.checkpoint import save_checkpoint

    model, train = resolve_preset("cpu-tiny", resolution=resolution, train_overrides={"batch": 4})
    trainer = StyleGAN2Trainer(model, train)
    meta = {"cur_nimg": 0, "kimg": 0.0, "tick": 0}
    return save_checkpoint(run_dir, trainer.state_dict(), config=RunSpec(model, train).to_dict(), meta=meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


class Tally:
    """Latencies and counts of one configuration at one client count, over several rounds."""

    def __init__(self):
        self.latencies: list[float] = []
        self.batch_sizes: list[int] = []
        self.errors = 0
        self.wall = 0.0

    def row(self) -> dict:
        lat = self.latencies
        return {
            "requests": len(lat),
            "errors": self.errors,
            "rps": len(lat) / self.wall if self.wall else 0.0,
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * percentile(lat, 99) if lat else float("nan"),
            "mean_batch": statistics.fmean(self.batch_sizes) if self.batch_sizes else float("nan"),
        }


async def load(base: str, concurrency: int, max_requests: int, max_seconds: float, tally: Tally, seed: int = 0) -> None:
    """``concurrency`` clients in closed loops of GET /v1/sample with random seeds, until either bound."""
    import httpx

    issued = 0
    rng = random.Random(seed)
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker():
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                r = await client.get("/v1/sample", params={"seed": rng.randrange(2**32)})
                if r.status_code == 200:
                    tally.latencies.append(time.perf_counter() - t0)
                    tally.batch_sizes.append(int(r.headers.get("X-Batch-Size", "1")))
                else:
                    tally.errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        tally.wall += time.perf_counter() - started


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
    p.add_argument("--requests", type=int, default=400, help="at most this many requests per configuration and level")
    p.add_argument("--seconds", type=float, default=15.0, help="at most this long per configuration and level")
    p.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds per level (bounds split evenly)")
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
    modes = {"on": True, "off": False}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    ttfb = None
    load_avg = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, batching in modes.items():
            serve_args = ServeArgs(
                checkpoint=checkpoint,
                batching=batching,
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000,
                cpus_per_replica=min(1.0, args.cpus / 4),
            )
            serve.run(build_app(serve_args), name=name, route_prefix=f"/{name}")
            asyncio.run(load(f"{base}/{name}", 4, args.warmup, 30, Tally()))
        for c in levels:
            tallies = {name: Tally() for name in modes}
            for k in range(args.rounds):
                for name in modes:
                    asyncio.run(load(f"{base}/{name}", c, args.requests // args.rounds, args.seconds / args.rounds,
                                     tallies[name], seed=1000 * c + k))
            load_avg.append(os.getloadavg()[0])
            for name in modes:
                r = tallies[name].row()
                rows.append({"batching": name, "concurrency": c, **r})
                print(f"batching {name:3s} c={c:3d}: {r}", flush=True)
        ttfb = asyncio.run(morph_ttfb(f"{base}/on", args.morph_repeats))
    finally:
        serve.shutdown()
        ray.shutdown()

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, 1-min load average after each level "
          f"{', '.join(f'{x:.1f}' for x in load_avg)}; "
          f"checkpoint {checkpoint}; {args.resolution}px; max_batch_size {args.max_batch_size}, "
          f"batch wait {args.batch_wait_ms} ms")
    print()
    print("| batching | clients | requests | errors | req/s | p50 ms | p99 ms | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["batching"] == "off", r["concurrency"])):
        print(f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.1f} |")
    by = {(r["batching"], r["concurrency"]): r["rps"] for r in rows}
    for c in levels:
        print(f"batching speed-up at {c} clients: {by[('on', c)] / by[('off', c)]:.2f}x")
    if ttfb is not None:
        print(f"30-frame morph (GIF): time to first byte {ttfb[0]:.0f} ms, complete {ttfb[1]:.0f} ms (median of {args.morph_repeats})")


if __name__ == "__main__":
    main()
