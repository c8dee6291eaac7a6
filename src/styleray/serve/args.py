"""ServeArgs: the typed arguments of the Serve application (``serve.yaml`` ``args:``, or the CLI flags).

A pydantic model because Ray Serve validates an app builder's ``args`` against the builder's annotated type.
Messages name the field and the fix, like the rest of styleray's configs.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from styleray.serve.projections import PROJECTION_STEPS_MAX

if TYPE_CHECKING:
    from styleray.serve.limits import HttpLimits
    from styleray.serve.sources import SourcePolicy

DEFAULT_API_KEY_ENV = "STYLERAY_API_KEY"


class ServeArgs(BaseModel):
    """Everything the Serve application needs; HTTP host and port belong to Serve's ``http_options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what is served (at least one; serve/catalog.py has the naming rule)
    checkpoint: str | None = Field(
        None, description="checkpoint folder, or run folder (its newest good checkpoint at start), served until "
        "POST /v1/reload under its run folder's name; local path or s3:// URI"
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="NAME -> run folder (its best.json choice or newest checkpoint, followed) "
        "or checkpoint folder"
    )
    runs: str | None = Field(
        None, description="a folder or s3:// prefix of run folders, each served under its folder's name, rescanned "
        "every scan_interval_s"
    )
    default_model: str | None = Field(None, description="the model of requests that name none (default: the first)")
    scan_interval_s: float = Field(10.0, gt=0, le=3600, description="how often runs and followed runs are rescanned")
    scan_depth: int = Field(2, ge=1, le=4, description="levels below runs where run folders are looked for")
    max_models: int = Field(1000, ge=1, description="most models listed; more are logged and left out")
    models_per_replica: int = Field(
        3, ge=1, le=64, description="models one sampler replica keeps loaded (least recently used evicted)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica has a GPU, else cpu"
    )
    # replicas and resources (README: Serving many models)
    replicas: int = Field(1, ge=1, description="sampler replicas when not autoscaling")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound (set both bounds to autoscale)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(16.0, gt=0, description="autoscaling target per replica")
    upscale_delay_s: float | None = Field(None, ge=0, description="autoscaling: load this long before scaling up "
                                          "(default: Ray's, 30 s)")
    downscale_delay_s: float | None = Field(None, ge=0, description="autoscaling: idle this long before scaling "
                                            "down (default: Ray's, 600 s)")
    look_back_period_s: float | None = Field(None, gt=0, description="autoscaling: the window load is averaged over "
                                             "(default: Ray's, 30 s)")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs reserved by each sampler replica")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved by each sampler replica")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs reserved by the HTTP ingress replica")
    # batching
    batching: bool = Field(True, description="batch single-image requests across clients (@serve.batch)")
    max_batch_size: int = Field(32, ge=1, le=256, description="most single-image requests in one batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="longest wait for a batch to fill")
    max_ongoing_requests: int = Field(256, ge=1, description="requests in flight per sampler replica")
    # security and reload
    api_key: SecretStr | None = Field(None, description="required in X-API-Key on every route when set")
    api_key_env: str = Field(DEFAULT_API_KEY_ENV, description="env var read for the key when api_key is unset")
    reload_poll_s: float = Field(1.0, gt=0, le=60, description="how often replicas look for a new checkpoint")
    reload_roots: tuple[str, ...] | None = Field(
        None, description="local folders POST /v1/reload may read checkpoints under (default: the served run's parent)"
    )
    reload_schemes: tuple[str, ...] = Field(
        ("s3",), description="URL schemes reload may read besides local folders; http, ftp, ... only when named here"
    )
    max_checkpoint_mb: float = Field(
        2048.0, gt=0, description="largest state.pt a replica reads, in MiB; larger files are refused unread"
    )
    # HTTP limits per client (enforced in the ingress, see styleray.serve.limits)
    max_header_kb: float = Field(16.0, gt=0, le=1024, description="request headers larger than this get 431")
    body_timeout_s: float = Field(10.0, gt=0, le=600, description="a request body must arrive within this (408)")
    max_requests_per_client: int = Field(
        32, ge=1, description="requests one client address may have in flight; more get 429"
    )
    max_pending_bodies: int = Field(
        64, ge=1, description="requests still sending their body, all clients together; more get 503"
    )
    trusted_proxies: tuple[str, ...] = Field(
        (), description="addresses/networks of reverse proxies whose client_ip_header names the client"
    )
    client_ip_header: str = Field("X-Forwarded-For", description="the header trusted proxies put the client in")
    # projections of uploaded images (POST /v1/projections)
    max_running_projections: int = Field(
        1, ge=1, le=16, description="projections running at once per sampler replica (429 with Retry-After beyond)"
    )
    projections_kept: int = Field(32, ge=1, le=10_000, description="projections kept (the oldest finished evicted)")
    max_projection_steps: int = Field(
        1000, ge=1, le=PROJECTION_STEPS_MAX, description="most optimisation steps one projection may ask for"
    )

    @field_validator("reload_schemes")
    @classmethod
    def _schemes(cls, schemes: tuple[str, ...]) -> tuple[str, ...]:
        for scheme in schemes:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or scheme == "file":
                raise ValueError(f"{scheme!r} is not a URL scheme like s3 or gs (local folders: reload_roots)")
        return schemes

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        for p in proxies:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"{p!r} is not an IP address or network like 10.0.0.0/8") from None
        return proxies

    @field_validator("models")
    @classmethod
    def _models(cls, models: dict[str, str]) -> dict[str, str]:
        from styleray.serve.catalog import check_name

        for name, path in models.items():
            check_name(name)
            if not path.strip():
                raise ValueError(f"model {name!r}: give its run folder (NAME=RUN)")
        return models

    @field_validator("default_model")
    @classmethod
    def _default(cls, name: str | None) -> str | None:
        from styleray.serve.catalog import check_name

        return None if name is None else check_name(name, "default model")

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        if self.checkpoint is None and not self.models and self.runs is None:
            raise ValueError("nothing to serve: give a checkpoint, models (NAME=RUN) or runs (a folder of runs)")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas (or neither, for fixed replicas)")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas} (swap them)"
            )
        if self.device == "cuda" and self.gpus_per_replica == 0:
            raise ValueError("device cuda needs gpus_per_replica > 0 (e.g. --gpus-per-replica 1)")
        if self.device == "cpu" and self.gpus_per_replica > 0:
            raise ValueError(f"device cpu with gpus_per_replica {self.gpus_per_replica} reserves GPUs it never uses")
        return self

    @property
    def max_checkpoint_bytes(self) -> int:
        return int(self.max_checkpoint_mb * 2**20)

    def source_policy(self) -> "SourcePolicy":
        """Where reload may read from (see styleray.serve.sources): by default every served run's parent
        folder, and the runs folder."""
        from styleray.serve.sources import SourcePolicy

        served = ([self.checkpoint] if self.checkpoint else []) + list(self.models.values())
        return SourcePolicy.for_models(served, self.runs, self.reload_roots, self.reload_schemes)

    def http_limits(self) -> "HttpLimits":
        from styleray.serve.limits import HttpLimits

        return HttpLimits(
            max_header_bytes=int(self.max_header_kb * 1024),
            body_timeout_s=self.body_timeout_s,
            max_requests_per_client=self.max_requests_per_client,
            max_pending_bodies=self.max_pending_bodies,
            trusted_proxies=self.trusted_proxies,
            client_ip_header=self.client_ip_header,
        )

    @property
    def autoscaling(self) -> dict | None:
        if self.max_replicas is None:
            return None
        config = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        delays = {"upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                  "look_back_period_s": self.look_back_period_s}
        return {**config, **{k: v for k, v in delays.items() if v is not None}}
