"""serve.yaml is a valid Ray Serve config whose builder accepts its args and builds the application offline."""

from __future__ import annotations

import pathlib

import pytest
import yaml

SERVE_YAML = pathlib.Path(__file__).resolve().parents[2] / "serve.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(SERVE_YAML.read_text())


def test_matches_ray_serve_schema(config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"  # never 0.0.0.0 by default
    (app,) = schema.applications
    assert app.import_path == "styleray.serve.app:build_app" and app.route_prefix == "/"


def test_builder_accepts_args_and_builds_the_graph(config):
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from styleray.serve.args import ServeArgs
    from styleray.serve.registry import CheckpointRegistry
    from styleray.serve.sampler import SamplerDeployment

    spec = config["applications"][0]
    builder = import_attr(spec["import_path"])
    app = call_user_app_builder_with_args_if_necessary(builder, spec["args"])  # what `serve deploy` does
    assert isinstance(app, Application)
    args = ServeArgs.model_validate(spec["args"])
    assert args.autoscaling == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16.0}
    assert args.runs == "demo-output" and args.checkpoint is None and args.models_per_replica == 3
    names = {"Ingress", SamplerDeployment.name, CheckpointRegistry.name}
    assert {d["name"] for d in spec.get("deployments", [])} <= names  # overrides name real deployments
    with pytest.raises(Exception, match="bogus"):
        call_user_app_builder_with_args_if_necessary(builder, {**spec["args"], "bogus": 1})


def test_fractional_gpus_and_autoscaling_reach_the_sampler_deployment():
    """No GPU here: the builder's options are checked (what Ray would schedule), not run on a GPU."""
    from styleray.serve.app import build_app
    from styleray.serve.args import ServeArgs

    app = build_app(ServeArgs(runs="/tmp/runs", gpus_per_replica=0.25, device="cuda", min_replicas=1, max_replicas=4,
                              target_ongoing_requests=8, upscale_delay_s=5, models_per_replica=2))
    (sampler,) = [a._bound_deployment for a in app._bound_deployment.init_args[:1]]
    assert sampler.name == "Sampler" and sampler.ray_actor_options["num_gpus"] == 0.25
    scaling = sampler._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests, scaling.upscale_delay_s) == \
        (1, 4, 8, 5)
