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


def test_placement_scales_out_the_node_types(cluster: dict) -> None:
    """On a fresh `ray up` the head sees no GPU (trainer type at min 0): the trainer, the reference stage and GPU
    rollout actors must still ask for one, and for `trainer`, or the autoscaler never starts a GPU node."""
    from apo_ray.config import TrainConfig
    from apo_ray.ray_utils import offered_resources
    from apo_ray.rollout import actor_placement
    from apo_ray.trainer import train_placement

    now = {"CPU": 4.0 + 16.0, "sim": 14.0, "memory": 3e10}  # the head + the one rollout node at min_workers
    offered = offered_resources(now, cluster)
    # head 4 CPU + 8 rollout x 16 + 2 trainer x 8; 8 x 14 simulators; 2 trainer nodes of 1 GPU
    assert (offered["CPU"], offered["sim"], offered["GPU"], offered["trainer"]) == (148.0, 112.0, 2.0, 2.0)
    assert offered["memory"] == 3e10
    assert train_placement(TrainConfig(workers=2), offered) == (True, {"CPU": 0.5, "GPU": 1.0, "trainer": 1.0})
    assert train_placement(TrainConfig(workers=3), offered)[0] is False  # more GPUs than it can ever hold: CPU
    assert train_placement(TrainConfig(use_gpu=False), offered) == (False, {"CPU": 0.5, "trainer": 1.0})
    assert actor_placement(0.25, offered) == {"num_cpus": 1, "num_gpus": 0.25}
    assert actor_placement(0.0, offered) == {"num_cpus": 0, "resources": {"sim": 1}}
    # a plain `ray start` cluster or a laptop has no autoscaler config: only what is there now counts
    alone = offered_resources(now, None)
    assert "GPU" not in alone and train_placement(TrainConfig(), alone) == (False, {"CPU": 0.5})


@pytest.mark.ray
def test_cluster_offers_reads_the_autoscaler_config(ray_local, tmp_path, monkeypatch) -> None:
    from apo_ray.errors import UserError
    from apo_ray.ray_utils import cluster_offers, under_autoscaler

    now = {k: v for k, v in ray_local.cluster_resources().items() if v > 0}
    monkeypatch.setenv("APO_RAY_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    assert cluster_offers() == now and not under_autoscaler()  # no autoscaler: only what is up
    monkeypatch.setenv("APO_RAY_AUTOSCALER_CONFIG", str(ROOT / "cluster.yaml"))
    offered = cluster_offers()
    assert under_autoscaler()  # the loop then lets no idle rollout actor keep a node up
    assert (offered["GPU"], offered["trainer"]) == (max(2.0, now.get("GPU", 0.0)), 2.0)
    (tmp_path / "bad.yaml").write_text("available_node_types: [unclosed\n")
    monkeypatch.setenv("APO_RAY_AUTOSCALER_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(UserError, match="the autoscaler config is not YAML"):
        cluster_offers()
