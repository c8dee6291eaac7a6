"""The per-image work of ``styleray prepare`` and the two engines that run it: Ray Data, or a plain loop.

One image goes through three stages; each stage is a plain function of one item (a dict), so the Ray Data
pipeline and the single-process loop run exactly the same code:

    load     read bytes -> content key -> cached record? -> safe decode (pixel limit, modes, EXIF)
    segment  mask + alpha + confidence: the image's own alpha, the classic remover, or rembg
    finish   measurements (foreground, frame touch, cartoon score, framing), square on white, Lanczos,
             perceptual hash, features; write ``.prepare/cache/<key>.png`` then its record

Ray Data: ``from_items(listing)`` -> one ``map_batches`` stage that takes a whole block of the listing and runs
load -> segment -> finish on each of its images, returning records (JSON text). Classic remover: Ray tasks.
rembg: an actor pool, one ONNX session per actor, reused for every block the actor gets.

Why one stage, also for rembg: a pipeline of three stages (load in tasks -> rembg actors -> finish in tasks)
was measured against this one on 1000 × 320 px images at 2 CPUs (benchmarks/RESULTS.md, Prepare): 19–21 img/s
and 95–102 CPU ms per image, against 26 img/s and 75 ms for the single stage (the plain loop: 15.5 img/s,
64 ms). With every core busy, the split gains no overlap; it only adds work: decoded images pickled through the
object store twice, three tasks of driver-side scheduling per block, and six processes time-slicing two cores.
Execution streams, so memory stays bounded by the blocks in flight, whatever the number of images.

Accept/reject *decisions* on the measurements are taken later, on the driver (:mod:`styleray.datasets.prepare`),
so that changing a threshold or ``--framing`` re-runs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from styleray.datasets.prepare import checks
from styleray.datasets.prepare.clustering import image_features
from styleray.datasets.prepare.decode import UNREADABLE, Rejected, decode_image
from styleray.datasets.prepare.removers import RembgModel, RembgSegmenter, Segmentation, from_soft_alpha, segment_classic
from styleray.datasets.prepare.sources import Location, Store, read_source
from styleray.datasets.prepare.square import clean_alpha, on_white, square_on_white

log = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # bump when the per-image output changes: old records are then recomputed
STATE_DIR = ".prepare"
RECORDS_DIR = f"{STATE_DIR}/records"
CACHE_DIR = f"{STATE_DIR}/cache"
NO_MASK = "no-foreground"  # rejection code: the remover found nothing
ERROR = "error"  # rejection code: an unexpected failure on this image (a bug or a resource error), not a crash


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, picklable; built by prepare_dataset from a PrepareConfig."""

    source: Location
    out: Location
    resolution: int
    margin: float
    min_size: int
    max_pixels: int
    work_size: int
    remover: str  # "classic" or "rembg"
    rembg_model: RembgModel | None
    rembg_threads: int = 1

    def fingerprint(self) -> str:
        """Settings that change a record: part of every content key, so a change recomputes."""
        d = asdict(self)
        d.pop("source"), d.pop("out"), d.pop("rembg_threads")
        if self.rembg_model is not None:
            d["rembg_model"] = [self.rembg_model.session, _file_digest(self.rembg_model.path)]
        d["version"] = PIPELINE_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    """Name-independent identity of a model file: size + sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    return h.hexdigest()[:16]


def content_key(fingerprint: str, data: bytes) -> str:
    return hashlib.sha256(fingerprint.encode() + b"\0" + data).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Item:
    source: str  # relative key in SOURCE
    key: str = ""  # content key ("" when unreadable before hashing)
    record: dict | None = None  # set once the item is done (cached, rejected, or finished)
    rgb: np.ndarray | None = None
    alpha: np.ndarray | None = None  # the image's own alpha channel, uint8
    seg: Segmentation | None = None
    meta: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _rejected_record(item: Item, code: str, detail: str) -> dict:
    return {"key": item.key, "source": item.source, "status": "rejected", "reason": code, "detail": detail,
            "file": None, **item.meta, "seconds": item.seconds}


def _failed(item: Item, stage: str, e: Exception) -> Item:
    log.warning("prepare: %s failed on %s: %s: %s", stage, item.source, type(e).__name__, e)
    item.record = _rejected_record(item, ERROR, f"{stage} failed: {type(e).__name__}: {e}")
    item.rgb = item.alpha = item.seg = None
    return item


def load(job: Job, fingerprint: str, source: str, store: Store | None = None) -> Item:
    try:
        return _load(job, fingerprint, source, store)
    except Exception as e:  # one image's failure is that image's rejection, never the job's
        return _failed(Item(source), "load", e)


def _load(job: Job, fingerprint: str, source: str, store: Store | None) -> Item:
    t0 = time.perf_counter()
    item = Item(source)
    try:
        data = read_source(job.source, source)
    except (OSError, KeyError) as e:
        item.record = _rejected_record(item, UNREADABLE, f"cannot read the file: {e}")
        return item
    item.key = content_key(fingerprint, data)
    store = store or Store(job.out)
    cached = store.read(f"{RECORDS_DIR}/{item.key}.json")
    if cached is not None:
        item.record = {**json.loads(cached), "source": source, "cached": True}
        return item
    try:
        dec = decode_image(data, max_pixels=job.max_pixels, min_size=job.min_size, work_size=job.work_size)
    except Rejected as r:
        item.seconds["load"] = time.perf_counter() - t0
        item.record = _rejected_record(item, r.code, r.detail)
        _write_record(store, item.record)
        return item
    item.rgb, item.alpha = dec.rgb, dec.alpha
    item.meta = {"width": dec.width, "height": dec.height, "mode": dec.mode, "bytes": len(data)}
    item.seconds["load"] = time.perf_counter() - t0
    return item


def segment(item: Item, segmenter: RembgSegmenter | None) -> Item:
    """The mask: the image's own alpha when it has one, else the remover's."""
    if item.record is not None:
        return item
    try:
        return _segment(item, segmenter)
    except Exception as e:
        return _failed(item, "segment", e)


def _segment(item: Item, segmenter: RembgSegmenter | None) -> Item:
    t0 = time.perf_counter()
    if item.alpha is not None:
        item.seg, item.meta["mask_source"] = from_soft_alpha(item.alpha.astype(np.float32) / 255.0), "alpha"
    elif segmenter is not None:
        item.seg, item.meta["mask_source"] = from_soft_alpha(segmenter.alpha(item.rgb)), "rembg"
    else:
        item.seg, item.meta["mask_source"] = segment_classic(item.rgb), "classic"
    item.seconds["segment"] = time.perf_counter() - t0
    return item


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_record(store: Store, record: dict) -> None:
    if record.get("key"):
        store.write(f"{RECORDS_DIR}/{record['key']}.json", json.dumps(record, sort_keys=True).encode())


def finish(job: Job, item: Item, store: Store | None = None) -> dict:
    """Measurements + square output written to the cache; returns the item's record (also written)."""
    if item.record is not None:
        return item.record
    try:
        return _finish(job, item, store or Store(job.out))
    except Exception as e:
        return _failed(item, "finish", e).record


def _finish(job: Job, item: Item, store: Store) -> dict:
    t0 = time.perf_counter()
    seg, rgb = item.seg, item.rgb
    m = {"confidence": round(seg.confidence, 4),
         "foreground": round(checks.foreground_fraction(seg.mask), 4),
         "frame_touch": round(checks.frame_touch(seg.mask), 4)}
    item.meta.update(m)
    if not seg.mask.any():
        item.seconds["finish"] = time.perf_counter() - t0
        record = _rejected_record(item, NO_MASK, "the remover found no foreground")
        _write_record(store, record)
        return record
    item.meta["cartoon"] = round(checks.cartoon_score(rgb, seg.mask), 4)
    item.meta["framing"] = checks.classify_framing(seg.mask)
    out, out_alpha = square_on_white(rgb, clean_alpha(seg.alpha, seg.mask), seg.mask, job.resolution, job.margin)
    name = f"{item.key}.png"
    store.write(f"{CACHE_DIR}/{name}", _png_bytes(out))
    item.seconds["finish"] = time.perf_counter() - t0
    record = {"key": item.key, "source": item.source, "status": "processed", "reason": None, "detail": None,
              "file": name, **item.meta, "phash": checks.phash(on_white(rgb, item.alpha)),
              "features": [round(float(v), 5) for v in image_features(out, out_alpha)], "seconds": item.seconds}
    _write_record(store, record)
    return record


# ----------------------------------------------------------------------------------------------- engines


def run_loop(job: Job, sources: list[str]):
    """The plain single-process engine: the same stages, one image at a time. Yields records."""
    fingerprint = job.fingerprint()
    store = Store(job.out)
    segmenter = RembgSegmenter(job.rembg_model, job.rembg_threads) if job.remover == "rembg" else None
    for source in sources:
        yield process_image(job, fingerprint, source, store, segmenter)


def process_image(job: Job, fingerprint: str, source: str, store: Store, segmenter: RembgSegmenter | None) -> dict:
    """load -> segment -> finish for one image: its record. What both engines run."""
    return finish(job, segment(load(job, fingerprint, source, store), segmenter), store)


def _process(job: Job, fingerprint: str, sources, segmenter: RembgSegmenter | None) -> dict:
    """A block of listing rows -> {"record": JSON text per image}."""
    store = Store(job.out)
    records = [process_image(job, fingerprint, str(s), store, segmenter) for s in sources]
    return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def classic_batch(batch: dict, job: Job, fingerprint: str) -> dict:
    """Ray Data task, classic remover: a block of listing rows -> their records."""
    return _process(job, fingerprint, batch["source"], None)


class RembgBatch:
    """Ray Data actor, rembg: one ONNX session per actor, reused for every block it gets; a block of listing
    rows -> their records (decoding and finishing run here too: see the module docstring)."""

    def __init__(self, job: Job, fingerprint: str):
        self.job, self.fingerprint = job, fingerprint
        self.segmenter = RembgSegmenter(job.rembg_model, job.rembg_threads)

    def __call__(self, batch: dict) -> dict:
        return _process(self.job, self.fingerprint, batch["source"], self.segmenter)


def _placement(job: Job) -> dict:
    """map_batches arguments that keep every task on this node when SOURCE or OUT is a local path (other
    nodes of a cluster do not have it); with s3:// on both sides the pipeline may use the whole cluster."""
    if job.out.kind == "s3" and (job.source.kind == "s3" or job.source.s3):
        return {}
    import ray

    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log.warning("prepare: SOURCE or OUT is a local path, so the pipeline runs on this node only; use "
                    "s3:// for both to spread it over the cluster")
    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def build_dataset(job: Job, sources: list[str], *, workers: int, batch_size: int):
    """The Ray Data pipeline over `sources`: a Dataset of {"record": JSON text}.

    The listing is cut into blocks of at most `batch_size` images and every stage takes one whole block per
    call (`batch_size=None`): one task per block, as many tasks as blocks. Passing `batch_size` to
    `map_batches` instead would make Ray Data bundle blocks until it holds `batch_size` rows, and since the
    blocks are a little smaller than that, every task would take two of them: half as many tasks, twice as
    long, and a longer tail where one worker finishes alone."""
    import ray.data

    fingerprint = job.fingerprint()
    where = _placement(job)
    n_blocks = max(1, min(len(sources), -(-len(sources) // batch_size)))
    ds = ray.data.from_items([{"source": s} for s in sources], override_num_blocks=n_blocks)
    # Each task or actor keeps a core busy: one CPU each when there is a CPU per worker where they may run; a
    # share when --workers asks for more than that, so that all of them run (and rembg actors are all placed
    # rather than left pending).
    share = max(0.01, min(1.0, _cpus_here(where) / workers))
    if job.remover != "rembg":
        return ds.map_batches(classic_batch, fn_kwargs={"job": job, "fingerprint": fingerprint},
                              batch_size=None, num_cpus=share, compute=ray.data.TaskPoolStrategy(size=workers),
                              **where)
    # rembg: one actor stage (see the module docstring), one ONNX session per actor.
    return ds.map_batches(RembgBatch, fn_constructor_kwargs={"job": job, "fingerprint": fingerprint},
                          batch_size=None, num_cpus=share, compute=ray.data.ActorPoolStrategy(size=workers),
                          **where)


def _cpus_here(where: dict) -> float:
    """The CPUs the pipeline may use: those of the node `where` pins it to, else the cluster's."""
    import ray

    if where:
        node = where["label_selector"]["ray.io/node-id"]
        return next(float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["NodeID"] == node)
    return float(ray.cluster_resources().get("CPU", 0))


def run_ray(job: Job, sources: list[str], *, workers: int, batch_size: int):
    """The Ray Data engine: yields records as the pipeline streams them."""
    ds = build_dataset(job, sources, workers=workers, batch_size=batch_size)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        for text in batch["record"]:
            yield json.loads(text)
