"""The autoscaling claim, checked with Ray's own autoscaler instead of by reading cluster.yaml.

``test_smoke_loop_on_an_autoscaling_cluster`` (in ``make test``; alone: ``make test-autoscale``) runs configs/smoke.yaml
cut to one round (as tests/test_loop.py does, to keep CI short; ``python -m apo_ray.bench.autoscale`` runs both rounds)
on a local Ray head with the fake multi-node provider (min-0 ``rollout`` and ``trainer`` node types, see
apo_ray/bench/autoscale.py) and on the embedded Ray, and checks from ``ray.nodes()`` and the autoscaler's log that nodes
come up for collection, evaluation and training, that idle rollout nodes go while the loop trains, that a rollout
node killed during a collection loses no episode and duplicates none, and that both runs hold the same results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
OVERRIDES = ["loop.rounds=1"]


def test_fake_cluster_offers_what_cluster_yaml_offers() -> None:
    """The fake cluster's node types are cluster.yaml's in small: the loop reads them from the autoscaler config
    and asks for ``sim`` (rollout actors) and ``trainer`` (train workers), which scales those types out."""
    from apo_ray.bench.autoscale import FakeClusterSpec
    from apo_ray.config import TrainConfig
    from apo_ray.ray_utils import offered_resources
    from apo_ray.rollout import actor_placement
    from apo_ray.trainer import train_placement

    spec = FakeClusterSpec()
    cfg = spec.autoscaler_config("127.0.0.1:1")
    assert all(t.get("min_workers", 0) == 0 for t in cfg["available_node_types"].values())
    offered = offered_resources({"CPU": float(spec.head_cpus)}, cfg)  # only the head is up
    assert offered["sim"] == spec.rollout_max and offered["trainer"] == spec.trainer_max
    assert actor_placement(0.0, offered) == {"num_cpus": 0, "resources": {"sim": 1}}
    assert train_placement(TrainConfig(), offered) == (False, {"CPU": 0.5, "trainer": 1.0})


def _stage_of(events: list[dict], kind: str, event: str, node_type: str) -> list[dict]:
    return [e for e in events if e["event"] == event and e["type"] == node_type and e["stage"]
            and e["stage"].split("/")[2] == kind]


@pytest.mark.ray
@pytest.mark.xdist_group("autoscale")  # its own Ray head: beside the shared-Ray tests, not after them (~4.5 min)
def test_smoke_loop_on_an_autoscaling_cluster(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "APO_RAY_AUTOSCALER_CONFIG")}
    # the script stops its cluster itself when the loop overruns (a killed script would leave it running)
    cmd = [sys.executable, "-m", "apo_ray.bench.autoscale", "--config", str(SMOKE), "--root", str(tmp_path), "--embedded",
           "--timeout", "1500", *OVERRIDES]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert out.stdout.strip(), out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    log = (tmp_path / "autoscaled.log").read_text()
    assert res["rc"] == 0, log[-3000:]
    print(f"\nembedded loop {res['embedded_seconds']} s, autoscaled loop {res['loop_seconds']} s; "
          f"nodes: {[(e['t'], e['event'], e['type'], e['stage']) for e in res['nodes']]}; kill: {res['kill']}")
    ev = res["nodes"]
    # Ray's autoscaler launched rollout nodes for a collection and an evaluation, and a trainer node to train
    assert _stage_of(ev, "collect", "up", "rollout") and _stage_of(ev, "eval", "up", "rollout"), ev
    assert _stage_of(ev, "train", "up", "trainer"), ev
    # and removed idle rollout nodes between a collection or evaluation and the next one: while the loop
    # built its dataset or trained (the loop released its actors before those stages)
    idle_down = [e for e in ev if e["event"] == "down" and e["type"] == "rollout" and not e.get("killed")
                 and e["stage"] and e["stage"].split("/")[2] in ("dataset", "train")]
    assert idle_down, ev
    log_lines = "\n".join(res["autoscaler_log"])
    assert "Adding" in log_lines and "type rollout" in log_lines and "type trainer" in log_lines
    assert "(idle)" in log_lines
    # a rollout node died mid-collection: its episode ran again elsewhere from its seed
    kill = res["kill"]
    assert kill and kill["stage"].split("/")[2] == "collect", kill
    n_planned = json.loads((tmp_path / "autoscaled" / kill["stage"] / "collect.json").read_text())["episodes"]
    assert kill["episodes_done_before"] < n_planned
    assert any(e["event"] == "down" and e.get("killed") for e in ev), ev
    episodes = sorted((tmp_path / "autoscaled" / kill["stage"] / "episodes").glob("*.parquet"))
    assert len(episodes) == n_planned
    # same stages, one complete file per planned episode, same episode content, shards and eval results
    cmp = res["compare"]
    assert cmp["same_structure"] and cmp["same_content"], cmp
    assert res["leftover_processes"] == 0
