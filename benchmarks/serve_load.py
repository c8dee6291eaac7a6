"""Load tests of the Serve application over loopback, one scenario per run:

    python benchmarks/serve_load.py [--scenario batching] [--resolution 32] [--concurrency 1,8,32] ...
    python benchmarks/serve_load.py --scenario fairness [--morph-clients 16] [--seconds 30]
    python benchmarks/serve_load.py --scenario slow-clients [--slow 600] [--spread one|many]
                                    [--slow-part body|headers] [--seconds 20]
    python benchmarks/serve_load.py --scenario models [--models 3] [--clients 32] [--models-per-replica 3,2]

models: several models from one endpoint, cold vs warm, memory per replica, clients spread over the models
(``serve_models.py`` has the details).

batching: GET /v1/sample at several concurrencies, batching on and off, and the time to the first byte of
a 30-frame morph (described below). fairness: /v1/sample latency alone, then while ``--morph-clients``
clients loop on the largest morph (2 seeds, 120 steps, looped: 240 frames). slow-clients: ``--slow``
connections send headers and a few bytes of a declared body (or only part of their headers) and then nothing,
from one source address
(127.0.0.2) or from as many addresses (127.0.x.y); meanwhile /healthz and /v1/sample are polled from
127.0.0.1 (timeout 5 s each). The fairness and slow-clients scenarios use only ServeArgs fields that existed
before issue 20, so they also run against an older checkout (PYTHONPATH=OLD/src) for a side-by-side figure.

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


CHUNK = 8  # rows the network always runs on (styleray.models.sampling.CHUNK)


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


class Latencies:
    """Latencies of one kind of request, and its failures (status or exception) by kind."""

    def __init__(self):
        self.seconds: list[float] = []
        self.failures: dict[str, int] = {}
        self.batches = 0.0  # network calls the answers shared: the sum of 1 / X-Batch-Size

    def add(self, started: float, status: int | str, batch_size: int = 1) -> None:
        if status == 200:
            self.seconds.append(time.perf_counter() - started)
            self.batches += 1 / batch_size
        else:
            self.failures[str(status)] = self.failures.get(str(status), 0) + 1

    def summary(self) -> str:
        lat = self.seconds
        if not lat:
            return f"0 ok, failures {self.failures}"
        return (f"{len(lat)} ok, p50 {1000 * statistics.median(lat):.0f} ms, p99 {1000 * percentile(lat, 99):.0f} ms, "
                f"max {1000 * max(lat):.0f} ms, failures {self.failures or 0}")


async def closed_loop(client, path: str, params, until: float, tally: Latencies, timeout: float = 120) -> None:
    """Request ``path`` again and again until ``until`` (perf_counter); ``params``: a function of the count."""
    import httpx

    i = 0
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            r = await client.get(path, params=params(i), timeout=timeout)
            tally.add(t0, r.status_code, int(r.headers.get("X-Batch-Size", "1")))
        except httpx.HTTPError as e:
            tally.add(t0, type(e).__name__)
        i += 1


async def fairness(base: str, morph_clients: int, sample_clients: int, seconds: float) -> dict[str, Latencies]:
    """Samples alone, then samples while ``morph_clients`` loop on 240-frame morphs."""
    import httpx

    def sample(i):
        return {"seed": i}

    def morph(i):
        return {"seeds": f"{i},{i + 1}", "steps": 120, "loop": "true"}

    out = {"sample alone": Latencies(), "sample under morphs": Latencies(), "morph": Latencies()}
    limits = httpx.Limits(max_connections=morph_clients + sample_clients + 4)
    async with httpx.AsyncClient(base_url=base, limits=limits) as client:
        until = time.perf_counter() + seconds / 3
        await asyncio.gather(*(closed_loop(client, "/v1/sample", sample, until, out["sample alone"]) for _ in range(sample_clients)))
        until = time.perf_counter() + seconds
        morphs = [closed_loop(client, "/v1/morph", morph, until, out["morph"]) for _ in range(morph_clients)]
        await asyncio.sleep(min(5.0, seconds / 6))  # let the morph queue build up before sampling
        samples = [closed_loop(client, "/v1/sample", sample, until, out["sample under morphs"]) for _ in range(sample_clients)]
        started = time.perf_counter() - min(5.0, seconds / 6)
        await asyncio.gather(*morphs, *samples)
    wall = time.perf_counter() - started
    frames = 240 * len(out["morph"].seconds)
    rows = frames + CHUNK * round(out["sample under morphs"].batches)
    print(f"morph phase: {wall:.0f} s wall (it ends when the last morph started before {seconds:.0f} s is done): "
          f"{frames} morph frames ({frames / wall:.1f}/s); with the sample batches (each one network chunk of "
          f"{CHUNK} rows) {rows} network rows ({rows / wall:.1f}/s)")
    return out


def open_slow_clients(port: int, n: int, spread: str, part: str) -> list[socket.socket]:
    """n connections that send headers and 8 bytes of a declared 100-byte body (part 'body') or only the
    first header lines (part 'headers', slowloris), then nothing."""
    socks = []
    partial = (b'POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Content-Length: 100\r\n\r\n{"seeds"') if part == "body" else b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    for i in range(n):
        source = "127.0.0.2" if spread == "one" else f"127.0.{1 + i // 250}.{1 + i % 250}"
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(partial)
        socks.append(s)
    return socks


async def probe_while_slow(base: str, seconds: float) -> dict[str, Latencies]:
    """/healthz and /v1/sample, one after the other every 0.25 s, each with a 5 s timeout."""
    import httpx

    out = {"/healthz": Latencies(), "/v1/sample": Latencies()}
    until = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=base) as client:
        while time.perf_counter() < until:
            for path, params in (("/healthz", {}), ("/v1/sample", {"seed": 1})):
                t0 = time.perf_counter()
                try:
                    out[path].add(t0, (await client.get(path, params=params, timeout=5)).status_code)
                except httpx.HTTPError as e:
                    out[path].add(t0, type(e).__name__)
            await asyncio.sleep(0.25)
    return out


def slow_answers(socks: list[socket.socket]) -> dict[str, int]:
    """What the slow connections were answered so far (status codes), without waiting."""
    import select

    readable, _, _ = select.select(socks, [], [], 0)
    counts: dict[str, int] = {"unanswered": len(socks) - len(readable)}
    for s in readable:
        head = s.recv(64)
        code = head[9:12].decode(errors="replace") if head.startswith(b"HTTP/1.1 ") else "closed"
        counts[code] = counts.get(code, 0) + 1
    return counts


def run_scenario(args, checkpoint: str) -> None:
    """fairness or slow-clients: one application, defaults but for the CPUs, on a private cluster."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    import styleray
    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(ServeArgs(checkpoint=checkpoint, cpus_per_replica=1.0)), name="styleray", route_prefix="/")
        asyncio.run(load(base, 4, args.warmup, 30, Tally()))
        print(f"styleray from {os.path.dirname(styleray.__file__)}; load average before: {os.getloadavg()}")
        if args.scenario == "fairness":
            result = asyncio.run(fairness(base, args.morph_clients, args.sample_clients, args.seconds))
            for name, tally in result.items():
                print(f"{name}: {tally.summary()}")
        else:
            socks = open_slow_clients(port, args.slow, args.spread, args.slow_part)
            try:
                result = asyncio.run(probe_while_slow(base, args.seconds))
                print(f"{args.slow} slow {args.slow_part} from {args.spread} address(es); answered: {slow_answers(socks)}")
                for name, tally in result.items():
                    print(f"{name} meanwhile: {tally.summary()}")
            finally:
                for s in socks:
                    s.close()
        print(f"load average after: {os.getloadavg()}")
    finally:
        serve.shutdown()
        ray.shutdown()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["batching", "fairness", "slow-clients", "models"], default="batching")
    p.add_argument("--models", type=int, default=3, help="models: how many runs to serve")
    p.add_argument("--clients", type=int, default=32, help="models: clients spread over the models")
    p.add_argument("--models-per-replica", default="3,2", help="models: the K values to measure, one app each")
    p.add_argument("--max-replicas", type=int, default=2, help="models: autoscaling upper bound (lower: 1)")
    p.add_argument("--target-ongoing", type=float, default=16, help="models: autoscaling target per replica")
    p.add_argument("--warm", type=int, default=10, help="models: warm requests per model after the cold one")
    p.add_argument("--morph-clients", type=int, default=16, help="fairness: clients looping on 240-frame morphs")
    p.add_argument("--sample-clients", type=int, default=2, help="fairness: clients looping on /v1/sample")
    p.add_argument("--slow", type=int, default=600, help="slow-clients: connections that never finish their body")
    p.add_argument("--spread", choices=["one", "many"], default="one", help="slow-clients: source addresses")
    p.add_argument("--slow-part", choices=["body", "headers"], default="body",
                   help="slow-clients: what never finishes (a declared body, or the headers: slowloris)")
    p.add_argument("--checkpoint", default=None, help="serve this checkpoint (default: a fresh cpu-tiny one)")
    p.add_argument("--resolution", type=int, default=32, help="resolution of the fresh checkpoint")
    p.add_argument("--concurrency", default="1,8,32", help="client counts")
    p.add_argument("--requests", type=int, default=400, help="at most this many requests per configuration and level")
    p.add_argument("--seconds", type=float, default=15.0,
                   help="batching: at most this long per configuration and level; fairness: the loaded phase; "
                   "slow-clients: how long to probe")
    p.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds per level (bounds split evenly)")
    p.add_argument("--warmup", type=int, default=20, help="requests before each configuration is measured")
    p.add_argument("--cpus", type=float, default=2, help="CPUs of the private Ray cluster")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--morph-repeats", type=int, default=5)
    return p.parse_args()


def run_batching(args, checkpoint: str) -> tuple[list[dict], tuple[float, float] | None, list[float]]:
    """Batching on and off side by side: (table rows, morph time to first/last byte, load averages)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    modes = {"on": True, "off": False}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rows, load_avg = [], []
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
        for c in [int(c) for c in args.concurrency.split(",")]:
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
    return rows, ttfb, load_avg


def print_batching(args, checkpoint: str, rows: list[dict], ttfb, load_avg: list[float]) -> None:
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
    for c in sorted({r["concurrency"] for r in rows}):
        print(f"batching speed-up at {c} clients: {by[('on', c)] / by[('off', c)]:.2f}x")
    if ttfb is not None:
        print(f"30-frame morph (GIF): time to first byte {ttfb[0]:.0f} ms, complete {ttfb[1]:.0f} ms (median of {args.morph_repeats})")


def main() -> None:
    args = parse_args()
    if args.scenario == "models":
        from serve_models import run_models

        return run_models(args)
    checkpoint = args.checkpoint or make_checkpoint(tempfile.mkdtemp(prefix="serve-load-"), args.resolution)
    if args.scenario != "batching":
        return run_scenario(args, checkpoint)
    rows, ttfb, load_avg = run_batching(args, checkpoint)
    print_batching(args, checkpoint, rows, ttfb, load_avg)


if __name__ == "__main__":
    main()
