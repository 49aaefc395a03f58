"""Starting or joining Ray: an embedded start that misses Ray's fixed 30 s registration window is retried, and
RAY_ADDRESS joins a cluster as it does for any Ray program (--address wins over it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import subprocess, ray, psutil
    from apo_ray import ray_utils

    real_init, calls, leftover = ray.init, [], []

    def flaky_init(*a, **kw):  # the first start fails as an overloaded box makes it fail, leaving a process
        calls.append(1)
        if len(calls) == 1:
            leftover.append(subprocess.Popen(["sleep", "60"]))
            raise Exception("The current node timed out during startup. This could happen because ...")
        return real_init(*a, **kw)

    ray.init = flaky_init
    with ray_utils.ray_session(num_cpus=1):
        assert ray.get(ray.remote(lambda: 41).remote()) + 1 == 42
    assert len(calls) == 2, calls
    assert leftover[0].wait(timeout=10) != 0  # killed, not left to run beside the new node
    print("ok")
""")


@pytest.mark.ray
def test_embedded_start_retries_after_a_startup_timeout() -> None:
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# A real two-node-free cluster (ray.cluster_utils.Cluster: its own GCS and raylet, in this script's process, so its
# shutdown stops only it). `apo-ray collect` with RAY_ADDRESS and no --address runs its actors there; --address wins
# over a RAY_ADDRESS that points nowhere.
JOIN_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"sim": 1, "marker": 1},
                                                            "include_dashboard": True})
    try:
        out, cmd = tempfile.mkdtemp(), [sys.executable, "-m", "apo_ray", "collect", "--task", "lift",
                                        "--episodes", "1", "--workers", "1", "--horizon", "5"]
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        a = subprocess.run([*cmd, "--out", out + "/a"], env=env, capture_output=True, text=True, timeout=240)
        env["RAY_ADDRESS"] = "127.0.0.1:1"  # nothing listens there: only --address can make this run work
        b = subprocess.run([*cmd, "--out", out + "/b", "--address", cluster.address], env=env,
                           capture_output=True, text=True, timeout=240)
        ray.init(address=cluster.address, log_to_driver=False)
        workers = [x for x in list_actors(detail=True) if x.class_name == "RolloutWorker"]
        print(json.dumps({"rc": [a.returncode, b.returncode], "err": [a.stderr[-1500:], b.stderr[-1500:]],
                          "actors": len(workers), "nodes": len({x.node_id for x in workers}),
                          "episodes": [len(os.listdir(f"{out}/{k}/episodes")) for k in "ab"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


@pytest.mark.ray
def test_ray_address_joins_that_cluster_and_address_wins() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", JOIN_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == [0, 0], res["err"]
    # each run's one actor lived on this cluster (an embedded Ray would have held it instead)
    assert (res["actors"], res["nodes"], res["episodes"]) == (2, 1, [1, 1])


def test_a_job_server_address_is_refused(monkeypatch) -> None:
    from apo_ray.errors import UserError
    from apo_ray.ray_utils import join_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert join_address(None) == "10.0.0.5:6379" and join_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert join_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert join_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(UserError, match="is a job server"):
        join_address(None)
