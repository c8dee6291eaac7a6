"""Figures of ``styleray prepare``: throughput of the Ray Data pipeline vs a plain loop, and peak memory.

    python benchmarks/prepare.py gen --n 5000 --size 320          # raw sample figures, once, into --root
    python benchmarks/prepare.py speed                            # images/s: loop vs Ray at 1 and 2 CPUs
    python benchmarks/prepare.py memory --counts 1000,2500,5000   # peak memory of the whole process tree
    python benchmarks/prepare.py all                              # gen (if needed) + speed + memory

Every measurement runs in a fresh subprocess (a fresh Ray with ``num_cpus`` = 1 or 2), on a fresh OUT, so
nothing is cached. "loop" is ``engine="local"``: the same per-image functions called one after another in one
process, no Ray at all. "2 loops" is the machine's own ceiling at 2 CPUs: two such loops at once, each in its
own process on its own half of the images, sharing nothing (what perfect parallelism with no framework would
give on these cores; on a VM, two busy cores each run a little slower than one). Images/s is over the
pipeline only (``report.timings["pipeline_s"]``: Ray's start-up, the listing and the final publishing step are
excluded; they are printed separately).

rembg: the real U²-Net weights are a user-supplied file and are not on this machine (and nothing is ever
downloaded), so the rembg figures use a stand-in exported here: a fixed-weight border-contrast segmenter plus a
convolutional trunk that makes it cost like a real model (~9 GFLOP per 320x320 image; the real U²-Nets' costs
differ), run through rembg's ``u2net_custom`` session exactly as a real model would be.

CPU time: user + system seconds of the benchmark process and all its descendants (driver, raylet, GCS, agents,
workers, actors), sampled every 0.5 s so that processes Ray ends before the run returns still count. It is far
less sensitive than wall time to other work on a shared machine, so Ray's overhead is read from it.

Memory: the proportional set size (PSS: shared pages split between the processes that map them, so the Ray
object store is counted once) summed over the benchmark process and all its descendants (driver, raylet, GCS,
workers), sampled every 0.2 s, by the memory suite only: that sampling itself costs 0.1-0.3 of a core with
Ray's dozen processes, which would be taken from the run being timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "styleray-bench"


# ------------------------------------------------------------------------------------------------- data


def _render_range(args) -> int:
    out, start, stop, size, seed = args
    import numpy as np

    from styleray.datasets.synthetic import ASPECT_WEIGHTS, ASPECTS, render_figure

    made = 0
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i, 1])
        aspect = ASPECTS[int(rng.choice(len(ASPECTS), p=ASPECT_WEIGHTS))]
        jpeg = bool(rng.random() < 0.25)
        path = Path(out) / f"{i:06d}.{'jpg' if jpeg else 'png'}"
        if path.exists():
            continue
        image, _, _ = render_figure(i, size=size, seed=seed, aspect=aspect,
                                    background=("solid", "gradient")[i % 2])
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="JPEG" if jpeg else "PNG", **({"quality": 92} if jpeg else {}))
        os.replace(tmp, path)
        made += 1
    return made


def generate(out: Path, n: int, size: int, seed: int = 0, procs: int = 2) -> Path:
    """n raw figures (solid and gradient backgrounds, 1:1/4:3/3:4, a quarter JPEG) into out; skips existing."""
    from multiprocessing import Pool

    out.mkdir(parents=True, exist_ok=True)
    chunks = [(str(out), a, min(n, a + 100), size, seed) for a in range(0, n, 100)]
    t0 = time.time()
    with Pool(procs) as pool:
        made = sum(pool.imap_unordered(_render_range, chunks))
    print(f"gen: {made} new figures ({n} in all) at {size}px in {out} ({time.time() - t0:.0f}s)", flush=True)
    return out


def subset(images: Path, n: int, root: Path, start: int = 0) -> Path:
    """A folder of symlinks to n images from the start-th (so that counts can vary without copying)."""
    names = sorted(p for p in os.listdir(images) if not p.startswith("."))[start:start + n]
    if len(names) < n:
        raise SystemExit(f"{images} holds too few images for {start} + {n}: run `gen` with a larger --n")
    folder = root / (f"subset-{images.name}-{n}" + (f"-from{start}" if start else ""))
    if not folder.exists() or len(os.listdir(folder)) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in names:
            os.symlink(images / name, folder / name)
    return folder


def standin_model(path: Path) -> Path:
    """The rembg stand-in (see the module docstring), exported once."""
    if path.exists():
        return path
    import torch

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            c = 32
            self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
            self.body = torch.nn.ModuleList([torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(4)])
            self.down = torch.nn.ModuleList([torch.nn.Conv2d(c, c, 3, padding=1, stride=2) for _ in range(2)])
            self.low = torch.nn.ModuleList([torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(6)])
            self.out = torch.nn.Conv2d(c, 1, 1)
            for m in self.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.normal_(m.weight, std=0.05, generator=g)
                    torch.nn.init.zeros_(m.bias)

        def forward(self, x):  # [1, 3, 320, 320] -> [1, 1, 320, 320]
            h = torch.relu(self.stem(x))
            for conv in self.body:  # 320x320x32: ~1.9 GFLOP each
                h = torch.relu(conv(h))
            for conv in self.down:
                h = torch.relu(conv(h))
            for conv in self.low:  # 80x80x32
                h = torch.relu(conv(h))
            trunk = torch.nn.functional.interpolate(self.out(h), size=x.shape[-2:], mode="bilinear")
            s = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
            b = 12
            corners = torch.cat([s[..., :b, :b], s[..., :b, -b:], s[..., -b:, :b], s[..., -b:, -b:]], dim=3)
            dist = ((s - corners.mean(dim=(2, 3), keepdim=True)) ** 2).sum(1, keepdim=True).sqrt()
            return torch.sigmoid(30.0 * dist - 12.0 + 1e-3 * trunk)  # the trunk's cost, the contrast's mask

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(StandIn().eval(), torch.zeros(1, 3, 320, 320), str(path), input_names=["input"],
                          output_names=["mask"], dynamo=False, opset_version=17)
    return path


# ------------------------------------------------------------------------------------------ measurement


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (Linux)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_cpu_ticks(pid: int) -> dict[int, int]:
    """pid -> CPU ticks (user + system) so far, for pid and its living descendants."""
    kids, todo, out = _children(), [pid], {}
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(kids.get(p, []))
    return out


class CpuMeter:
    """CPU seconds used by this process and its descendants between start() and stop(), sampled every 0.5 s:
    Ray Data ends its actors and Ray its idle workers before the run returns, and a process that is gone can
    no longer be read (the last < 0.5 s of such a process is missed)."""

    def start(self) -> "CpuMeter":
        self.base = _tree_cpu_ticks(os.getpid())
        self.last = dict(self.base)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop_event.wait(0.5):
            self.last.update(_tree_cpu_ticks(os.getpid()))

    def stop(self) -> float:
        self.stop_event.set()
        self.thread.join()
        self.last.update(_tree_cpu_ticks(os.getpid()))
        ticks = sum(t - self.base.get(p, 0) for p, t in self.last.items())
        return ticks / os.sysconf("SC_CLK_TCK")


def _tree_pss(pid: int) -> int:
    """Bytes of PSS summed over pid and all its descendants."""
    kids, todo, total = _children(), [pid], 0
    while todo:
        p = todo.pop()
        total += _pss_kib(p)
        todo.extend(kids.get(p, []))
    return total * 1024


def run_one(spec: dict, memory: bool = False) -> dict:
    """Runs one measurement in a subprocess; returns its JSON result, plus the peak PSS of its process tree
    when `memory`. Speed runs do not sample memory: reading smaps_rollup of every Ray process five times a
    second costs this (unmeasured) process 0.1-0.3 of a core, taken from the run it measures on 2 cores."""
    cmd = [sys.executable, __file__, "_one", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"})
    peak, samples = 0, []
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            pss = _tree_pss(proc.pid)
            peak = max(peak, pss)
            samples.append(pss)
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    if memory:
        t.start()
    out, _ = proc.communicate()
    stop.set()
    if memory:
        t.join()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({proc.returncode}): {spec}\n{out[-2000:]}")
    result = json.loads(lines[-1])
    result["peak_pss_mib"] = round(peak / 2**20, 1) if memory else None
    return result


def run_split(spec: dict, halves: list[Path]) -> dict:
    """The machine's own ceiling at 2 CPUs: two plain loops at once, each in its own process on its own half
    of the images (no Ray, no hand-over, nothing shared). img/s counts every image over the longer of the two
    pipelines (both start together: each is a fresh process started at the same moment)."""
    results: list[dict] = [{}, {}]

    def go(i: int):
        results[i] = run_one({**spec, "mode": "loop", "cpus": 1, "source": str(halves[i]),
                              "out": f"{spec['out']}-{i}"})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(results):
        raise RuntimeError(f"one of the two loops failed: {spec}")
    listed = sum(r["listed"] for r in results)
    slowest = max(r["pipeline_s"] for r in results)
    cpu_ms = sum(r["cpu_ms_per_image"] * r["listed"] for r in results) / listed
    return {**results[0], **spec, "listed": listed, "accepted": sum(r["accepted"] for r in results),
            "pipeline_s": round(slowest, 2), "images_per_s": round(listed / slowest, 2),
            "cpu_ms_per_image": round(cpu_ms, 2), "ray_start_s": 0.0, "batch_size": None,
            "halves_s": [r["pipeline_s"] for r in results]}


def _one(spec: dict) -> None:
    """Inside the subprocess: start Ray if asked, run prepare_dataset, print one JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from styleray.datasets.prepare import PrepareConfig, prepare_dataset

    t0 = time.perf_counter()
    if spec["mode"] != "loop":
        import ray

        ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    shutil.rmtree(spec["out"], ignore_errors=True)
    cfg = PrepareConfig(source=spec["source"], out=spec["out"], resolution=spec["resolution"],
                        remover=spec["remover"], rembg_model=spec.get("model") or "u2net",
                        engine="local" if spec["mode"] == "loop" else "ray",
                        workers=None if spec["mode"] == "loop" else spec.get("workers", spec["cpus"]), progress=False,
                        min_size=32, batch_size=spec.get("batch_size"))
    meter = CpuMeter().start()  # Ray's processes included
    report = prepare_dataset(cfg)
    cpu_s = meter.stop()
    print(json.dumps({**spec, "ray_start_s": round(t_ray, 2), "cpu_ms_per_image": round(1000 * cpu_s / report.listed, 2),
                      "pipeline_s": report.timings["pipeline_s"],
                      "images_per_s": report.timings["images_per_s"], "total_s": report.timings["total_s"],
                      "finalize_s": report.timings["finalize_s"], "accepted": report.accepted,
                      "listed": report.listed, "stage_s": report.timings["stage_s"],
                      "batch_size": report.batch_size}), flush=True)
    shutil.rmtree(spec["out"], ignore_errors=True)


# ------------------------------------------------------------------------------------------------ suites


MODES = (("loop", 1), ("loop", 2), ("ray", 1), ("ray", 2))  # ("loop", 2): two loops at once, half each


def speed(root: Path, cases: list[tuple[str, int, int, str]], repeats: int) -> list[dict]:
    """cases: (label, raw size, n, remover). Each mode `repeats` times, interleaved; the best run counts."""
    rows = []
    model = str(standin_model(root / "models" / "standin.onnx"))
    for label, size, n, remover in cases:
        images = generate(root / f"raw{size}", max(n, 1), size) if not (root / f"raw{size}").exists() else root / f"raw{size}"
        if len(os.listdir(images)) < n:
            generate(images, n, size)
        source = subset(images, n, root)
        halves = [subset(images, n // 2, root), subset(images, n - n // 2, root, start=n // 2)]
        best: dict[tuple, dict] = {}
        min_cpu: dict[tuple, float] = {}  # CPU time is robust to other load on the machine: the least counts
        for _ in range(repeats):
            for mode, cpus in MODES:
                spec = dict(mode=mode, cpus=cpus, source=str(source), out=str(root / "out-speed"), resolution=256,
                            remover=remover, model=model if remover == "rembg" else None, n=n, size=size,
                            label=label)
                r = run_split(spec, halves) if (mode, cpus) == ("loop", 2) else run_one(spec)
                key = (mode, cpus)
                r["load_avg"] = round(os.getloadavg()[0], 1)
                min_cpu[key] = min(min_cpu.get(key, float("inf")), r["cpu_ms_per_image"])
                if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
                    best[key] = r
                name = "2 loops" if (mode, cpus) == ("loop", 2) else f"{mode} {cpus} CPU"
                print(f"  {label:28s} {name:10s} {r['images_per_s']:7.1f} img/s  "
                      f"{r['cpu_ms_per_image']:6.1f} CPU ms/img  (pipeline {r['pipeline_s']:.1f}s, ray start "
                      f"{r['ray_start_s']:.1f}s, batch {r['batch_size']}, load {os.getloadavg()[0]:.1f})", flush=True)
        loop = best[("loop", 1)]
        for key, r in best.items():
            r["min_cpu_ms"] = min_cpu[key]
        for (mode, cpus), r in best.items():
            r["vs_loop"] = round(r["images_per_s"] / loop["images_per_s"], 2)
            r["cpu_vs_loop"] = round(r["min_cpu_ms"] / loop["min_cpu_ms"], 2)
            rows.append(r)
    return rows


def memory(root: Path, counts: list[int], size: int) -> list[dict]:
    images = root / f"raw{size}"
    generate(images, max(counts), size)
    rows = []
    for n in counts:
        spec = dict(mode="ray", cpus=2, source=str(subset(images, n, root)), out=str(root / "out-mem"),
                    resolution=256, remover="classic", n=n, size=size, label=f"memory {n}")
        r = run_one(spec, memory=True)
        print(f"  {n:5d} images: peak PSS {r['peak_pss_mib']:.0f} MiB, {r['images_per_s']:.1f} img/s", flush=True)
        rows.append(r)
    idle = run_one(dict(mode="ray", cpus=2, source=str(subset(images, 8, root)), out=str(root / "out-mem"),
                        resolution=256, remover="classic", n=8, size=size, label="memory 8"), memory=True)
    print(f"  {8:5d} images: peak PSS {idle['peak_pss_mib']:.0f} MiB (Ray's own footprint)", flush=True)
    return [idle] + rows


def markdown(speed_rows: list[dict], mem_rows: list[dict]) -> str:
    lines = []
    if speed_rows:
        lines += ["| case | images | loop img/s | 2 loops img/s (vs loop) | Ray 1 CPU img/s (vs loop) "
                  "| Ray 2 CPUs img/s (vs loop; vs 2 loops) | CPU ms/img: loop / Ray 1 / Ray 2 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        by_label: dict[str, dict] = {}
        for r in speed_rows:
            by_label.setdefault(r["label"], {})[(r["mode"], r["cpus"])] = r
        for label, d in by_label.items():
            lp, l2, r1, r2 = d[("loop", 1)], d[("loop", 2)], d[("ray", 1)], d[("ray", 2)]
            lines.append(f"| {label} | {lp['n']} | {lp['images_per_s']:.1f} | {l2['images_per_s']:.1f} "
                         f"({l2['vs_loop']:.2f}x) | {r1['images_per_s']:.1f} ({r1['vs_loop']:.2f}x) "
                         f"| {r2['images_per_s']:.1f} ({r2['vs_loop']:.2f}x; "
                         f"{r2['images_per_s'] / l2['images_per_s']:.2f}) "
                         f"| {lp['min_cpu_ms']:.1f} / {r1['min_cpu_ms']:.1f} / {r2['min_cpu_ms']:.1f} |")
    if mem_rows:
        lines += ["", "| images (Ray, 2 CPUs, classic) | peak PSS of all processes | img/s |", "|---:|---:|---:|"]
        for r in mem_rows:
            lines.append(f"| {r['n']} | {r['peak_pss_mib']:.0f} MiB | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


CASES = {  # sized so that the loop runs for ~30-40 s: Ray's fixed start-up costs (workers, actors) amortise
    "classic128": ("classic, 128 px raw", 128, 2000, "classic"),
    "classic320": ("classic, 320 px raw", 320, 1000, "classic"),
    "classic1024": ("classic, 1024 px raw", 1024, 200, "classic"),
    "rembg320": ("rembg stand-in, 320 px raw", 320, 600, "rembg"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["gen", "speed", "memory", "all", "_one"])
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where raw images, models and outputs go")
    p.add_argument("--n", type=int, default=5000, help="gen: number of figures")
    p.add_argument("--size", type=int, default=320, help="gen/memory: raw image size (longer side, px)")
    p.add_argument("--counts", default="1000,2500,5000", help="memory: image counts")
    p.add_argument("--repeats", type=int, default=2, help="speed: runs per mode (best counts)")
    p.add_argument("--cases", default=",".join(CASES), help=f"speed: which of {', '.join(CASES)}")
    p.add_argument("--count", type=int, default=None,
                   help="speed: images per case instead of the case's own count (fixed costs show as n varies)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.what == "_one":
        _one(json.loads(args.spec))
        return 0
    if args.what == "gen":
        generate(args.root / f"raw{args.size}", args.n, args.size)
        return 0
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    cases = [CASES[c] for c in args.cases.split(",")]
    if args.count:
        cases = [(label, size, args.count, remover) for label, size, _, remover in cases]
    speed_rows = speed(args.root, cases, args.repeats) if args.what in ("speed", "all") else []
    counts = [int(c) for c in args.counts.split(",")]
    mem_rows = memory(args.root, counts, args.size) if args.what in ("memory", "all") else []
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(markdown(speed_rows, mem_rows))
    if args.json:
        args.json.write_text(json.dumps({"speed": speed_rows, "memory": mem_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
