"""The ``styleray`` command. Thin: parse flags, build a config, call one function of a part.

torch and Ray are imported inside the commands that need them, so ``styleray --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

log = logging.getLogger("styleray")

EPILOG = """\
typical flow:
  styleray prepare raw/ data/ --resolution 256        # Ray Data: clean, square, white-background PNGs
  styleray train --data data/ --out runs/r1 --kimg 5000  # train (Ray Train with --workers N)
  styleray generate --checkpoint runs/r1 --seeds 0-15 --out grid.png
  styleray serve --checkpoint runs/r1                   # Ray Serve HTTP API + latent explorer page
  styleray demo                                         # all of the above on the built-in sample data
"""


def _parse_seeds(text: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers and ranges like 0-15,42") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return v


# ---------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train StyleGAN2-ADA on a prepared dataset (Ray Train)",
        description="Train StyleGAN2-ADA on a prepared dataset (square PNGs + dataset.json, or Parquet) with Ray "
        "Train: --workers processes (one per GPU with --gpus; gloo on CPU, NCCL on GPU). Attaches to the cluster "
        "in RAY_ADDRESS (e.g. under `ray job submit`), else starts a local one. Writes checkpoints, metrics.jsonl, "
        "sample grids and best.json to --out; restarts failed workers from the last checkpoint (--max-failures), "
        "rolls back unstable training (--max-rollbacks), and --resume latest continues a stopped or finished run "
        "to a new --kimg. --no-ray trains in this process instead (one worker, local data; notebooks, debugging).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="prepared dataset: PNG folder or Parquet, local or s3://")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, grids (local or s3://)")
    p.add_argument("--preset", default="auto", help="auto, stylegan2, paper256, paper512, paper1024, cpu-tiny")
    p.add_argument("--resolution", type=int, default=None, help="image size; default: the dataset's")
    p.add_argument("--kimg", type=_positive_float, default=None, help="train until this many thousand images")
    p.add_argument("--tick", type=_positive_float, default=None, help="progress report interval in kimg")
    p.add_argument("--snap", type=int, default=None, help="checkpoint + sample grid every this many ticks")
    p.add_argument("--batch", type=int, default=None, help="total batch size over all workers (preset default)")
    p.add_argument("--workers", type=int, default=1, help="training processes (Ray Train workers; one per GPU)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=None,
                   help="CPUs reserved per worker (default: 1 with --gpus, 0.9 on CPU)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="restart failed workers from the last checkpoint this many times (-1: no limit)")
    p.add_argument("--placement-timeout", type=_positive_float, default=300.0,
                   help="seconds to wait for room for the workers (at start, or after losing a node) before failing")
    p.add_argument("--autoscale", action="store_true",
                   help="the cluster can add nodes: wait for them instead of failing fast when --workers do not fit")
    p.add_argument("--max-rollbacks", type=int, default=None,
                   help="roll back unstable training (NaN/Inf, D collapse) at most this many times (default 3)")
    p.add_argument("--no-ray", action="store_true", help="train in this process without Ray (--workers 1, local --data)")
    p.add_argument("--gamma", type=float, default=None, help="R1 regularisation weight (preset default)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate of G and D (preset default)")
    p.add_argument("--lr-g", type=_positive_float, default=None, help="learning rate of G (default: --lr)")
    p.add_argument("--lr-d", type=_positive_float, default=None, help="learning rate of D (default: --lr)")
    p.add_argument("--map", type=int, default=None, help="mapping network depth in layers (preset default)")
    p.add_argument("--aug", choices=["ada", "fixed", "noaug"], default="ada", help="augmentation mode")
    p.add_argument("--augment-p", type=float, default=None, help="initial (ada) or constant (fixed) augment p")
    p.add_argument("--target", type=float, default=None, help="ADA target for r_t")
    p.add_argument("--mirror", action="store_true", help="random x-flips of the data")
    p.add_argument("--cond", action="store_true", help="class-conditional training from dataset.json labels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--keep", type=int, default=None, help="keep this many latest checkpoints (plus the best one)")
    p.add_argument("--resume", default="latest",
                   help="'latest' (the run's newest good checkpoint, if any), 'none' (a new run), or a checkpoint or run path")
    p.add_argument("--device", default=None, help="torch device with --no-ray (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--no-ray)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML of train settings (these flags' names, e.g. lr_g: 0.002) used as defaults; flags win")
    p.expands_config_file = True  # see _ConfigFileParser (a plain ArgumentParser ignores it: queue's checker)
    p.add_argument("--metrics", default=None, metavar="LIST",
                   help="measure these during training (fid,kid) on G_ema; best.json then picks the lowest FID")
    p.add_argument("--metrics-every", type=int, default=1, metavar="T", help="measure every T ticks (and at the end)")
    p.add_argument("--metrics-num-gen", type=int, default=1000, help="generated images per measurement")
    p.add_argument("--extractor", default=None,
                   help="feature extractor for --metrics (default inception-v3; pixels-8x8 is a weights-free proxy)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $STYLERAY_INCEPTION, then ~/.cache/styleray/)")
    p.set_defaults(func=_cmd_train)


def build_run_config(args, data_resolution: int, data_channels: int, num_classes: int):
    """RunConfig from train flags (shared by train and demo)."""
    from styleray.config import RunConfig, resolve_preset

    resolution = args.resolution or data_resolution
    c_dim = num_classes if args.cond else 0
    if args.cond and num_classes == 0:
        raise ValueError(f"--cond: {args.data} has no labels in dataset.json (prepare with --clusters K or framing labels)")
    model, train = resolve_preset(
        args.preset,
        resolution=resolution,
        workers=args.workers,
        img_channels=data_channels,
        c_dim=c_dim,
        model_overrides=dict(mapping_layers=getattr(args, "map", None)),
        train_overrides=dict(
            batch=args.batch,
            kimg=args.kimg,
            tick_kimg=args.tick,
            snap=args.snap,
            r1_gamma=args.gamma,
            lr_g=getattr(args, "lr_g", None) or args.lr,
            lr_d=getattr(args, "lr_d", None) or args.lr,
            augment=args.aug,
            augment_p=args.augment_p,
            ada_target=args.target,
            mirror=args.mirror or None,
            seed=args.seed,
            keep_checkpoints=args.keep,
            max_rollbacks=getattr(args, "max_rollbacks", None),
        ),
    )
    return RunConfig(model=model, train=train, preset=args.preset, data=args.data, out=args.out, device=args.device or "cpu")


def _cmd_train(args) -> int:
    from styleray.platform import ray_train, storage
    from styleray.platform.stability import TrainingDiverged

    resume = None if args.resume == "none" else args.resume
    metrics_options = None
    if args.metrics:  # checked before anything is read or trained; a missing Inception file fails in prepare
        from styleray.platform.train_metrics import parse_options

        metrics_options = parse_options(args.metrics, every=args.metrics_every, num_gen=args.metrics_num_gen,
                                        extractor=args.extractor, weights=args.inception)
    try:
        if args.no_ray:
            import torch

            from styleray.datasets.reader import BatchSampler, load_image_folder
            from styleray.platform.loop import LoopHooks, run_training

            if args.workers != 1:
                raise ValueError(
                    f"--no-ray trains in this process: use --workers 1, or drop --no-ray for {args.workers} Ray workers"
                )
            data = load_image_folder(args.data, resolution=args.resolution)
            args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            run = build_run_config(args, data.resolution, data.channels, data.num_classes)
            if not args.cond:
                data.labels, data.num_classes = None, 0
            sampler = BatchSampler(data, run.train.batch_per_worker, seed=run.train.seed, mirror=run.train.mirror)
            log.info("training %s at %dpx on %d images -> %s", run.preset, run.model.resolution, len(data.images), run.out)
            resume = ray_train.check_resume(resume, run.out)
            hooks = LoopHooks(progress=not args.no_progress)
            if metrics_options is not None:
                from styleray.datasets.ray_reader import inspect_dataset
                from styleray.platform.train_metrics import TickEvaluator, prepare

                info = inspect_dataset(storage.absolute(args.data), storage.pyarrow_filesystem(args.data)[0])
                same = list(info.files) == list(data.files)  # then its images are the ones already in memory
                plan = prepare(metrics_options, info, run.model.resolution, run.model.img_channels, args.device,
                               images=data.images if same else None)
                hooks.evaluate, hooks.evaluate_every = TickEvaluator(plan, args.device), metrics_options.every
            summary = run_training(run, sampler, resume=resume, hooks=hooks)
        else:
            from styleray.datasets.ray_reader import inspect_dataset

            data = inspect_dataset(storage.absolute(args.data), storage.pyarrow_filesystem(args.data)[0])
            run = build_run_config(args, data.resolution, data.channels, data.num_classes)
            options = ray_train.RayOptions(
                gpus=args.gpus,
                cpus_per_worker=args.cpus_per_worker,
                max_failures=args.max_failures,
                placement_timeout_s=args.placement_timeout,
                autoscale=args.autoscale,
            )
            plan = None
            if metrics_options is not None:
                from styleray.platform.train_metrics import prepare

                plan = prepare(metrics_options, data, run.model.resolution, run.model.img_channels)
            summary = ray_train.fit(run, data=data, resume=resume, options=options, metrics=plan)
    except (ray_train.PlacementTimeout, ray_train.TrainingFailed, TrainingDiverged) as e:
        log.error("%s", e)
        return 1
    print(f"done: {summary['kimg']:.3f} kimg, last checkpoint {summary['checkpoint']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="write images, a grid, or a morph from a checkpoint",
        description="Sample a trained generator (its EMA weights) from seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--seeds", type=_parse_seeds, default=_parse_seeds("0-15"), help="seeds, e.g. 0-15,42")
    p.add_argument("--out", required=True, help="a .png (grid), a .gif (morph through the seeds) or a folder (one PNG per seed)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none, 0.7 = safer samples)")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="class index for a conditional model")
    p.add_argument("--noise", choices=["const", "random", "none"], default="const", help="noise mode")
    p.add_argument("--cols", type=int, default=None, help="grid columns")
    p.add_argument("--steps", type=int, default=24, help="morph frames between two seeds (.gif output)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from styleray.models import sampling
    from styleray.platform.checkpoint import load_generator

    G, ckpt = load_generator(args.checkpoint)
    out = args.out
    if out.lower().endswith(".gif"):
        frames = sampling.morph(G, args.seeds, steps=args.steps, truncation_psi=args.truncation, class_idx=args.class_idx)
        pil = [sampling.to_pil(f) for f in frames]
        pil[0].save(out, save_all=True, append_images=pil[1:], duration=40, loop=0)
    else:
        imgs = sampling.generate_images(
            G, args.seeds, truncation_psi=args.truncation, class_idx=args.class_idx, noise_mode=args.noise
        )
        if out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            sampling.to_pil(sampling.image_grid(imgs, cols=args.cols)).save(out)
        else:
            os.makedirs(out, exist_ok=True)
            for seed, img in zip(args.seeds, imgs):
                sampling.to_pil(img).save(os.path.join(out, f"seed{seed:06d}.png"))
    print(f"wrote {out} from {ckpt.uri} ({ckpt.kimg:.1f} kimg)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    from styleray.demo import DemoConfig as D  # light: standard library only at import

    p = sub.add_parser(
        "demo",
        help="end to end on the built-in sample data, on a local Ray cluster",
        description="On one local Ray cluster (2 CPUs): make raw sample images with backgrounds -> prepare them "
        "(Ray Data, classic remover) -> train cpu-tiny (Ray Train, 2 CPU workers) -> serve it (Ray Serve on "
        "127.0.0.1) -> fetch a sample grid PNG and a morph GIF over HTTP into --out; print the URLs of the web "
        "page, the API docs and the Ray dashboard, and serve until Ctrl-C. Re-running resumes or skips done work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=D.out, help="where raw images, data, run, grid.png and morph.gif go")
    p.add_argument("--images", type=int, default=D.images, help="raw sample images to make")
    p.add_argument("--resolution", type=int, default=D.resolution, help="training resolution (a power of two, 16..128)")
    p.add_argument("--kimg", type=_positive_float, default=D.kimg, help="training length in kimg")
    p.add_argument("--port", type=int, default=D.port, help="HTTP port of Ray Serve on 127.0.0.1 (0: any free port)")
    p.add_argument("--raw-size", type=int, default=D.raw_size, help="longer side of the raw images in pixels")
    p.add_argument("--no-wait", action="store_true", help="exit after fetching instead of serving until Ctrl-C")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from styleray.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(out=args.out, images=args.images, resolution=args.resolution, kimg=args.kimg,
                               port=args.port, raw_size=args.raw_size, wait=not args.no_wait))


# ---------------------------------------------------------------------------------------------------------
# prepare and serve: owned by the data-preparation and serving work; each registers itself in COMMANDS.
# ---------------------------------------------------------------------------------------------------------


def _add_prepare(sub) -> None:
    from styleray.datasets.prepare_config import PrepareConfig as C  # light: standard library only

    p = sub.add_parser(
        "prepare",
        help="raw images -> clean, square, white-background dataset (Ray Data)",
        description="Remove outliers, classify framing, remove the background (classic or rembg), crop, pad to "
        "1:1 on white and resize; writes square RGB PNGs, dataset.json (labels), report.json and a contact "
        "sheet to OUT. Re-running skips finished images; thresholds and --framing can change between runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="raw images: a folder (recursive), a .zip, or s3://bucket/prefix")
    p.add_argument("out", metavar="OUT", help="output: a folder or s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=C.resolution, help="output side in pixels (a power of two)")
    p.add_argument("--remover", choices=["auto", "classic", "rembg"], default=C.remover,
                   help="background removal; auto: rembg when its model file is present, else classic")
    p.add_argument("--rembg-model", default=C.rembg_model, metavar="NAME|PATH",
                   help="rembg model name (found in rembg's local model folder, never downloaded) or an .onnx path")
    p.add_argument("--framing", choices=["all", "upper-body", "full-body"], default=C.framing,
                   help="keep only one framing (the label is recorded either way)")
    p.add_argument("--clusters", type=int, default=C.clusters, metavar="K",
                   help="k-means classes as labels for conditional training; 0: framing classes")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="parallel tasks or rembg actors, a CPU each, or a share of one when N exceeds the CPUs "
                        "(default: the Ray cluster's CPUs)")
    p.add_argument("--engine", choices=["ray", "local"], default=C.engine,
                   help="ray: Ray Data pipeline; local: a plain loop in this process (small sets of tiny images)")
    g = p.add_argument_group("outlier thresholds")
    g.add_argument("--min-size", type=int, default=C.min_size, help="reject images whose shorter side is smaller (px)")
    g.add_argument("--max-pixels", type=int, default=C.max_pixels, help="refuse larger images before decoding")
    g.add_argument("--min-confidence", type=float, default=C.min_confidence,
                   help="reject masks less confident than this (0..1): foreground and background not separated")
    g.add_argument("--min-foreground", type=float, default=C.min_foreground,
                   help="reject when the foreground covers less of the image than this (0..1)")
    g.add_argument("--max-frame-touch", type=float, default=C.max_frame_touch,
                   help="reject when more of the image's edge pixels than this are foreground (0..1)")
    g.add_argument("--min-cartoon", type=float, default=C.min_cartoon,
                   help="reject as photographic below this cartoon score (top-16 colour share, 0..1; 0: off)")
    g.add_argument("--dup-distance", type=int, default=C.dup_distance,
                   help="near-duplicate perceptual-hash distance in bits (of 192); -1: off")
    p.add_argument("--margin", type=float, default=C.margin, help="crop margin, fraction of the figure's size")
    p.add_argument("--seed", type=int, default=C.seed, help="k-means seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from styleray.datasets.prepare import PrepareConfig, prepare_dataset

    config = PrepareConfig(
        source=args.source, out=args.out, resolution=args.resolution, remover=args.remover,
        rembg_model=args.rembg_model, framing=args.framing, clusters=args.clusters, workers=args.workers,
        engine=args.engine, margin=args.margin, min_size=args.min_size, max_pixels=args.max_pixels,
        min_confidence=args.min_confidence, min_foreground=args.min_foreground,
        max_frame_touch=args.max_frame_touch, min_cartoon=args.min_cartoon, dup_distance=args.dup_distance,
        seed=args.seed, progress=not args.no_progress,
    )
    try:
        report = prepare_dataset(config)
    except FileNotFoundError as e:  # a missing rembg model: the message names the file and the fix
        raise ValueError(str(e)) from None
    print(report.summary())
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint over HTTP (Ray Serve): samples, morphs, style mixing, a web page",
        description="Serve a checkpoint's EMA generator with Ray Serve: GET /v1/sample, POST /v1/samples, "
        "GET /v1/morph, GET /v1/mix, GET /v1/info, POST /v1/reload, the latent explorer page at / and the "
        "OpenAPI docs at /docs. Binds 127.0.0.1 unless --host says otherwise. When the environment variable "
        "named by --api-key-env is set, every route needs that key (X-API-Key header); reload always does. "
        "On a cluster, `serve deploy serve.yaml` runs the same application.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint); local or s3://")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (fixed)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale: lower bound (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale: upper bound (with --min-replicas)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per generator replica (0: CPU)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per generator replica")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device of the replicas")
    p.add_argument("--no-batching", action="store_true", help="one network call per single-image request")
    p.add_argument("--max-batch-size", type=int, default=32, help="most single-image requests batched together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    p.add_argument("--api-key-env", default="STYLERAY_API_KEY", help="environment variable holding the API key")
    p.add_argument("--address", default=None, help="Ray cluster address (default: attach to a running one or start one)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the application")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from styleray.serve.cli_serve import run_serve

    return run_serve(args)


# ---------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------


def _add_metrics(sub) -> None:
    p = sub.add_parser(
        "metrics",
        help="FID/KID of a checkpoint against a dataset",
        description="Generate --num-gen images from a checkpoint's EMA generator (seeds 0..N-1, truncation 1) and "
        "compare their Inception features with the dataset's: FID, KID, and the diversity ratio (mean pairwise "
        "feature distance, generated / data; well below 1 suggests mode collapse). The dataset's statistics are "
        "cached in DATA/.styleray-stats/. Prints one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--data", required=True, help="prepared dataset folder at the generator's resolution")
    p.add_argument("--metrics", default="fid,kid", help="comma-separated: fid, kid")
    p.add_argument("--num-gen", type=int, default=50_000, help="generated images (the papers' FID uses 50000)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: $STYLERAY_INCEPTION, then ~/.cache/styleray/)")
    p.add_argument("--extractor", default="inception-v3", help="registered feature extractor")
    p.add_argument("--batch", type=int, default=32, help="images per generator/extractor call")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subset pairs")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size")
    p.add_argument("--no-cache", action="store_true", help="recompute the dataset statistics (and do not cache them)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result to this file")
    p.set_defaults(func=_cmd_metrics)


def _cmd_metrics(args) -> int:
    import json

    import numpy as np
    import torch
    from PIL import Image

    from styleray.datasets.reader import list_image_files, load_image_folder, read_labels
    from styleray.models import metrics
    from styleray.platform.checkpoint import load_generator

    names = metrics.parse_metrics(args.metrics)
    if args.num_gen < 2:
        raise ValueError(f"--num-gen {args.num_gen} must be >= 2")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = metrics.build_extractor(args.extractor, args.inception, device)  # fails fast without weights
    G, ckpt = load_generator(args.checkpoint, device)
    if not os.path.isdir(args.data) or not (files := list_image_files(args.data)):
        raise ValueError(f"--data {args.data} is not a folder of images (run `styleray prepare` first)")
    res, ch = G.img_resolution, G.img_channels
    with Image.open(os.path.join(args.data, files[0])) as im:
        if im.size != (res, res):
            raise ValueError(
                f"--data {args.data} holds {im.width}x{im.height} images but {ckpt.uri} generates {res}x{res}; "
                f"metrics compare at the generator's resolution: prepare the data with --resolution {res}"
            )
    real = metrics.dataset_stats(
        args.data, extractor, files=files, resolution=res, channels=ch, cache=not args.no_cache, batch_size=args.batch,
        load_images=lambda: load_image_folder(args.data, resolution=res, use_labels=False, channels=ch).images,
    )
    labels = None
    if G.c_dim > 0:
        label_map, _ = read_labels(args.data)
        labels = np.array([label_map[f] for f in files if f in label_map]) if label_map else None
    result = metrics.evaluate_generator(
        G, real, extractor, metrics=names, num_gen=args.num_gen, labels=labels, batch_size=args.batch,
        kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, device=device,
    )
    result.update(checkpoint=ckpt.uri, kimg=ckpt.kimg, data=os.path.abspath(args.data))
    text = json.dumps(result, sort_keys=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


# ---------------------------------------------------------------------------------------------------------
# tune: Ray Tune sweeps over the Ray Train trainer (styleray.platform.tune)
# ---------------------------------------------------------------------------------------------------------


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter sweep: Ray Tune over Ray Train runs (ASHA, PBT; grid, random, optuna)",
        description="Sweep the hyperparameters in --space (lr_g, lr_d, gamma, batch, target, map, mirror; "
        "choice/grid/uniform/loguniform) with Ray Tune: each trial is a Ray Train run of --workers-per-trial "
        "workers with its own checkpoints in OUT/trials/ID, measured every --metrics-every ticks. The objective "
        "(--metric) is FID/KID with Inception-v3, or a proxy that is named as one (pixel-fid: FID over 8x8 "
        "thumbnails); auto takes FID when the weights are found, else says it uses the proxy and why. Writes "
        "OUT/results.csv and results.md (trials ranked) and OUT/best_config.yaml for `styleray train --config`. "
        "--resume continues an interrupted sweep with its saved settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="prepared dataset (as for train); not needed with --resume")
    p.add_argument("--out", required=True, help="sweep folder: tune/ state, trials/ID run folders, results")
    p.add_argument("--space", default=None, metavar="FILE", help="search space YAML (see README, Sweeps)")
    p.add_argument("--trials", type=int, default=8, help="samples (random, optuna); each grid combination runs once per sample")
    p.add_argument("--scheduler", default="asha", help="asha (stop weak trials early), pbt (exploit/explore), none")
    p.add_argument("--search", default="random", help="grid, random (Tune's BasicVariantGenerator) or optuna (TPE)")
    p.add_argument("--metric", default="auto", help="auto, fid, kid, pixel-fid, pixel-kid (the proxies)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers of each trial")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=None, help="CPUs per worker (default 0.9 on CPU)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: as many as fit)")
    p.add_argument("--preset", default=None, help="train preset of every trial")
    p.add_argument("--kimg", type=_positive_float, default=None, help="training length of every trial")
    p.add_argument("--tick", type=_positive_float, default=None, help="tick length in kimg (a tick is a report)")
    p.add_argument("--snap", type=int, default=None, help="checkpoint every this many ticks (measured ticks always)")
    p.add_argument("--train-config", default=None, metavar="FILE", help="YAML of fixed train settings (train --config)")
    p.add_argument("--metrics-every", type=int, default=1, help="measure the objective every this many ticks")
    p.add_argument("--metrics-num-gen", type=int, default=500, help="generated images per measurement")
    p.add_argument("--extractor", default=None, help="feature extractor for fid/kid (default inception-v3)")
    p.add_argument("--inception", default=None, metavar="PATH", help="Inception-v3 weights (as for metrics)")
    p.add_argument("--perturbation-interval", type=int, default=2, help="pbt: measured reports between perturbations")
    p.add_argument("--pbt-sync", action="store_true",
                   help="pbt: perturb the whole population at once (trials that get there first wait, paused)")
    p.add_argument("--grace-period", type=int, default=1, help="asha: measured reports before a trial may be stopped")
    p.add_argument("--seed", type=int, default=0, help="seed of the search")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from styleray.platform.tune import SweepConfig, run_sweep

    if args.resume:
        given = [f"--{a.dest.replace('_', '-')}" for a in _subparser(build_parser(), "tune")._actions
                 if a.dest not in ("help", "out", "resume") and getattr(args, a.dest) != a.default]
        if given:
            log.warning("--resume continues the sweep with its saved settings (sweep.json); ignoring %s", " ".join(given))
        summary = run_sweep(SweepConfig(data="", out=args.out, space_file=""), resume=True)
    else:
        if not args.data or not args.space:
            raise ValueError("--data and --space are required (unless --resume continues a sweep)")
        base: list[str] = []
        if args.train_config:
            base += ["--config", os.path.abspath(args.train_config)]
        for flag in ("preset", "kimg", "tick", "snap"):
            if getattr(args, flag) is not None:
                base += [f"--{flag}", str(getattr(args, flag))]
        summary = run_sweep(SweepConfig(
            data=args.data, out=args.out, space_file=os.path.abspath(args.space), trials=args.trials,
            scheduler=args.scheduler, search=args.search, metric=args.metric,
            workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker, gpus=args.gpus,
            max_concurrent=args.max_concurrent, base_flags=tuple(base), metrics_every=args.metrics_every,
            num_gen=args.metrics_num_gen, extractor=args.extractor, inception=args.inception,
            perturbation_interval=args.perturbation_interval, pbt_sync=args.pbt_sync, grace_period=args.grace_period,
            seed=args.seed,
        ))
    best = summary.get("best")
    print(f"results: {summary['results_md']} ({len(summary['rows'])} trials)")
    if best is None:
        print("no trial reported the objective; see the errors in the results")
        return 1
    print(f"best: trial {best['trial']} {summary['objective']} {best['best_' + summary['objective']]:.4f}"
          f" -> {summary['best_config']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# queue and manager: the training manager (styleray.platform.manager)
# ---------------------------------------------------------------------------------------------------------


class _QueueAddParser(argparse.ArgumentParser):
    """`queue add` keeps every flag it does not know as a `styleray train` flag (checked when the request is
    added, and recorded with the reason if it is bad)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, "_train_passthrough", False):
            ns.train_args, extras = extras, []
        return ns, extras


def _add_queue(sub) -> None:
    p = sub.add_parser(
        "queue",
        help="the training queue: add, list, show, cancel requests",
        description="A durable queue of training requests (SQLite: --db, default $STYLERAY_QUEUE or "
        "~/.styleray/queue.db) that `styleray manager` runs on a Ray cluster as jobs, resuming interrupted ones.",
    )
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True, parser_class=_QueueAddParser)
    db = dict(default=None, help="queue database (default: $STYLERAY_QUEUE or ~/.styleray/queue.db)")
    a = qsub.add_parser(
        "add",
        help="add a training request",
        description="Add a request: --name plus the flags of `styleray train` (or --config FILE.yaml with them; "
        "flags given here override the file's). It is checked now: bad flags or missing data are recorded "
        "as a failed request with the reason.",
        allow_abbrev=False,
        usage="styleray queue add --name N [--priority P] [--config FILE.yaml] [TRAIN FLAGS: --data D --out O --kimg K ...]",
    )
    a.add_argument("--name", default=None, help="a short label for the request")
    a.add_argument("--priority", type=int, default=None, help="higher runs first (default 0)")
    a.add_argument("--config", default=None, metavar="FILE", help="YAML: train flags (and name, priority)")
    a.add_argument("--max-attempts", type=int, default=None,
                   help="fail after this many interrupted attempts in a row without a new checkpoint (default 5)")
    a.add_argument("--no-check", action="store_true",
                   help="do not read --data from here (data only the cluster sees); --kimg is then required")
    a.add_argument("--db", **db)
    a.set_defaults(_train_passthrough=True, train_args=[])
    ls = qsub.add_parser("list", help="the requests, with progress bars", description="The queue, what the manager does.")
    ls.add_argument("--active", action="store_true", help="only requests that have not finished")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--db", **db)
    sh = qsub.add_parser("show", help="one request: attempts and events", description="A request's attempts and events.")
    sh.add_argument("id", type=int, help="request id")
    sh.add_argument("--db", **db)
    c = qsub.add_parser("cancel", help="cancel a request (and stop its Ray job)",
                        description="Cancel a request; its Ray job is stopped now with --address, else by the manager.")
    c.add_argument("id", type=int, help="request id")
    c.add_argument("--address", default=None, help="Jobs API, e.g. http://HEAD:8265: stop the job right away")
    c.add_argument("--db", **db)
    p.set_defaults(func=_cmd_queue)


def _cmd_queue(args) -> int:
    from styleray.platform.manager import commands

    return {"add": commands.queue_add, "list": commands.queue_list, "show": commands.queue_show,
            "cancel": commands.queue_cancel}[args.queue_command](args)


def _add_manager(sub) -> None:
    p = sub.add_parser(
        "manager",
        help="run queued training requests as Ray jobs; resume interrupted ones",
        description="Take requests from the queue (highest priority first), submit each as a Ray job "
        "(`styleray train ...`), watch its status and progress, and when a job is interrupted (stopped, killed, "
        "node or head lost) resubmit it to continue from its last checkpoint, with backoff and bounded "
        "attempts. Runs as a plain process or as a Ray job; SIGTERM stops it after the current round. Token "
        "auth: RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--address", default=None,
                   help="Jobs API of the cluster, http://HEAD:8265 (default: Ray's, e.g. RAY_ADDRESS or inside a job)")
    p.add_argument("--db", default=None, help="queue database (default: $STYLERAY_QUEUE or ~/.styleray/queue.db)")
    p.add_argument("--max-running", type=int, default=1, help="requests on the cluster at once")
    p.add_argument("--poll", type=_positive_float, default=30.0, help="seconds between rounds")
    p.add_argument("--backoff", type=float, default=30.0, help="seconds before resuming an interrupted request")
    p.add_argument("--backoff-max", type=float, default=900.0, help="longest backoff (it doubles without progress)")
    p.add_argument("--once", action="store_true", help="one round, then exit (cron)")
    p.add_argument("--ship-package", action="store_true",
                   help="ship this machine's styleray package with every job (py_modules) instead of the cluster's")
    p.add_argument("--working-dir", default=None, help="runtime_env working_dir of every job")
    p.add_argument("--runtime-env", default=None, metavar="FILE", help="YAML/JSON runtime_env for every job")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for each job's driver")
    p.set_defaults(func=_cmd_manager)


def _cmd_manager(args) -> int:
    from styleray.platform.manager.commands import run_manager

    return run_manager(args)


# ---------------------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [_add_prepare, _add_train, _add_tune, _add_generate, _add_demo, _add_metrics, _add_serve,
                            _add_queue, _add_manager]


class _ConfigFileParser(argparse.ArgumentParser):
    """A command's parser; one with ``expands_config_file`` set (train) first replaces ``--config FILE.yaml``
    by the file's settings as flags, which the flags given explicitly override (styleray.config_file)."""

    expands_config_file = False

    def parse_known_args(self, args=None, namespace=None):
        if self.expands_config_file and args is not None and any(a == "--config" or a.startswith("--config=") for a in args):
            from styleray.config_file import expand_args

            try:
                args = expand_args(list(args), self)
            except ValueError as e:
                self.error(str(e))
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="styleray",
        description="StyleGAN2-ADA on Ray: prepare images, train, sweep, queue, and serve generators.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_ConfigFileParser)
    for add in COMMANDS:
        add(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        parser.exit(2, f"styleray {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
