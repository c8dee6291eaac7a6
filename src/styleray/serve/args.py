"""ServeArgs: the typed arguments of the Serve application (``serve.yaml`` ``args:``, or the CLI flags).

A pydantic model because Ray Serve validates an app builder's ``args`` against the builder's annotated type.
Messages name the field and the fix, like the rest of styleray's configs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from styleray.serve.projections import PROJECTION_STEPS_MAX

DEFAULT_API_KEY_ENV = "STYLERAY_API_KEY"


class ServeArgs(BaseModel):
    """Everything the Serve application needs; HTTP host and port belong to Serve's ``http_options``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(
        description="checkpoint folder, or run folder (its newest good checkpoint); local path or s3:// URI"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica has a GPU, else cpu"
    )
    # replicas and resources
    replicas: int = Field(1, ge=1, description="replicas of the generator when not autoscaling")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound (set both bounds to autoscale)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(16.0, gt=0, description="autoscaling target per replica")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs reserved by each generator replica")
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs reserved by each generator replica")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs reserved by the HTTP ingress replica")
    # batching
    batching: bool = Field(True, description="batch single-image requests across clients (@serve.batch)")
    max_batch_size: int = Field(32, ge=1, le=256, description="most single-image requests in one batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="longest wait for a batch to fill")
    max_ongoing_requests: int = Field(256, ge=1, description="requests in flight per generator replica")
    # security and reload
    api_key: SecretStr | None = Field(None, description="required in X-API-Key on every route when set")
    api_key_env: str = Field(DEFAULT_API_KEY_ENV, description="env var read for the key when api_key is unset")
    reload_poll_s: float = Field(1.0, gt=0, le=60, description="how often replicas look for a new checkpoint")
    # projections of uploaded images (POST /v1/projections)
    max_running_projections: int = Field(
        1, ge=1, le=16, description="projections running at once per generator replica (429 with Retry-After beyond)"
    )
    projections_kept: int = Field(32, ge=1, le=10_000, description="projections kept (the oldest finished evicted)")
    max_projection_steps: int = Field(
        1000, ge=1, le=PROJECTION_STEPS_MAX, description="most optimisation steps one projection may ask for"
    )

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
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
    def autoscaling(self) -> dict | None:
        if self.max_replicas is None:
            return None
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
