"""Run the loop on a local Ray autoscaling cluster and record what Ray's autoscaler did.

``python -m apo_ray.bench.autoscale --config configs/smoke.yaml --root runs/autoscale`` (``make test-autoscale`` runs
it through tests/test_autoscaling.py):

1. starts a Ray head (``ray start --head --autoscaling-config``) with Ray's fake multi-node provider
   (``RAY_FAKE_CLUSTER=1``: each node it launches is a separate raylet on this machine) and min-0 ``rollout``
   (CPU + ``sim``) and ``trainer`` (CPU + ``trainer``) node types, the shape of cluster.yaml;
2. runs ``apo-ray loop`` as a driver on that head with ``RAY_ADDRESS`` set and no ``--address``, reading the
   node types from the autoscaler config (``APO_RAY_AUTOSCALER_CONFIG``) as it reads ``~/ray_bootstrap_config.yaml``
   under ``ray up``;
3. polls ``ray.nodes()`` for the node timeline (which node type came up or went, in which stage) and, during a
   collection, SIGKILLs the raylet of a rollout node that runs an episode (a lost spot node);
4. with ``--reference DIR`` (or ``--embedded``, which runs it first) compares the run with one on the
   embedded Ray: same stages, one file per episode, same episode content, dataset shards and eval results.

It writes ``ROOT/autoscale.json`` and prints it as its last line. The cluster is stopped by killing only its
own processes (those that name its temp dir): ``ray stop`` would stop every Ray on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEAD_TYPE = "ray.head.default"


@dataclass(frozen=True)
class FakeClusterSpec:
    """Node shapes small enough for a 2-core box: every fake node is a raylet (and its workers) on it."""
    head_cpus: int = 2
    """The driver, dataset builds and Ray Data's listing run on the head (as on cluster.yaml's 4-CPU head)."""
    rollout_cpus: int = 1
    rollout_sims: int = 1
    rollout_max: int = 3
    trainer_cpus: int = 2
    trainer_max: int = 1
    idle_timeout_minutes: float = 0.1
    object_store_mb: int = 256

    def autoscaler_config(self, gcs_address: str) -> dict[str, Any]:
        store = self.object_store_mb * 1024 * 1024
        return {
            "cluster_name": "apo-ray-fake",
            "max_workers": self.rollout_max + self.trainer_max,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": {
                HEAD_TYPE: {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0},
                "rollout": {"resources": {"CPU": self.rollout_cpus, "sim": self.rollout_sims,
                                          "object_store_memory": store},
                            "node_config": {}, "min_workers": 0, "max_workers": self.rollout_max},
                "trainer": {"resources": {"CPU": self.trainer_cpus, "trainer": 1, "object_store_memory": store},
                            "node_config": {}, "min_workers": 0, "max_workers": self.trainer_max},
            },
            "head_node_type": HEAD_TYPE,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_type(resources: dict[str, float]) -> str:
    if resources.get("sim", 0) > 0:
        return "rollout"
    return "trainer" if resources.get("trainer", 0) > 0 else "head"


@dataclass
class FakeCluster:
    """A Ray head with the fake multi-node autoscaler; ``stop`` kills only the processes of this cluster."""
    spec: FakeClusterSpec
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="apoas-", dir="/tmp")))
    address: str = ""
    config_path: Path = Path()

    def start(self, env: dict[str, str], tries: int = 3) -> None:
        from ray._private.services import get_node_ip_address

        # the monitor (autoscaler) inherits this environment, and so does every node it launches
        run_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        ray_bin = str(Path(sys.executable).parent / "ray")
        for attempt in range(1, tries + 1):
            port = _free_port()
            self.address = f"{get_node_ip_address()}:{port}"
            self.config_path = self.tmp / "autoscaler.yaml"
            self.config_path.write_text(json.dumps(self.spec.autoscaler_config(self.address)))
            cmd = [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={self.tmp / 'ray'}",
                   f"--num-cpus={self.spec.head_cpus}", f"--object-store-memory={self.spec.object_store_mb << 20}",
                   f"--autoscaling-config={self.config_path}", "--include-dashboard=true",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                   f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                   "--disable-usage-stats"]
            out = subprocess.run(cmd, env=run_env, capture_output=True, text=True)
            if out.returncode == 0:
                return
            # a loaded box can miss Ray's fixed 30 s registration window, or a free port got taken: start again
            self.stop(keep_dir=True)
            if attempt == tries:
                raise RuntimeError(f"ray start --head failed {tries} times: {out.stderr.strip()[-500:]}")
            time.sleep(5.0 * attempt)

    def processes(self) -> list[Any]:
        import psutil

        mark = str(self.tmp)
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(mark in a for a in p.info["cmdline"] or ()):
                    out.append(p)
        return out

    def raylet_of(self, node: dict[str, Any]) -> Any:
        """The raylet process of ``node`` (an entry of ``ray.nodes()``)."""
        for p in self.processes():
            with contextlib.suppress(Exception):
                cmd = p.cmdline()
                if Path(cmd[0]).name == "raylet" and f"--node_id={node['NodeID']}" in cmd:
                    return p
        return None

    def stop(self, keep_dir: bool = False) -> None:
        import psutil

        me = os.getpid()
        for _ in range(3):
            procs = [p for p in self.processes() if p.pid != me]
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(procs, timeout=10)
        if not keep_dir:
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Watch:
    """Polls the cluster beside the loop: node timeline, the stage in flight, and the one node kill."""
    cluster: FakeCluster
    run_dir: Path
    kill_in: str = "collect"
    t0: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)
    kill: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def stage(self) -> tuple[str | None, str | None]:
        try:
            p = json.loads((self.run_dir / "progress.json").read_text())
        except (OSError, ValueError):
            return None, None
        return p.get("stage"), p.get("kind")

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def run(self) -> None:
        import ray

        alive: dict[str, str] = {}
        last_stage = None
        while not self.stop.is_set():
            key, kind = self.stage()
            if key != last_stage:
                self.stages.append({"t": self.now(), "stage": key, "kind": kind})
                last_stage = key
            try:
                nodes = {n["NodeID"]: n for n in ray.nodes()}
            except Exception as e:  # noqa: BLE001 - a busy GCS; poll again
                self.errors.append(f"{self.now()}: ray.nodes: {e}"[:200])
                nodes = {}
            now_alive = {i: node_type(n.get("Resources", {})) for i, n in nodes.items() if n["Alive"]}
            for i, t in now_alive.items():
                if i not in alive:
                    self.events.append({"t": self.now(), "event": "up", "type": t, "node": i[-10:], "stage": key})
            for i, t in alive.items():
                if nodes and i not in now_alive:
                    self.events.append({"t": self.now(), "event": "down", "type": t, "node": i[-10:],
                                        "stage": key, "killed": self.kill.get("node") == i[-10:]})
            if nodes:
                alive = now_alive
            if kind == self.kill_in and not self.kill and "rollout" in alive.values():
                victim = self._victim(alive)
                if victim:
                    self._kill(nodes[victim], key)
            self.stop.wait(0.5)

    def _victim(self, alive: dict[str, str]) -> str | None:
        """A rollout node that runs an episode now, else one that holds a rollout actor of this stage."""
        from ray.util.state import list_actors, list_tasks

        try:
            running = list_tasks(address=self.cluster.address, filters=[("state", "=", "RUNNING")], detail=True,
                                 timeout=30)
            actors = list_actors(address=self.cluster.address, filters=[("state", "=", "ALIVE")], timeout=30)
        except Exception as e:  # noqa: BLE001 - the state API timed out on a busy box; try again
            self.errors.append(f"{self.now()}: state API: {e}"[:200])
            return None
        # task events reach the GCS in batches, so a short episode may never show as RUNNING: an actor on the node
        # in this stage is the fallback (its current or next episode is lost with the node)
        busy = [t.node_id for t in running if t.type == "ACTOR_TASK" and not any(
            w in (t.func_or_class_name or "") for w in ("__init__", "ping", "retarget"))]
        held = [a.node_id for a in actors]
        return next((i for i in [*busy, *held] if alive.get(i) == "rollout"), None)

    def _kill(self, node: dict[str, Any], key: str | None) -> None:
        raylet = self.cluster.raylet_of(node)
        if raylet is None:
            return
        from apo_ray.journal import WORK, work_name

        done = len(list((self.run_dir / WORK / work_name(key or "")).glob("episodes/*.parquet")))
        raylet.send_signal(signal.SIGKILL)
        self.kill = {"t": self.now(), "node": node["NodeID"][-10:], "stage": key, "episodes_done_before": done}


def autoscaler_log(cluster: FakeCluster) -> list[str]:
    """The autoscaler's own launch/terminate decisions, from its monitor log."""
    lines = []
    for f in sorted(cluster.tmp.glob("ray/session_2*/logs/monitor.log")):
        for line in f.read_text(errors="replace").splitlines():
            if any(w in line for w in ("Adding", "Removing", "Terminating", "Launching")):
                lines.append(line.strip()[:240])
    return lines


def _loop_cmd(config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "apo_ray", "loop", "--config", config, "--run-dir", str(run_dir), "--no-progress",
            *overrides]


def _base_env() -> dict[str, str]:
    from apo_ray.ray_utils import WORKER_ENV

    env = {**WORKER_ENV, **os.environ}
    for k in ("RAY_ADDRESS", "APO_RAY_AUTOSCALER_CONFIG"):
        env.pop(k, None)
    return env


def run_embedded(config: str, run_dir: Path, overrides: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(_loop_cmd(config, run_dir, overrides), env=_base_env(), check=True, capture_output=True)
    return round(time.monotonic() - t0, 1)


def run_autoscaled(config: str, root: Path, overrides: list[str], spec: FakeClusterSpec,
                   kill_in: str = "collect", timeout: float | None = None, log=print) -> dict[str, Any]:
    import ray

    run_dir = root / "autoscaled"
    cluster = FakeCluster(spec)
    env = _base_env()
    t_start = time.monotonic()
    cluster.start(env)
    try:
        log(f"fake autoscaling cluster at {cluster.address} (temp dir {cluster.tmp})")
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        watch = Watch(cluster, run_dir, kill_in=kill_in)
        thread = threading.Thread(target=watch.run, daemon=True)
        thread.start()
        loop_env = {**env, "RAY_ADDRESS": cluster.address, "APO_RAY_AUTOSCALER_CONFIG": str(cluster.config_path)}
        t0 = time.monotonic()
        with open(root / "autoscaled.log", "w") as out:
            try:
                rc = subprocess.run(_loop_cmd(config, run_dir, overrides), env=loop_env, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = round(time.monotonic() - t0, 1)
        time.sleep(3 * spec.idle_timeout_minutes * 60 + 5)  # the last eval's rollout nodes go idle, then away
        watch.stop.set()
        thread.join(timeout=30)
        events = autoscaler_log(cluster)
    finally:
        ray.shutdown()
        cluster.stop()
    return {"rc": rc, "loop_seconds": wall, "total_seconds": round(time.monotonic() - t_start, 1),
            "nodes": watch.events, "stages": watch.stages, "kill": watch.kill, "autoscaler_log": events,
            "watch_errors": watch.errors[-10:],
            "spec": spec.__dict__, "leftover_processes": len(cluster.processes())}


def compare(ref: Path, run: Path) -> dict[str, Any]:
    from apo_ray.bench.chaos import content, structure

    s_ref, s_run = structure(ref), structure(run)
    c_ref, c_run = content(ref), content(run)
    return {"same_structure": s_ref == s_run, "same_content": c_ref == c_run,
            "episodes": len(s_run["episodes"]), "differ": sorted(k for k in c_ref.keys() | c_run.keys()
                                                                if c_ref.get(k) != c_run.get(k))[:10]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m apo_ray.bench.autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--root", required=True, help="new dir for the run dirs and autoscale.json")
    ap.add_argument("--reference", help="an embedded-Ray run dir of the same config to compare with")
    ap.add_argument("--embedded", action="store_true", help="run the embedded reference first (ROOT/embedded)")
    ap.add_argument("--no-kill", action="store_true", help="do not kill a rollout node during a collection")
    ap.add_argument("--timeout", type=float, help="seconds the autoscaled loop may take (then it and the cluster "
                                                  "are stopped and autoscale.json says rc: timeout)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    ref = Path(args.reference) if args.reference else None
    if args.embedded and ref is None:
        ref = root / "embedded"
        result["embedded_seconds"] = run_embedded(args.config, ref, args.overrides)
    result.update(run_autoscaled(args.config, root, args.overrides, FakeClusterSpec(),
                                 kill_in="" if args.no_kill else "collect", timeout=args.timeout,
                                 log=lambda m: print(m, file=sys.stderr)))
    if ref is not None and result["rc"] == 0:
        result["compare"] = compare(ref, root / "autoscaled")
    (root / "autoscale.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if result["rc"] == 0 and result.get("compare", {}).get("same_content", True) else 1


if __name__ == "__main__":
    sys.exit(main())
