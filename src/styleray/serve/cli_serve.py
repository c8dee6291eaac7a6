"""``styleray serve``: flags -> ServeArgs -> a running Serve application (Ray and torch imported here, lazily)."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("styleray")

# ServeArgs fields whose flags the `serve` parser may add (dest = the field name; lists from action="append"
# for reload_roots, reload_schemes, trusted_proxies); absent or None: the ServeArgs default.
OPTIONAL_FIELDS = (
    "reload_roots", "reload_schemes", "max_checkpoint_mb", "max_header_kb", "body_timeout_s",
    "max_requests_per_client", "max_pending_bodies", "trusted_proxies", "client_ip_header",
    "max_running_projections", "projections_kept", "max_projection_steps",
    "default_model", "models_per_replica", "scan_interval_s", "scan_depth", "max_models",
    "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "look_back_period_s",
)
FLAGS = {"min_replicas": "--min-replicas", "max_replicas": "--max-replicas", "batch_wait_timeout_s": "--batch-wait-ms",
         "reload_roots": "--reload-root", "reload_schemes": "--reload-scheme", "trusted_proxies": "--trusted-proxy",
         "models": "--model", "runs": "--runs"}


def parse_model_flags(values: list[str] | None) -> dict[str, str]:
    """``--model NAME=RUN`` (repeatable) -> {NAME: absolute RUN}, in order; ValueError naming the flag."""
    from styleray import storage

    models: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {value!r}: write NAME=RUN, e.g. --model heroes=s3://bucket/runs/heroes")
        if name in models:
            raise ValueError(f"--model {name}=...: the name {name!r} is given twice")
        models[name] = storage.absolute(path)
    return models


def serve_args_from_flags(args: argparse.Namespace):
    """ServeArgs from the CLI flags; a ValueError naming the flag when they do not fit together."""
    from pydantic import ValidationError

    from styleray import storage
    from styleray.serve.args import ServeArgs

    key = os.environ.get(args.api_key_env) or None
    optional = {f: getattr(args, f) for f in OPTIONAL_FIELDS if getattr(args, f, None) is not None}
    checkpoint, runs = getattr(args, "checkpoint", None), getattr(args, "runs", None)
    try:
        return ServeArgs(
            # replicas run in another working directory: absolute paths
            checkpoint=storage.absolute(checkpoint) if checkpoint else None,
            models=parse_model_flags(getattr(args, "models", None)),
            runs=storage.absolute(runs) if runs else None,
            device=args.device,
            replicas=args.replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            batching=not args.no_batching,
            max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000,
            api_key=key,
            api_key_env=args.api_key_env,
            **optional,
        )
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            flag = FLAGS.get(field, "--" + field.replace("_", "-")) if field else ""
            message = err["msg"].removeprefix("Value error, ")
            if not field and message.startswith("nothing to serve"):
                message = "nothing to serve: give --runs ROOT, --model NAME=RUN (repeatable) or --checkpoint PATH"
            msgs.append(f"{flag} {message}".strip())
        raise ValueError("; ".join(msgs)) from None


def run_serve(args: argparse.Namespace) -> int:
    from styleray.serve.app import run

    serve_args = serve_args_from_flags(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must lie in 1-65535")
    check_sources(serve_args)  # fail here, with the reason, rather than in every replica
    from ray import serve

    log.info("serving on http://%s:%d%s", args.host, args.port, args.route_prefix)
    try:
        run(serve_args, host=args.host, port=args.port, address=args.address, route_prefix=args.route_prefix, blocking=True)
    finally:
        serve.shutdown()
    return 0


def check_sources(a) -> None:
    """Every configured source can be read, and the names it gives are logged (with the duplicate rule's
    outcome); a ValueError naming the flag otherwise."""
    from styleray import storage
    from styleray.platform.checkpoint import CheckpointError, resolve
    from styleray.serve.catalog import assign_names, choose_checkpoint, explicit_sources, find_runs

    if a.checkpoint is not None:
        try:
            ckpt = resolve(a.checkpoint)
        except CheckpointError as e:
            raise ValueError(f"--checkpoint: {e}") from None
        log.info("--checkpoint: %s (%.1f kimg)", ckpt.uri, ckpt.kimg)
    for name, run in a.models.items():
        if not storage.exists(run):
            raise ValueError(f"--model {name}={run}: no such folder")
        if choose_checkpoint(run) is None and not storage.exists(storage.join(run, "meta.json")):
            log.warning("--model %s=%s has no committed checkpoint yet: served once it has one", name, run)
    found = []
    if a.runs is not None:
        if not storage.exists(a.runs):
            raise ValueError(f"--runs {a.runs}: no such folder or prefix")
        found = find_runs(a.runs, a.scan_depth)
    sources, notes = assign_names(explicit_sources(a.checkpoint, dict(a.models)), found, a.runs or "")
    for s in sources:
        log.info("model %s: %s (%s)", s.name, s.uri, s.origin)
    for note in notes:
        log.warning("models: %s", note)
    if a.runs is not None:
        log.info("--runs %s: %d run(s) now, rescanned every %g s (a run is served once it has a committed "
                 "checkpoint; names: README, Serving many models)", a.runs, len(found), a.scan_interval_s)
