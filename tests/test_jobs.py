"""`ray job submit` end to end: a real local head on 127.0.0.1, a tiny job from jobs/, SUCCEEDED, outputs checked.

The head runs as ``ray start --head --block`` in its own process group, and the test stops exactly that group
(``ray stop`` would stop every Ray on the machine, other users' included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}",  # the entrypoint's `python` must be the venv's
                "VIRTUAL_ENV": str(BIN.parent), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_TMPDIR": tmp, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"})
    env.pop("RAY_ADDRESS", None)
    return env


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # ray start --block tears its daemons down on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in our group
    proc.wait()


@pytest.fixture
def head():
    tmp = tempfile.mkdtemp(prefix="apo_rj_", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = _env(tmp)
    for _attempt in range(2):  # one retry: a head start times out now and then on a loaded 2-core box
        port, dash = _free_port(), _free_port()
        # every fixed default port gets a free one: other Ray instances on this machine hold the defaults
        extra = []
        for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                     "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
                     "--ray-client-server-port"):
            extra += [flag, str(_free_port())]
        log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
             "--temp-dir", tmp, "--disable-usage-stats", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if _wait_http(f"http://127.0.0.1:{dash}/api/version", proc, 120):
            break
        _stop(proc)
    else:
        pytest.fail("the local Ray head did not start: " + (Path(tmp) / "head.log").read_text()[-2000:])
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop(proc)


def _job(address: str, env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", args[0], "--address", address, *args[1:]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_job_submit_collect(head, tmp_path: Path) -> None:
    address, env = head
    out = tmp_path / "collect"
    runtime_env = {"env_vars": {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "RAY_AUTH_MODE": "disabled"}}
    for _ in range(20):  # the dashboard answers before its job agent is up: "No available agent ..."
        sub = _job(address, env, "submit", "--no-wait", "--submission-id", "apo-ray-test-collect", "--working-dir", ".",
                   "--runtime-env-json", json.dumps(runtime_env), "--", "python", "jobs/collect.py", "--task",
                   "lift", "--scenario", "nominal", "--policy", "oracle", "--episodes", "2", "--workers", "1",
                   "--seed", "0", "--out", str(out))
        if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
            break
        time.sleep(3)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    t0, status = time.monotonic(), None
    while time.monotonic() - t0 < 400:
        status = client.get_job_status("apo-ray-test-collect")
        if status.is_terminal():
            break
        time.sleep(2)
    logs = client.get_job_logs("apo-ray-test-collect")
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    files = sorted((out / "episodes").glob("*.parquet"))
    assert len(files) == 2, logs[-2000:]
    summary = json.loads((out / "collect.json").read_text())
    assert summary["episodes"] == 2 and summary["successes"] == 2  # the oracle solves Lift
    assert all(pq.read_table(f, columns=["success"]).column("success")[-1].as_py() for f in files)
