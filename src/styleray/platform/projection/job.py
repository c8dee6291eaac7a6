"""A folder, zip or bucket of targets as one Ray job: Ray Data over the images, one projection per actor.

    list      every image under --target (recursive; prepare's listing); a target whose folder already holds
              summary.json is done and skipped, so an interrupted job resumes where it stopped
    project   ray.data.from_items(one row per target) -> map_batches(ProjectionActor) on an actor pool: each
              actor loads the generator and the distance once (a GPU each with --gpus, else a share of the
              CPUs) and projects one target per call into OUT/<target>/
    report    a progress bar while results stream in; then OUT/summary.csv and OUT/summary.md (one row per
              target: PSNR, distance, seconds, or why it failed) and the table printed

A bad image (not an image, truncated, a bomb, ...) is that target's failure, recorded with its reason; the
job goes on. Failed targets have no summary.json, so a re-run tries them again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time

import numpy as np

from styleray import storage
from styleray.datasets.prepare.sources import list_sources, parse_location, read_source
from styleray.platform.projection import outputs
from styleray.platform.projection.options import ProjectOptions

log = logging.getLogger(__name__)

COLUMNS = ("target", "status", "psnr", "pti_psnr", "distance", "distance_value", "seconds", "framing", "error")


def target_folder(rel: str) -> str:
    """OUT/<this>/ for the target at relative key ``rel``: its path with the extension's dot as '_' (so
    hero.png and hero.jpg do not share a folder, and the name never changes between runs)."""
    stem, dot, ext = rel.rpartition(".")
    return f"{stem}_{ext}" if dot else rel


class ProjectionActor:
    """Ray Data actor: one Projector (generator + distance) per actor; a block of rows -> their result rows."""

    def __init__(self, options: ProjectOptions, threads: int, storage_env: dict[str, str]):
        import torch

        from styleray.platform.projection.single import Projector

        storage.apply_env(storage_env)  # where S3 is (never credentials: each process finds its own)
        torch.set_num_threads(max(1, threads))
        self.options = options
        self.location = parse_location(options.target, "--target", allow_zip=True)
        self.projector = Projector.load(options)

    def __call__(self, batch: dict) -> dict:
        rows = [self._one(str(rel)) for rel in batch["target"]]
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}

    def _one(self, rel: str) -> dict:
        out_dir = storage.join(self.options.out, target_folder(rel))
        try:
            summary = self.projector.run(read_source(self.location, rel), rel, out_dir)
        except Exception as e:  # noqa: BLE001 - one target's failure (a bad image, a resource error) is its row
            log.warning("projection of %s failed: %s: %s", rel, type(e).__name__, e)
            return {"target": rel, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        return {"target": rel, "status": "projected", **summary}


def _pending(options: ProjectOptions) -> tuple[list[str], list[dict]]:
    """(targets to project, rows of the targets already done)."""
    loc = parse_location(options.target, "--target", allow_zip=True)
    try:
        listing = list_sources(loc, exclude=parse_location(options.out, "--out", allow_zip=False))
    except ValueError as e:  # prepare's words (SOURCE ...) in this command's terms
        raise ValueError(f"--target: {str(e).removeprefix('SOURCE ')}") from None
    if not listing.files:
        raise ValueError(f"--target {options.target}: no images found ({', '.join(['png', 'jpg', 'webp', '...'])})")
    todo, done = [], []
    for rel, _ in listing.files:
        summary = outputs.read_summary(storage.join(options.out, target_folder(rel)))
        if summary is None:
            todo.append(rel)
        else:
            done.append({"target": rel, "status": "done before", **summary})
    return todo, done


def _actor_resources(options: ProjectOptions) -> tuple[int, dict, int]:
    """(actors, map_batches resources per actor, torch threads per actor)."""
    import ray

    resources = ray.cluster_resources()
    if options.gpus:
        gpus = int(resources.get("GPU", 0))
        if gpus < 1:
            raise ValueError("--gpus: the Ray cluster has no GPU (drop --gpus to project on CPUs)")
        return options.workers or gpus, {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = float(resources.get("CPU", 1))
    workers = options.workers or max(1, int(cpus))
    share = max(0.01, min(1.0, cpus / workers))  # more actors than CPUs: each takes a share, all run
    return workers, {"num_cpus": share}, max(1, int(cpus // workers))


def run_folder(options: ProjectOptions) -> dict:
    """Project every image under --target (see the module docstring); returns the summary."""
    import ray
    from tqdm import tqdm

    from styleray.platform.train.ray_train import connect

    started = time.perf_counter()
    todo, rows = _pending(options)
    if todo:
        log.info("%s", connect(include_dashboard=False))
        workers, resources, threads = _actor_resources(options)
        workers = min(workers, len(todo))
        log.info("projecting %d targets (%d done before) on %d actors", len(todo), len(rows), workers)
        ds = ray.data.from_items([{"target": t} for t in todo], override_num_blocks=len(todo))
        kwargs = {"options": options, "threads": threads, "storage_env": storage.forwarded_env()}
        ds = ds.map_batches(ProjectionActor, fn_constructor_kwargs=kwargs, batch_size=None,
                            compute=ray.data.ActorPoolStrategy(size=workers), **resources)
        with tqdm(total=len(todo), desc="projections", unit="target", disable=not options.progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for text in batch["row"]:
                    rows.append(json.loads(text))
                    bar.update(1)
    rows.sort(key=lambda r: r["target"])
    return _report(options, rows, time.perf_counter() - started)


def _report(options: ProjectOptions, rows: list[dict], seconds: float) -> dict:
    table = [{c: _cell(r.get(c)) for c in COLUMNS} for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(table)
    storage.write_bytes(storage.join(options.out, "summary.csv"), buf.getvalue().encode())
    markdown = summary_markdown(table)
    storage.write_bytes(storage.join(options.out, "summary.md"), markdown.encode())
    counts = {s: sum(r["status"] == s for r in rows) for s in ("projected", "done before", "failed")}
    return {"rows": rows, "table": markdown, "counts": counts, "seconds": seconds, "out": options.out}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e6 else f"{v:.3g}"
    return str(v).replace("|", "/").replace("\n", " ")


def summary_markdown(table: list[dict]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in table)) for c in COLUMNS}
    line = lambda cells: "| " + " | ".join(cells[c].ljust(widths[c]) for c in COLUMNS) + " |"  # noqa: E731
    head = line({c: c for c in COLUMNS})
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
    return "\n".join([head, rule] + [line(r) for r in table]) + "\n"
