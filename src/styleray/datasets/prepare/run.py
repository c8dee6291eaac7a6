"""``styleray prepare``: from a folder, zip or bucket of raw images to a clean, square, white-background dataset.

    prepare_dataset(PrepareConfig(source="raw/", out="data/", resolution=256)) -> PrepareReport

1. List SOURCE (recursive; hidden files and non-images are counted as ignored).
2. Run the per-image pipeline (:mod:`styleray.datasets.prepare.pipeline`) on Ray Data, or in a plain loop with
   ``engine="local"``. Every image's outcome is a *record* in ``OUT/.prepare/records/<key>.json`` (key: hash of
   the file's bytes and of the settings that shape the output); a processed image waits in
   ``OUT/.prepare/cache/<key>.png``. A re-run finds these and skips the work.
3. Decide on the driver: thresholds (``--min-confidence``, ``--min-foreground``, ``--max-frame-touch``,
   ``--min-cartoon``), near-duplicates (``--dup-distance``), ``--framing``; then labels: the k-means cluster
   with ``--clusters K``, else the framing class.
4. Publish: accepted images are moved to the OUT root as ``<key>.png`` (everything else is moved back to the
   cache), then ``dataset.json`` (the trainer's format: ``{"labels": [[file, class], ...], "classes": [...]}``),
   ``report.json`` and ``.prepare/contact_sheet.png``. Only accepted PNGs ever sit at the root, so the trainer's
   reader, which reads every image under OUT, sees exactly the dataset. Thresholds and ``--framing`` can change
   between runs at the cost of step 3-4 only.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from styleray.datasets.prepare import checks, contact_sheet
from styleray.datasets.prepare.clustering import kmeans
from styleray.datasets.prepare.pipeline import CACHE_DIR, RECORDS_DIR, STATE_DIR, Job, run_loop, run_ray
from styleray.datasets.prepare.config import DEFAULT_REMBG_MODEL, FRAMINGS, PrepareConfig
from styleray.datasets.prepare.removers import default_remover, resolve_rembg_model
from styleray.datasets.prepare.sources import Store, list_sources, read_source

__all__ = ["PrepareConfig", "PrepareReport", "prepare_dataset"]
log = logging.getLogger(__name__)
OUTPUT_NAME = re.compile(r"^[0-9a-f]{24}\.png$")
CONTACT_SHEET = f"{STATE_DIR}/contact_sheet.png"


@dataclass
class PrepareReport:
    source: str
    out: str
    remover: str  # what ran: classic, or rembg:<model>
    engine: str
    workers: int
    batch_size: int = 0  # images per Ray Data task (0: the local engine)
    listed: int = 0  # image files found in SOURCE
    ignored: int = 0  # other files (hidden, not an image extension)
    processed: int = 0  # images worked on in this run
    cached: int = 0  # images whose record a previous run left
    accepted: int = 0
    rejected: int = 0
    filtered: int = 0  # accepted by the checks but not of the --framing kept
    rejections: dict = field(default_factory=dict)  # reason -> count
    framing: dict = field(default_factory=dict)  # framing -> count, over the accepted and filtered
    classes: list = field(default_factory=list)  # class names, index = label
    class_counts: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds: list, pipeline, finalize, total; images_per_s
    config: dict = field(default_factory=dict)
    dataset_json: str = ""
    contact_sheet: str = ""
    report_json: str = ""
    files: list = field(default_factory=list)  # one summary per source file

    def summary(self) -> str:
        lines = [f"prepared {self.accepted} of {self.listed} images into {self.out} "
                 f"({self.remover}, {self.engine}, {self.workers} workers; {self.cached} cached)",
                 f"rejected {self.rejected}: " + (", ".join(f"{k} {v}" for k, v in sorted(self.rejections.items()))
                                                   or "none")]
        if self.filtered:
            lines.append(f"filtered by --framing: {self.filtered}")
        lines.append("classes: " + ", ".join(f"{c} {n}" for c, n in zip(self.classes, self.class_counts)))
        t = self.timings
        lines.append(f"time: {t.get('total_s', 0):.1f}s ({t.get('images_per_s', 0):.1f} images/s in the pipeline)")
        lines.append(f"report: {self.report_json}   contact sheet: {self.contact_sheet}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- decisions


def _decide(records: list[dict], cfg: PrepareConfig) -> None:
    """Sets status/reason/detail of processed records in place (source order)."""
    for r in records:
        if r["status"] == "rejected":
            continue
        r["status"], r["reason"], r["detail"] = "accepted", None, None
        for code, bad, detail in (
            (checks.LOW_CONFIDENCE, r["confidence"] < cfg.min_confidence,
             f"mask confidence {r['confidence']:.3f} < --min-confidence {cfg.min_confidence}"),
            (checks.FOREGROUND_TOO_SMALL, r["foreground"] < cfg.min_foreground,
             f"foreground {r['foreground']:.3f} of the image < --min-foreground {cfg.min_foreground}"),
            (checks.TOUCHES_FRAME, r["frame_touch"] > cfg.max_frame_touch,
             f"foreground on {r['frame_touch']:.3f} of the edge pixels > --max-frame-touch {cfg.max_frame_touch}"),
            (checks.PHOTOGRAPHIC, r["cartoon"] < cfg.min_cartoon,
             f"cartoon score {r['cartoon']:.3f} < --min-cartoon {cfg.min_cartoon} (too photographic)"),
        ):
            if bad:
                r["status"], r["reason"], r["detail"] = "rejected", code, detail
                break
    accepted = [r for r in records if r["status"] == "accepted"]
    originals = checks.near_duplicates([r["phash"] for r in accepted], cfg.dup_distance)
    for r, orig in zip(accepted, originals):
        if orig is not None:
            o = accepted[orig]
            r["status"], r["reason"] = "rejected", checks.NEAR_DUPLICATE
            r["detail"] = f"near-duplicate of {o['source']} ({checks.hamming(r['phash'], o['phash'])} bits apart)"
    for r in records:
        if r["status"] == "accepted" and cfg.framing != "all" and r["framing"] != cfg.framing:
            r["status"], r["reason"], r["detail"] = "filtered", "framing", f"{r['framing']} (--framing {cfg.framing})"


def _labels(accepted: list[dict], cfg: PrepareConfig) -> tuple[list[int], list[str]]:
    if cfg.clusters:
        k = min(cfg.clusters, len(accepted))
        if k < cfg.clusters:
            log.warning("--clusters %d > %d accepted images: using %d clusters", cfg.clusters, len(accepted), k)
        feats = np.array([r["features"] for r in accepted], np.float32)
        labels = kmeans(feats, k, seed=cfg.seed).tolist() if k else []
        return labels, [f"cluster-{i}" for i in range(max(k, 1))]
    return [FRAMINGS.index(r["framing"]) for r in accepted], list(FRAMINGS)


# ----------------------------------------------------------------------------------------------- publish


def _parallel(fn, args: list, store: Store) -> None:
    if not args:
        return
    if store.loc.kind == "local":
        for a in args:
            fn(*a)
        return
    with ThreadPoolExecutor(max_workers=16) as pool:  # S3: requests in flight
        list(pool.map(lambda a: fn(*a), args))


def _publish(store: Store, keep: set[str]) -> set[str]:
    """Moves the files of `keep` to the root and every other output PNG into the cache; returns missing ones."""
    root = {f for f in store.list("") if OUTPUT_NAME.match(f)}
    cache = {f for f in store.list(CACHE_DIR) if OUTPUT_NAME.match(f)}
    _parallel(store.move, [(f, f"{CACHE_DIR}/{f}") for f in sorted(root - keep)], store)
    wanted = keep - root
    _parallel(store.move, [(f"{CACHE_DIR}/{f}", f) for f in sorted(wanted & cache)], store)
    return wanted - cache


def _image_for_sheet(store: Store, cfg: PrepareConfig, r: dict) -> bytes | None:
    if r.get("file"):
        return store.read(r["file"] if r["status"] == "accepted" else f"{CACHE_DIR}/{r['file']}")
    try:
        return read_source(cfg.source_location, r["source"])
    except (OSError, KeyError):
        return None


def _write_contact_sheet(store: Store, cfg: PrepareConfig, records: list[dict]) -> None:
    acc = contact_sheet.pick_examples(records, cfg.examples, "accepted")
    rej = contact_sheet.pick_examples(records, cfg.examples, "rejected")
    rej += contact_sheet.pick_examples(records, max(0, cfg.examples - len(rej)) // 2, "filtered")
    n_acc = sum(r["status"] == "accepted" for r in records)
    sections = [(f"accepted: {n_acc} (showing {len(acc)})", acc),
                (f"rejected or filtered: {len(records) - n_acc} (showing {len(rej)})", rej)]
    sheet = contact_sheet.render(sections, lambda r: _image_for_sheet(store, cfg, r))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    store.write(CONTACT_SHEET, buf.getvalue())


def _file_summary(r: dict) -> dict:
    keys = ("source", "status", "reason", "detail", "file", "framing", "label", "width", "height", "mode",
            "mask_source", "confidence", "foreground", "frame_touch", "cartoon", "cached")
    return {k: r[k] for k in keys if r.get(k) is not None}


# ---------------------------------------------------------------------------------------------- the run


def _ensure_ray(workers: int | None) -> tuple[bool, int]:
    """(whether we started Ray, CPUs available). Attaches to RAY_ADDRESS when set, else starts a private one."""
    import ray

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS") or "local"
        kwargs = {"num_cpus": workers} if address == "local" and workers else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
        started = True
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    return started, cpus


def _resolve_remover(cfg: PrepareConfig):
    if cfg.remover == "classic":
        return "classic", None
    if cfg.remover == "rembg":
        return "rembg", resolve_rembg_model(cfg.rembg_model)
    if cfg.rembg_model != DEFAULT_REMBG_MODEL:  # auto with an explicit model: the user wants rembg
        return "rembg", resolve_rembg_model(cfg.rembg_model)
    return default_remover()


BATCH_BYTES = 1 << 20  # auto batch: about this much encoded input per task
MAX_BATCH = 64
MAX_REMBG_BATCH = 16


def auto_batch_size(sizes: list[int], workers: int, remover: str) -> int:
    """Images per task: ~1 MiB of encoded input (tiny images in big batches, so Ray's per-task overhead is
    amortised; big ones in small batches), at most 64, and small enough to give every worker 4 batches.

    rembg: at most 16 images per block, whatever their size: the model's cost dominates and does not depend on
    the file size, and 16 images (~1 s of work on a CPU) amortise Ray Data's scheduling of each block in the
    driver, which cost ~10 ms of driver CPU per image with blocks of 4 (benchmarks/RESULTS.md, Prepare)."""
    by_spread = max(1, len(sizes) // (4 * max(workers, 1)))
    if remover == "rembg":
        return min(MAX_REMBG_BATCH, by_spread)
    mean = max(1.0, sum(sizes) / max(len(sizes), 1))
    by_bytes = int(BATCH_BYTES / mean)
    return max(1, min(MAX_BATCH, by_bytes, by_spread))


def _run_pipeline(cfg: PrepareConfig, job: Job, sources: list[str], workers: int, bar,
                  batch_size: int = 8) -> list[dict]:
    if cfg.engine == "local":
        stream = run_loop(job, sources)
    else:
        stream = run_ray(job, sources, workers=workers, batch_size=batch_size)
    out = []
    counts = Counter()
    for r in stream:
        if r.get("features") is not None:  # 128 floats: 0.5 KB as float32 instead of ~4 KB as a list
            r["features"] = np.asarray(r["features"], np.float32)
        out.append(r)
        counts["cached" if r.get("cached") else r["status"]] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(processed=counts["processed"], rejected=counts["rejected"], cached=counts["cached"],
                            refresh=False)
    return out


def prepare_dataset(cfg: PrepareConfig) -> PrepareReport:
    """Runs the whole preparation (see the module docstring); returns the report also written to OUT."""
    t_start = time.perf_counter()
    remover, model = _resolve_remover(cfg)  # fails here, before any work, when a model file is missing
    store = Store(cfg.out_location)
    store.ensure()
    listing = list_sources(cfg.source_location, exclude=cfg.out_location)
    if not listing.files:
        raise ValueError(f"SOURCE {cfg.source_location.uri} holds no images ({listing.ignored} other files)")
    job = Job(source=cfg.source_location, out=cfg.out_location, resolution=cfg.resolution, margin=cfg.margin,
              min_size=cfg.min_size, max_pixels=cfg.max_pixels,
              work_size=cfg.work_size or max(1024, 2 * cfg.resolution), remover=remover, rembg_model=model)
    sources = [rel for rel, _ in listing.files]
    with _engine(cfg) as workers:
        t_listed = time.perf_counter()  # and Ray started: the pipeline's time is the pipeline's only
        log.info("prepare: %d images from %s -> %s (%s, %s, %d workers)", len(sources), cfg.source_location.uri,
                 store.uri(), remover if model is None else f"rembg:{model.label}", cfg.engine, workers)
        batch = cfg.batch_size or auto_batch_size([n for _, n in listing.files], workers, remover)
        records = _process_and_publish(cfg, job, store, sources, workers, batch)
        t_pipeline = time.perf_counter()
    accepted = [r for r in records if r["status"] == "accepted"]
    labels, classes = _write_labels(store, accepted, cfg)
    _write_contact_sheet(store, cfg, records)
    timings = {"list_and_start_s": t_listed - t_start, "pipeline_s": t_pipeline - t_listed,
               "finalize_s": time.perf_counter() - t_pipeline, "total_s": time.perf_counter() - t_start}
    report = _report(cfg, store, listing, records, labels, classes, timings, workers=workers,
                     batch=batch if cfg.engine == "ray" else 0, remover=remover if model is None else
                     f"rembg:{model.label}")
    store.write("report.json", (json.dumps(asdict(report), indent=1) + "\n").encode())
    log.info("prepare: %d accepted, %d rejected %s, %d filtered in %.1fs", report.accepted, report.rejected,
             report.rejections, report.filtered, timings["total_s"])
    return report


@contextlib.contextmanager
def _engine(cfg: PrepareConfig):
    """The workers the pipeline runs on: Ray (attached or started here, shut down after) or this process.
    Ray Data's own progress bars are off meanwhile: ours counts images."""
    if cfg.engine != "ray":
        yield 1
        return
    started, cpus = _ensure_ray(cfg.workers)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old_bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        yield cfg.workers or cpus
    finally:
        ctx.enable_progress_bars = old_bars
        if started:
            ray.shutdown()


def _process_and_publish(cfg: PrepareConfig, job: Job, store: Store, sources: list[str], workers: int,
                         batch: int) -> list[dict]:
    """Every source's record (in the order of ``sources``), decided and published; an output that vanished
    (deleted by hand) is processed once more."""
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), desc="prepare", unit="img", dynamic_ncols=True)
    try:
        by_source = {r["source"]: r for r in _run_pipeline(cfg, job, sources, workers, bar, batch)}
    finally:
        if bar is not None:
            bar.close()
    records = [by_source[s] for s in sources]
    for attempt in range(2):
        _decide(records, cfg)
        missing = _publish(store, {r["file"] for r in records if r["status"] == "accepted"})
        if not missing or attempt:
            break
        redo = [r["source"] for r in records if r.get("file") in missing]
        log.warning("prepare: %d outputs were missing; processing them again", len(redo))
        for r in records:
            if r.get("file") in missing:
                store.remove(f"{RECORDS_DIR}/{r['key']}.json")
        again = {r["source"]: r for r in _run_pipeline(cfg, job, redo, workers, None, batch)}
        records = [again.get(r["source"], r) for r in records]
    if missing:
        raise RuntimeError(f"prepare: {len(missing)} outputs are still missing after a retry, e.g. "
                           f"{sorted(missing)[0]}; check that {store.uri()} is writable")
    return records


def _write_labels(store: Store, accepted: list[dict], cfg: PrepareConfig) -> tuple[list[int], list[str]]:
    """dataset.json: each accepted image's class (k-means cluster or framing), as the trainer reads it."""
    labels, classes = _labels(accepted, cfg)
    for r, label in zip(accepted, labels):
        r["label"] = label
    dataset = {"labels": sorted([r["file"], int(r["label"])] for r in accepted), "classes": classes}
    store.write("dataset.json", (json.dumps(dataset, indent=1) + "\n").encode())
    return labels, classes


def _report(cfg: PrepareConfig, store: Store, listing, records: list[dict], labels: list[int], classes: list[str],
            timings: dict, *, workers: int, batch: int, remover: str) -> PrepareReport:
    status = Counter(r["status"] for r in records)
    return PrepareReport(
        source=cfg.source_location.uri, out=store.uri(), remover=remover, engine=cfg.engine, workers=workers,
        batch_size=batch, listed=len(records), ignored=listing.ignored,
        processed=sum(not r.get("cached") for r in records), cached=sum(bool(r.get("cached")) for r in records),
        accepted=status["accepted"], rejected=status["rejected"], filtered=status["filtered"],
        rejections=dict(sorted(Counter(r["reason"] for r in records if r["status"] == "rejected").items())),
        framing=dict(Counter(r["framing"] for r in records if r["status"] in ("accepted", "filtered"))),
        classes=classes, class_counts=np.bincount(np.asarray(labels, np.int64), minlength=len(classes)).tolist(),
        timings={**{k: round(v, 3) for k, v in timings.items()},
                 "images_per_s": round(len(records) / max(timings["pipeline_s"], 1e-9), 2),
                 "stage_s": _stage_seconds(records)},
        config=asdict(cfg), dataset_json=store.uri("dataset.json"), contact_sheet=store.uri(CONTACT_SHEET),
        report_json=store.uri("report.json"), files=[_file_summary(r) for r in records],
    )


def _stage_seconds(records: list[dict]) -> dict:
    total = Counter()
    for r in records:
        if not r.get("cached"):
            total.update(r.get("seconds") or {})
    return {k: round(v, 3) for k, v in total.items()}
