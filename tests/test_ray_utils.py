"""Embedded Ray start-up: a node that misses Ray's fixed 30 s registration window is stopped and started again."""

from __future__ import annotations

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
