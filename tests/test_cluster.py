"""cluster.yaml is a valid Ray autoscaler config, checked against the schema that ships inside the ray package."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema(cluster: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cluster, _schema())
    validate_config(cluster)  # Ray's own checks: schema + head type + min_workers sum
    validate_config(prepare_config(copy.deepcopy(cluster)))  # after merging Ray's AWS defaults


def test_cluster_yaml_node_types(cluster: dict) -> None:
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    rollout, trainer = types["rollout"], types["trainer"]
    assert rollout["resources"]["sim"] >= 1 and rollout["resources"].get("GPU", 0) == 0
    assert trainer["resources"]["trainer"] >= 1 and trainer["resources"]["GPU"] >= 1
    for t in (rollout, trainer):
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"]
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install" in setup and "apo_ray" in setup and "MUJOCO_GL=egl" in setup
    assert all("MUJOCO_GL=egl" in c for c in cluster["worker_start_ray_commands"] if "ray start" in c)


def test_schema_rejects_a_broken_config(cluster: dict) -> None:
    """The check can fail: a misspelled top-level key and a fractional custom resource are rejected."""
    bad = copy.deepcopy(cluster)
    bad["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["rollout"]["resources"]["sim"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
