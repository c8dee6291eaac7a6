"""cluster.yaml is valid for Ray's autoscaler (checked offline) and says what the docs promise."""

import copy
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_autoscaler_schema():
    cfg = load()
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_promises():
    cfg = load()
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")  # pinned to our Ray
    gpu = cfg["available_node_types"]["gpu-8x"]
    assert gpu["resources"]["GPU"] == 8 and gpu["node_config"]["InstanceType"] == "p3.16xlarge"
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds  # never on a public port
    assert cfg["idle_timeout_minutes"] > 0
    assert any("torch==2.13.0" in c for c in cfg["setup_commands"])


def test_schema_check_can_fail():
    cfg = load()
    cfg["available_node_types"]["gpu-8x"]["min_workers"] = "many"
    try:
        validate_config(prepare_config(cfg))
    except Exception as e:  # noqa: BLE001 - jsonschema or ValueError, depending on the field
        assert "many" in str(e) or "min_workers" in str(e)
    else:
        raise AssertionError("an invalid cluster.yaml passed validation")
