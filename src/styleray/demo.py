"""``styleray demo``: the whole story on the built-in sample data, on one machine, on one local Ray cluster.

    [1/5] raw     sample cartoon figures on solid/gradient/noise/stripes backgrounds   OUT/raw/images/
    [2/5] prepare Ray Data, classic background remover -> square white-background PNGs OUT/data/
    [3/5] train   Ray Train, 2 CPU workers (gloo), the cpu-tiny preset                 OUT/run-<res>px/
    [4/5] serve   Ray Serve on 127.0.0.1:--port (samples, morphs, explorer page, /docs)
    [5/5] fetch   a sample grid PNG and a morph GIF over HTTP                          OUT/grid.png, OUT/morph.gif

then print the URLs (web page, API docs, Ray dashboard) and serve until Ctrl-C (``--no-wait``: exit).
Re-running resumes: the raw images are kept when their settings match, ``prepare`` skips finished images,
training continues from the run's last checkpoint (or is skipped when it already reached --kimg).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from styleray import storage

log = logging.getLogger(__name__)

STAGES = 5
NUM_CPUS = 2  # the local Ray cluster: this machine's two cores (fractional CPUs keep every stage placeable)
WORKERS = 2  # Ray Train workers
PRESET = "cpu-tiny"
GRID_SEEDS = list(range(64))  # 8 x 8 grid
MORPH_SEEDS = [1, 2, 3, 4]
TRUNCATION = 0.7  # safer samples for the grid and the morph
HTTP_TIMEOUT_S = 120.0  # one request (the grid is 64 images on one CPU)
READY_TIMEOUT_S = 120.0  # Serve up and answering /healthz


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-output"  # --out: where raw images, data, run, samples go
    images: int = 512  # --images: raw sample images to make
    resolution: int = 16  # --resolution: training resolution, pixels (a power of two, 16..128)
    kimg: float = 24.0  # --kimg: training length, thousands of images shown to the discriminator
    port: int = 8000  # --port: HTTP port of Ray Serve on 127.0.0.1; 0 = any free port
    raw_size: int = 128  # --raw-size: longer side of the raw images, pixels
    wait: bool = True  # serve until Ctrl-C (False: --no-wait)

    def __post_init__(self) -> None:
        batch = 16  # cpu-tiny's batch: one batch of images is the least the trainer can use
        if self.images < batch:
            raise ValueError(f"--images {self.images} must be >= {batch} (one cpu-tiny batch; the demo default is 512)")
        if not 16 <= self.resolution <= 128 or self.resolution & (self.resolution - 1):
            raise ValueError(f"--resolution {self.resolution} must be a power of two within 16..128 (e.g. 16 or 32)")
        if not self.kimg > 0:
            raise ValueError(f"--kimg {self.kimg} must be > 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} must lie in 0-65535 (0: any free port)")
        if not 64 <= self.raw_size <= 2048:
            raise ValueError(f"--raw-size {self.raw_size} must lie within 64..2048 (prepare rejects images under 64 px)")

    @property
    def raw_dir(self) -> str:
        return os.path.join(self.out, "raw")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.out, "data")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.out, f"run-{self.resolution}px")


# ---------------------------------------------------------------------------------------------------------
# Helpers: output, atomic writes, ports, HTTP
# ---------------------------------------------------------------------------------------------------------


def say(text: str) -> None:
    """Stage headers and results go to stdout (the user's view); details go to logging."""
    print(text, flush=True)


def pick_port(port: int) -> int:
    """``port`` if it is free on 127.0.0.1 (a clear error if not), or any free port for 0."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(
                f"--port {port} is in use on 127.0.0.1 (another styleray serve or demo?): pass another --port, "
                "or --port 0 for any free one"
            ) from None
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = HTTP_TIMEOUT_S,
         api_key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("X-API-Key", api_key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_until_answers(url: str, timeout_s: float, api_key: str | None = None) -> None:
    """Poll ``url`` until it answers 200, or raise TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _, _ = http("GET", url, timeout=10, api_key=api_key)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5)  # poll interval
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s (last: {last})")


class Stopwatch:
    """Seconds per stage, printed at the end and written to OUT/timings.json."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.stages: dict[str, float] = {}
        self._started = self.t0

    def start(self, index: int, name: str, what: str) -> None:
        self._name, self._started = name, time.monotonic()
        say(f"\n[{index}/{STAGES}] {name}: {what}")

    def done(self, result: str) -> None:
        seconds = time.monotonic() - self._started
        self.stages[self._name] = round(seconds, 1)
        say(f"[{self._name}] {result} ({seconds:.0f}s)")

    @property
    def total(self) -> float:
        return time.monotonic() - self.t0


# ---------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------


def make_raw(cfg: DemoConfig) -> str:
    """Raw sample figures in OUT/raw/images; kept when the stamp says they were made with these settings."""
    from styleray.datasets.synthetic import make_sample_dataset

    stamp_path = os.path.join(cfg.raw_dir, "demo-raw.json")  # written first (complete: false), then completed
    stamp = {"images": cfg.images, "size": cfg.raw_size, "seed": 0, "complete": True}
    try:
        with open(stamp_path, encoding="utf-8") as f:
            if json.load(f) == stamp:
                return f"kept {cfg.images} raw images from an earlier run"
    except (OSError, ValueError):
        pass
    if os.path.isdir(cfg.raw_dir) and os.listdir(cfg.raw_dir):
        if not os.path.exists(stamp_path):  # never delete a folder the demo did not make
            raise ValueError(f"--out {cfg.out}: {cfg.raw_dir} exists and was not made by styleray demo; "
                             "choose another --out (e.g. demo-output)")
        shutil.rmtree(cfg.raw_dir)  # other settings, or interrupted: no stale image may reach prepare
    os.makedirs(cfg.raw_dir)
    storage.write_bytes(stamp_path, json.dumps({**stamp, "complete": False}).encode())
    make_sample_dataset(cfg.raw_dir, n=cfg.images, size=cfg.raw_size, seed=0, masks=False, progress=True)
    storage.write_bytes(stamp_path, json.dumps(stamp).encode())
    return f"made {cfg.images} raw images (up to {cfg.raw_size}px, solid/gradient/noise/stripes backgrounds)"


def prepare(cfg: DemoConfig) -> str:
    from styleray.datasets.prepare import PrepareConfig, prepare_dataset

    report = prepare_dataset(PrepareConfig(
        source=os.path.join(cfg.raw_dir, "images"), out=cfg.data_dir, resolution=cfg.resolution,
        remover="classic", engine="ray", workers=NUM_CPUS, progress=True,
    ))
    if report.accepted < 16:
        raise ValueError(
            f"prepare accepted only {report.accepted} of {report.listed} images ({report.rejections}); "
            "the demo needs at least one batch of 16: raise --images"
        )
    return (f"{report.accepted} of {report.listed} accepted ({report.processed} processed, {report.cached} "
            f"cached; rejected: {report.rejections or 'none'}) -> {report.out}")


def _settings(cfg: DemoConfig):
    from styleray.settings import TrainSettings

    tick = min(0.5, cfg.kimg / 4)  # the preset's tick, or at least four ticks on a short run
    return TrainSettings(data=os.path.abspath(cfg.data_dir), out=os.path.abspath(cfg.run_dir), preset=PRESET,
                         workers=WORKERS, kimg=cfg.kimg, tick=tick, mirror=True, max_failures=1,
                         placement_timeout=120)


def train(cfg: DemoConfig) -> str:
    from styleray.datasets.read.ray_data import inspect_dataset
    from styleray.platform import checkpoint as ckpt_lib
    from styleray.platform.train import ray_train

    settings = _settings(cfg)
    latest = ckpt_lib.load_latest(settings.out)
    if latest is not None and latest.kimg >= cfg.kimg - 1e-6:
        return f"already trained to {latest.kimg:.1f} kimg ({latest.uri})"
    if latest is not None:
        say(f"continuing from {latest.name} at {latest.kimg:.1f} kimg")
    data = inspect_dataset(settings.data)
    run = settings.resolve(data.resolution, data.channels, data.num_classes)
    with TrainingProgress(os.path.join(run.out, "metrics.jsonl"), cfg.kimg):
        summary = ray_train.fit(run, data=data, resume="latest", options=ray_train.RayOptions.from_settings(settings))
    return f"trained to {summary['kimg']:.1f} kimg -> {summary['checkpoint']}"


class TrainingProgress:
    """Prints one line per training tick, read from the run's metrics.jsonl (rank 0 appends a line per tick),
    with the rate and the time left; a background thread while ``fit`` runs."""

    def __init__(self, path: str, target_kimg: float, poll_s: float = 1.0):
        self.path, self.target, self.poll_s = path, target_kimg, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="demo-progress", daemon=True)
        self._offset = os.path.getsize(path) if os.path.exists(path) else 0  # only this run's ticks

    def __enter__(self) -> "TrainingProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._read()  # the last ticks

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read()

    def _read(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written is read next time
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            rate = r.get("img_per_sec") or 0.0
            left = max(self.target - r.get("kimg", 0.0), 0.0) * 1000 / rate if rate > 0 else float("nan")
            say(f"  kimg {r.get('kimg', 0.0):6.2f} / {self.target:g}  {rate:5.1f} img/s  "
                f"G {r.get('loss_G', float('nan')):.2f}  D {r.get('loss_D', float('nan')):.2f}  "
                f"p {r.get('augment_p', 0.0):.3f}  about {left / 60:.1f} min left")


def serve(cfg: DemoConfig, port: int) -> str:
    """Start the Serve application on 127.0.0.1:port and wait until it answers; returns its base URL."""
    from ray import serve as ray_serve

    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    args = ServeArgs(checkpoint=os.path.abspath(cfg.run_dir), device="cpu", cpus_per_replica=1.0)
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray_serve.run(build_app(args), name="styleray", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_until_answers(f"{base}/healthz", READY_TIMEOUT_S, api_key=_api_key(args))
    return base


def _api_key(args=None) -> str | None:
    from styleray.serve.args import DEFAULT_API_KEY_ENV

    return os.environ.get(args.api_key_env if args is not None else DEFAULT_API_KEY_ENV) or None


def fetch(cfg: DemoConfig, base: str) -> dict[str, str]:
    """The sample grid and the morph GIF over HTTP into OUT; checks both decode as what was asked for."""
    from io import BytesIO

    from PIL import Image

    key = _api_key()
    grid_req = {"seeds": GRID_SEEDS, "truncation": TRUNCATION, "cols": 8, "pad": 2}
    status, _, grid = http("POST", f"{base}/v1/samples", grid_req, api_key=key)
    if status != 200:
        raise RuntimeError(f"POST {base}/v1/samples answered {status}: {grid[:300]!r}")
    morph_url = (f"{base}/v1/morph?seeds={','.join(map(str, MORPH_SEEDS))}&steps=16&loop=true"
                 f"&truncation={TRUNCATION}&fps=20")
    status, _, gif = http("GET", morph_url, api_key=key)
    if status != 200:
        raise RuntimeError(f"GET {morph_url} answered {status}: {gif[:300]!r}")
    side = 8 * cfg.resolution + 7 * 2
    with Image.open(BytesIO(grid)) as im:
        if im.format != "PNG" or im.size != (side, side):
            raise RuntimeError(f"the grid is a {im.format} of {im.size}, expected a PNG of {side}x{side}")
    with Image.open(BytesIO(gif)) as im:
        if im.format != "GIF" or im.n_frames != 16 * len(MORPH_SEEDS):
            raise RuntimeError(f"the morph is a {im.format} of {getattr(im, 'n_frames', 1)} frames")
    paths = {"grid": os.path.join(cfg.out, "grid.png"), "morph": os.path.join(cfg.out, "morph.gif")}
    storage.write_bytes(paths["grid"], grid)
    storage.write_bytes(paths["morph"], gif)
    return paths


def urls(base: str, dashboard: str | None) -> dict[str, str]:
    found = {"web page": f"{base}/", "API docs": f"{base}/docs"}
    if dashboard:
        found["Ray dashboard"] = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
    return found


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def start_ray():
    """One private local cluster for every stage (never one another process started)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        raise RuntimeError("styleray demo starts its own local Ray cluster: call it with Ray not initialised")
    # The workers' logs stay in Ray's session folder (printed below): the demo prints its own progress.
    context = ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                       log_to_driver=False)
    import ray.data
    import ray.serve  # noqa: F401 - configures its logger on import; quieted below

    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return context


def run_demo(cfg: DemoConfig) -> int:
    cfg_out = os.path.abspath(cfg.out)
    os.makedirs(cfg_out, exist_ok=True)
    port = pick_port(cfg.port)  # fail before any work when the port is taken
    clock = Stopwatch()
    say(f"styleray demo -> {cfg_out}: {cfg.images} images, {cfg.resolution}px, {PRESET} for {cfg.kimg:g} kimg "
        f"on {WORKERS} Ray Train workers, Serve on 127.0.0.1:{port}")
    say("starting a local Ray cluster (2 CPUs, dashboard on 127.0.0.1)")
    context = start_ray()
    dashboard = getattr(context, "dashboard_url", None) or None
    import ray

    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    if session:
        say(f"Ray logs (training workers, Serve replicas): {session}/logs")
    from ray import serve as ray_serve

    try:
        clock.start(1, "raw", f"sample cartoon figures with backgrounds -> {cfg.raw_dir}")
        clock.done(make_raw(cfg))
        clock.start(2, "prepare", f"Ray Data, classic background remover, {cfg.resolution}px on white -> {cfg.data_dir}")
        clock.done(prepare(cfg))
        clock.start(3, "train", f"Ray Train, {WORKERS} CPU workers, {PRESET} at {cfg.resolution}px to {cfg.kimg:g} kimg "
                    f"-> {cfg.run_dir} (resumes if interrupted)")
        clock.done(train(cfg))
        clock.start(4, "serve", f"Ray Serve on http://127.0.0.1:{port}")
        base = serve(cfg, port)
        clock.done(f"answering at {base}")
        clock.start(5, "fetch", "a sample grid PNG and a morph GIF over HTTP")
        paths = fetch(cfg, base)
        clock.done(f"{paths['grid']}, {paths['morph']}")
        timings = {"stages_s": clock.stages, "total_s": round(clock.total, 1), "config": asdict(cfg),
                   "loadavg": _loadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_bytes(os.path.join(cfg.out, "timings.json"), (json.dumps(timings, indent=1) + "\n").encode())
        say(f"\ndone in {clock.total:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in clock.stages.items()) + ")")
        for name, url in urls(base, dashboard).items():
            say(f"  {name + ':':15s} {url}")
        token = _auth_token_file()
        if dashboard and token:
            say(f"  {'Ray token:':15s} {token} (token auth is on: the dashboard asks for it)")
        if cfg.wait:
            say("serving; press Ctrl-C to stop")
            _wait_for_stop()
    finally:
        if ray.is_initialized():
            ray_serve.shutdown()
        ray.shutdown()
    return 0


def _wait_for_stop() -> None:
    """Block until Ctrl-C (KeyboardInterrupt) or SIGTERM."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    say("stopping")


def _auth_token_file() -> str | None:
    """Where the cluster's auth token lies, when token auth is on (Ray's default)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return path if os.path.exists(path) else None


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg", encoding="utf-8") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None
