"""The ``styleray`` command. Thin: each command parses its flags, calls one function of a part, and prints.

Nothing imports this module. torch and Ray are imported inside the functions the commands call, so
``styleray --help`` is instant. Errors below the CLI are exceptions with a message (``ValueError`` and its
subclasses): ``main`` prints them as ``styleray COMMAND: error: ...`` and exits 2.

The train flags are not declared here: ``settings.add_arguments`` makes them from the fields of
``settings.TrainSettings`` (``train``, ``queue add`` and the fixed settings of ``tune``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from styleray import settings as train_settings

log = logging.getLogger("styleray")

EPILOG = """\
typical flow:
  styleray prepare raw/ data/ --resolution 256        # Ray Data: clean, square, white-background PNGs
  styleray train --data data/ --out runs/r1 --kimg 5000  # train (Ray Train with --workers N)
  styleray generate --checkpoint runs/r1 --seeds 0-15 --out grid.png
  styleray project --checkpoint runs/r1 --target hero.png --out proj/  # a real image's latent (W, W+, PTI)
  styleray serve --runs runs/                           # every run by name: Ray Serve HTTP API + explorer page
  styleray demo                                         # all of the above on the built-in sample data
"""
DB_HELP = "queue database (default: $STYLERAY_QUEUE or ~/.styleray/queue.db)"


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
# prepare
# ---------------------------------------------------------------------------------------------------------


def _add_prepare(sub) -> None:
    from styleray.datasets.prepare.config import PrepareConfig as C  # light: standard library only

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
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML of train settings (these flags' names, e.g. lr_g: 0.002, at the top level or under "
                        "train:); flags given as well win")
    train_settings.add_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from styleray.platform.train.run import TrainingStopped, train

    settings = train_settings.from_command_line(args, args.config)
    try:
        summary = train(settings)
    except TrainingStopped as e:
        log.error("%s", e)
        return 1
    print(f"done: {summary['kimg']:.3f} kimg, last checkpoint {summary['checkpoint']}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# generate, metrics
# ---------------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="write images, a grid, or a morph from a checkpoint",
        description="Sample a trained generator (its EMA weights) from seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--seeds", type=_parse_seeds, default=None, help="seeds, e.g. 0-15,42 (default: 0-15 without --latents)")
    p.add_argument("--latents", default=None, metavar="NPZ[,NPZ...]",
                   help="projected images (projected_w.npz of styleray project), before the seeds")
    p.add_argument("--out", required=True, help="a .png (grid), a .gif (morph through the seeds) or a folder (one PNG per seed)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi (1 = none, 0.7 = safer samples)")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="class index for a conditional model")
    p.add_argument("--noise", choices=["const", "random", "none"], default="const", help="noise mode")
    p.add_argument("--cols", type=int, default=None, help="grid columns")
    p.add_argument("--steps", type=int, default=24, help="morph frames between two seeds (.gif output)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from styleray.platform.generate import write_samples

    latents = [p for p in args.latents.split(",") if p] if args.latents else []
    seeds = args.seeds if args.seeds is not None else ([] if latents else _parse_seeds("0-15"))
    ckpt = write_samples(args.checkpoint, seeds, args.out, truncation=args.truncation, class_idx=args.class_idx,
                         noise_mode=args.noise, cols=args.cols, steps=args.steps, latents=latents)
    print(f"wrote {args.out} from {ckpt.uri} ({ckpt.kimg:.1f} kimg)")
    return 0


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

    from styleray.platform.evaluate import EvaluateOptions, evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, EvaluateOptions(
        metrics=args.metrics, num_gen=args.num_gen, extractor=args.extractor, weights=args.inception,
        batch=args.batch, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
        cache=not args.no_cache, device=args.device,
    ))
    text = json.dumps(result, sort_keys=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


# ---------------------------------------------------------------------------------------------------------
# project: real images into the latent space (styleray.platform.projection)
# ---------------------------------------------------------------------------------------------------------


def _add_project(sub) -> None:
    from styleray.platform.projection.options import ProjectOptions as O  # light: no torch, no Ray

    p = sub.add_parser(
        "project",
        help="find the latents of real images (W or W+, optional pivotal tuning); a folder runs as a Ray job",
        description="Project a target image into a checkpoint's latent space: the target is framed like prepare "
        "frames training images (square, on white, at the model's resolution), then w is optimised from the mean "
        "w (the reference projector's method: noise maps with their regulariser, learning-rate and noise ramps), "
        "one w for every layer (--space w) or one per layer (w+). --pti-steps N then fine-tunes a copy of the "
        "generator around that w (pivotal tuning) and writes it as a run folder (OUT/pti) that generate and serve "
        "load. Writes projected_w.npz, target.png, reconstruction.png, side_by_side.png, progress.gif, curve.png "
        "and summary.json. A folder, .zip or s3:// prefix of targets runs as a Ray job (Ray Data, one projection "
        "per actor, OUT/<target>/ each; finished targets are skipped on a re-run) with summary.md/csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--target", required=True, metavar="IMAGE|FOLDER|S3",
                   help="an image file, a folder (recursive), a .zip, or s3://bucket/prefix (or one s3 object)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--steps", type=int, default=O.steps, help="optimisation steps")
    p.add_argument("--space", choices=["w", "w+"], default=O.space, help="w: one w for every layer; w+: one per layer")
    p.add_argument("--seed", type=int, default=O.seed, help="seed of the exploration noise and the noise maps")
    p.add_argument("--distance", choices=["auto", "vgg16", "pixel-msssim"], default=O.distance,
                   help="auto: vgg16 when its weights file is found, else pixel-msssim (pixel MSE + 1 - MS-SSIM)")
    p.add_argument("--vgg16", default=None, metavar="PATH",
                   help="torchvision's vgg16-397923af.pth (default: $STYLERAY_VGG16, then ~/.cache/styleray/)")
    p.add_argument("--pti-steps", type=int, default=O.pti_steps, help="pivotal tuning steps after the search (0: none)")
    p.add_argument("--frame", choices=["auto", "prepare", "resize"], default=O.frame,
                   help="prepare: frame like prepare; resize: pad on white and resize; auto: resize when the "
                        "image is square on white already")
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="a conditional model's class for the starting w (default: all classes)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None,
                   help="folder targets: projection actors (default: the cluster's CPUs)")
    p.add_argument("--gpus", action="store_true", help="folder targets: one GPU per actor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_project)


def _cmd_project(args) -> int:
    from styleray.platform.projection.options import ProjectOptions
    from styleray.platform.projection.run import run_project

    result = run_project(ProjectOptions(
        checkpoint=args.checkpoint, target=args.target, out=args.out, steps=args.steps, space=args.space,
        seed=args.seed, distance=args.distance, vgg16=args.vgg16, pti_steps=args.pti_steps, frame=args.frame,
        class_idx=args.class_idx, device=args.device, workers=args.workers, gpus=args.gpus,
        progress=not args.no_progress,
    ))
    if "single" in result:
        s = result["single"]
        pti = f", after pivotal tuning {s['pti_psnr']:.2f} dB (run {s['pti_run']})" if s.get("pti_steps") else ""
        print(f"PSNR {s['psnr']:.2f} dB, {s['distance']} distance {s['distance_value']:.4f}{pti}; "
              f"{s['seconds']:.1f} s; wrote {args.out}")
        return 0
    f = result["folder"]
    print(f["table"], end="")
    print(f"{f['counts']['projected']} projected, {f['counts']['done before']} done before, "
          f"{f['counts']['failed']} failed in {f['seconds']:.1f} s; summary in {args.out}/summary.md")
    return 1 if f["counts"]["failed"] else 0


# ---------------------------------------------------------------------------------------------------------
# import, export: other formats of the networks (styleray.platform.importer, styleray.platform.export)
# ---------------------------------------------------------------------------------------------------------


def _add_import(sub) -> None:
    p = sub.add_parser(
        "import",
        help="an NVIDIA stylegan2-ada-pytorch network pickle -> a styleray run folder",
        description="Read a network pickle written by NVIDIA's stylegan2-ada-pytorch (network-snapshot-*.pkl, or "
        "its published pretrained models) without NVIDIA's code and without running anything stored in the "
        "file, and write a run folder with one checkpoint (G, D, G_ema, the model configuration read from the "
        "file, the augment strength if present). Prints the configuration and the parameter counts. Then "
        "`styleray generate/serve/metrics --checkpoint RUN` use it, and `styleray train --init-from RUN` "
        "fine-tunes from it. TensorFlow-era pickles must be converted first with NVIDIA's legacy.py; StyleGAN3 "
        "pickles are not supported.",
    )
    p.add_argument("file", metavar="FILE.pkl", help="the network pickle (local or s3://)")
    p.add_argument("--out", required=True, metavar="RUN", help="a new run folder (local or s3://)")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args) -> int:
    from styleray.platform.importer import describe, import_network

    print(describe(import_network(args.file, args.out)))
    return 0


def _add_export(sub) -> None:
    from styleray.models.interop.onnx_spec import CHECK_BATCHES, OPSET, TOLERANCE  # light: standard library only

    p = sub.add_parser(
        "export",
        help="a checkpoint's generator -> ONNX (checked with onnxruntime)",
        description=f"Export a checkpoint's EMA generator (mapping + synthesis) as ONNX, opset {OPSET} by default. "
        "Inputs: z float32 [batch, z_dim], psi float32 [] (truncation; 1 = none) and, for a conditional model, c "
        "float32 [batch, c_dim] (one-hot class); output: img float32 [batch, C, H, W] in about [-1, 1]. The batch "
        "axis is dynamic (any size); the noise is constant (noise_mode const). Before the file is written, "
        f"onnxruntime runs it at batch sizes {' and '.join(map(str, CHECK_BATCHES))} and its images must lie "
        f"within --tolerance of PyTorch's (default {TOLERANCE:g}).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--onnx", required=True, metavar="G.onnx", help="the ONNX file to write (local or s3://)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset version (default {OPSET})")
    p.add_argument("--tolerance", type=_positive_float, default=TOLERANCE,
                   help=f"largest |onnxruntime - PyTorch| allowed on the images (default {TOLERANCE:g})")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from styleray.platform.export import export_onnx

    r = export_onnx(args.checkpoint, args.onnx, opset=args.opset, tolerance=args.tolerance)
    print(f"wrote {r['onnx']} ({r['bytes'] / 2**20:.1f} MiB, opset {r['opset']}, inputs {', '.join(r['inputs'])}) "
          f"from {r['checkpoint']}; onnxruntime vs PyTorch: max |diff| {r['max_abs_diff']:.2g} "
          f"(tolerance {r['tolerance']:g})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# demo, serve
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


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve trained models over HTTP (Ray Serve), by name: samples, morphs, style mixing, a web page",
        description="Serve the EMA generators of trained runs with Ray Serve, each under a name (model=NAME on "
        "every route; GET /v1/models lists them): GET /v1/sample, POST /v1/samples, GET /v1/morph, GET /v1/mix, "
        "GET /v1/info, POST /v1/reload, the latent explorer page at / and the OpenAPI docs at /docs. --runs ROOT "
        "serves every run under ROOT (a run appearing later is served within --scan-interval-s); --model NAME=RUN "
        "names runs; --checkpoint serves one checkpoint. Binds 127.0.0.1 unless --host says otherwise. When the "
        "environment variable named by --api-key-env is set, every route needs that key (X-API-Key header); "
        "reload always does. On a cluster, `serve deploy serve.yaml` runs the same application.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", default=None,
                   help="one checkpoint folder, or a run folder (its newest checkpoint), served as it is until "
                   "POST /v1/reload, under its run folder's name; local or s3://")
    p.add_argument("--runs", default=argparse.SUPPRESS, metavar="ROOT",
                   help="a folder or s3:// prefix of run folders (e.g. the queue's out prefix): each is served under "
                   "its folder's name, with its best.json choice or newest checkpoint; rescanned (default: none)")
    p.add_argument("--model", dest="models", action="append", default=argparse.SUPPRESS, metavar="NAME=RUN",
                   help="serve the run folder RUN as NAME, following its best.json choice or newest checkpoint "
                   "(repeatable; default: none)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--replicas", type=int, default=1, help="generator replicas (fixed)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale: lower bound (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale: upper bound (with --min-replicas)")
    p.add_argument("--target-ongoing-requests", type=float, default=argparse.SUPPRESS,
                   help="autoscale: requests in flight per replica that Ray aims at (default: 16)")
    p.add_argument("--upscale-delay-s", type=float, default=argparse.SUPPRESS,
                   help="autoscale: seconds of load before adding a replica (default: Ray's, 30)")
    p.add_argument("--downscale-delay-s", type=float, default=argparse.SUPPRESS,
                   help="autoscale: seconds of low load before removing a replica (default: Ray's, 600)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs per generator replica (0: CPU; a fraction such as 0.25 shares a GPU between replicas)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per generator replica")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device of the replicas")
    p.add_argument("--no-batching", action="store_true", help="one network call per single-image request")
    p.add_argument("--max-batch-size", type=int, default=32, help="most single-image requests batched together")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill")
    p.add_argument("--api-key-env", default="STYLERAY_API_KEY", help="environment variable holding the API key")
    p.add_argument("--address", default=None, help="Ray cluster address (default: attach to a running one or start one)")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the application")
    _add_serve_groups(p)
    p.set_defaults(func=_cmd_serve)


def _add_serve_groups(p) -> None:
    """The grouped `serve` flags: ServeArgs fields that keep their default there unless given (SUPPRESS)."""
    g = p.add_argument_group("many models (README: Serving many models)")
    g.add_argument("--default-model", default=argparse.SUPPRESS, metavar="NAME",
                   help="the model of requests that name none (default: the first --model, else the first run)")
    g.add_argument("--models-per-replica", type=int, default=argparse.SUPPRESS, metavar="K",
                   help="models one replica keeps loaded; the least recently used is evicted (default: 3)")
    g.add_argument("--scan-interval-s", type=float, default=argparse.SUPPRESS,
                   help="how often --runs and the --model runs are rescanned for new runs and checkpoints (default: 10)")
    g.add_argument("--scan-depth", type=int, default=argparse.SUPPRESS,
                   help="levels below --runs where run folders are looked for (default: 2: ROOT/RUN, ROOT/GROUP/RUN)")
    g.add_argument("--max-models", type=int, default=argparse.SUPPRESS, help="most models listed (default: 1000)")
    g = p.add_argument_group("what reload may read (README: Security)")
    g.add_argument("--reload-root", dest="reload_roots", action="append", default=argparse.SUPPRESS, metavar="PATH",
                   help="a local folder reload may read under (repeatable; default: the served run's parent)")
    g.add_argument("--reload-scheme", dest="reload_schemes", action="append", default=argparse.SUPPRESS, metavar="SCHEME",
                   help="a URL scheme reload may read (repeatable; default: s3; http or ftp only if named)")
    g.add_argument("--max-checkpoint-mb", type=float, default=argparse.SUPPRESS, help="largest state.pt a replica reads (default: 2048)")
    g = p.add_argument_group("per-client limits (behind a reverse proxy: README, Security)")
    g.add_argument("--max-header-kb", type=float, default=argparse.SUPPRESS, help="request headers over this get 431 (default: 16)")
    g.add_argument("--body-timeout-s", type=float, default=argparse.SUPPRESS, help="a request body must arrive within this (default: 10)")
    g.add_argument("--max-requests-per-client", type=int, default=argparse.SUPPRESS, help="429 beyond this many per address (default: 32)")
    g.add_argument("--max-pending-bodies", type=int, default=argparse.SUPPRESS,
                   help="503 beyond this many request bodies arriving at once, all clients together (default: 64)")
    g.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=argparse.SUPPRESS, metavar="ADDR",
                   help="a reverse proxy (address or network) whose --client-ip-header names the client (repeatable)")
    g.add_argument("--client-ip-header", default=argparse.SUPPRESS, help="the header trusted proxies set (default: X-Forwarded-For)")
    g = p.add_argument_group("projections of uploaded images (POST /v1/projections)")
    g.add_argument("--max-running-projections", type=int, default=argparse.SUPPRESS,
                   help="projections running at once per replica; 429 with Retry-After beyond (default: 1)")
    g.add_argument("--projections-kept", type=int, default=argparse.SUPPRESS,
                   help="projections kept, the oldest finished evicted (default: 32)")
    g.add_argument("--max-projection-steps", type=int, default=argparse.SUPPRESS,
                   help="most optimisation steps one projection may ask for (default: 1000)")


def _cmd_serve(args) -> int:
    from styleray.serve.cli_serve import run_serve

    return run_serve(args)


# ---------------------------------------------------------------------------------------------------------
# tune: Ray Tune sweeps over Ray Train runs (styleray.platform.tune)
# ---------------------------------------------------------------------------------------------------------

TUNE_FIXED = ("preset", "kimg", "tick", "snap")  # train settings every trial shares, as flags of `tune`


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
    p.add_argument("--train-config", default=None, metavar="FILE", help="YAML of fixed train settings (train --config)")
    train_settings.add_arguments(p.add_argument_group("train settings of every trial"), only=TUNE_FIXED)
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
    from styleray.platform.tune.driver import SweepConfig, resume_sweep, run_sweep

    if args.resume:
        defaults = vars(build_parser().parse_args(["tune", "--out", args.out, "--resume"]))
        ignored = [train_settings.flag_of(k) for k, v in vars(args).items()
                   if k != "verbose" and defaults.get(k, not v) != v]
        if ignored:
            log.warning("--resume continues the sweep with its saved settings (sweep.json); ignoring %s",
                        " ".join(ignored))
        summary = resume_sweep(args.out)
    else:
        if not args.data or not args.space:
            raise ValueError("--data and --space are required (unless --resume continues a sweep)")
        base = train_settings.load_file(args.train_config, "--train-config")[1] if args.train_config else {}
        base.update(train_settings.given(args, only=TUNE_FIXED), data=args.data)
        summary = run_sweep(SweepConfig(
            out=args.out, space_file=args.space, base=base, trials=args.trials, scheduler=args.scheduler,
            search=args.search, metric=args.metric, workers_per_trial=args.workers_per_trial,
            cpus_per_worker=args.cpus_per_worker, gpus=args.gpus, max_concurrent=args.max_concurrent,
            metrics_every=args.metrics_every, num_gen=args.metrics_num_gen, extractor=args.extractor,
            inception=args.inception, perturbation_interval=args.perturbation_interval, pbt_sync=args.pbt_sync,
            grace_period=args.grace_period, seed=args.seed,
        ))
    return _print_sweep(summary)


def _print_sweep(summary: dict) -> int:
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


class _KeepUnknownFlags(argparse.ArgumentParser):
    """A parser that keeps the flags it does not know in ``unknown_flags`` when the namespace asks for it
    (``queue add``: an unknown train flag is recorded as the reason a request was rejected)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if getattr(ns, "keep_unknown_flags", False):
            ns.unknown_flags, extras = extras, []
        return ns, extras


def _add_queue(sub) -> None:
    p = sub.add_parser(
        "queue",
        help="the training queue: add, list, show, cancel requests",
        description="A durable queue of training requests (SQLite: --db, default $STYLERAY_QUEUE or "
        "~/.styleray/queue.db) that `styleray manager` runs on a Ray cluster as jobs, resuming interrupted ones.",
    )
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION", required=True, parser_class=_KeepUnknownFlags)
    _add_queue_add(qsub)
    ls = qsub.add_parser("list", help="the requests, with progress bars", description="The queue, what the manager does.")
    ls.add_argument("--active", action="store_true", help="only requests that have not finished")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--db", default=None, help=DB_HELP)
    sh = qsub.add_parser("show", help="one request: attempts, events, the model name it is served under",
                         description="A request's attempts and events; for a finished run, the model name it is "
                         "served under when a `styleray serve --runs` app watches its out prefix.")
    sh.add_argument("id", metavar="ID|NAME", help="request id, or name (its newest request)")
    sh.add_argument("--db", default=None, help=DB_HELP)
    c = qsub.add_parser("cancel", help="cancel a request (and stop its Ray job)",
                        description="Cancel a request; its Ray job is stopped now with --address, else by the manager.")
    c.add_argument("id", type=int, help="request id")
    c.add_argument("--address", default=None, help="Jobs API, e.g. http://HEAD:8265: stop the job right away")
    c.add_argument("--db", default=None, help=DB_HELP)
    p.set_defaults(func=_cmd_queue)


def _add_queue_add(qsub) -> None:
    a = qsub.add_parser(
        "add",
        help="add a training request",
        description="Add a request: --name plus the settings of `styleray train`, as its flags and/or in --config "
        "FILE.yaml (the train settings at the top level or under train:, with name, priority and max_attempts "
        "beside them; flags given here win). It is checked now: bad settings or missing data are recorded as a "
        "failed request with the reason.",
        allow_abbrev=False,
    )
    a.add_argument("--name", default=None, help="a short label for the request")
    a.add_argument("--priority", type=int, default=None, help="higher runs first (default 0)")
    a.add_argument("--config", default=None, metavar="FILE", help="YAML: train settings (and name, priority)")
    a.add_argument("--max-attempts", type=int, default=None,
                   help="fail after this many interrupted attempts in a row without a new checkpoint (default 5)")
    a.add_argument("--no-check", action="store_true",
                   help="do not read --data from here (data only the cluster sees); --kimg is then required")
    a.add_argument("--db", default=None, help=DB_HELP)
    train_settings.add_arguments(a.add_argument_group("train settings (as for styleray train)"), convert_values=False)
    a.set_defaults(keep_unknown_flags=True, unknown_flags=[])


def _cmd_queue(args) -> int:
    from styleray.platform.manager import commands

    if args.queue_command == "add":
        file_fields, file_settings = train_settings.load_file(args.config) if args.config else ({}, {})
        print(commands.queue_add(
            args.db, {**file_settings, **train_settings.given(args)}, unknown_flags=args.unknown_flags,
            name=args.name or file_fields.get("name"),
            priority=args.priority if args.priority is not None else file_fields.get("priority", 0),
            max_attempts=args.max_attempts if args.max_attempts is not None else file_fields.get("max_attempts", 5),
            check_data=not args.no_check,
        ))
    elif args.queue_command == "list":
        print(commands.queue_list(args.db, active_only=args.active, as_json=args.json))
    elif args.queue_command == "show":
        print(commands.queue_show(args.db, args.id))
    else:
        print(commands.queue_cancel(args.db, args.id, address=args.address))
    return 0


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
    p.add_argument("--db", default=None, help=DB_HELP)
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

    return run_manager(
        args.db, address=args.address, max_running=args.max_running, poll_s=args.poll, backoff_s=args.backoff,
        backoff_max_s=args.backoff_max, once=args.once, ship_package=args.ship_package,
        working_dir=args.working_dir, runtime_env_file=args.runtime_env, entrypoint_num_cpus=args.entrypoint_num_cpus,
    )


# ---------------------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [_add_prepare, _add_train, _add_tune, _add_generate, _add_project, _add_demo, _add_metrics,
                            _add_serve, _add_queue, _add_manager, _add_import, _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="styleray",
        description="StyleGAN2-ADA on Ray: prepare images, train, sweep, queue, and serve generators.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


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
