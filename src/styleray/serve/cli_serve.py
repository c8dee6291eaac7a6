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
)


def serve_args_from_flags(args: argparse.Namespace):
    """ServeArgs from the CLI flags; a ValueError naming the flag when they do not fit together."""
    from pydantic import ValidationError

    from styleray import storage
    from styleray.serve.args import ServeArgs

    key = os.environ.get(args.api_key_env) or None
    optional = {f: getattr(args, f) for f in OPTIONAL_FIELDS if getattr(args, f, None) is not None}
    try:
        return ServeArgs(
            checkpoint=storage.absolute(args.checkpoint),  # replicas run in another working directory
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
        flags = {"min_replicas": "--min-replicas", "max_replicas": "--max-replicas", "batch_wait_timeout_s": "--batch-wait-ms",
                 "reload_roots": "--reload-root", "reload_schemes": "--reload-scheme", "trusted_proxies": "--trusted-proxy"}
        msgs = []
        for err in e.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            flag = flags.get(field, "--" + field.replace("_", "-")) if field else ""
            msgs.append(f"{flag} {err['msg'].removeprefix('Value error, ')}".strip())
        raise ValueError("; ".join(msgs)) from None


def run_serve(args: argparse.Namespace) -> int:
    from styleray.platform.checkpoint import CheckpointError, resolve
    from styleray.serve.app import run

    serve_args = serve_args_from_flags(args)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must lie in 1-65535")
    try:  # fail here, with the reason, rather than in every replica
        ckpt = resolve(args.checkpoint)
    except CheckpointError as e:
        raise ValueError(f"--checkpoint: {e}") from None
    log.info("serving %s (%.1f kimg) on http://%s:%d%s", ckpt.uri, ckpt.kimg, args.host, args.port, args.route_prefix)
    del ckpt
    from ray import serve

    try:
        run(serve_args, host=args.host, port=args.port, address=args.address, route_prefix=args.route_prefix, blocking=True)
    finally:
        serve.shutdown()
    return 0
