"""The stdout/stderr filter: Ray's two known harmless lines are dropped, everything else passes byte for byte,
including progress bars' carriage returns, from this process and from its children."""

from __future__ import annotations

import subprocess
import sys

NOISE_CHILD = (
    "import sys; sys.stderr.write("
    "'[2026-12-07 08:26:39,215 E 12128 12128] core_worker.cc:2465: Actor with class name: "
    "\\'MapWorker(MapBatches(_assemble)->MapBatches(RefLogp))\\' and ID: \\'307a\\' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
    "restart will fail.\\n'"
    "'kept: core_worker.cc said something else\\n'"
    "'(raylet) WARNING: 8 PYTHON worker processes have been started on node: 3f9 with address: 10.0.0.1. This could be "
    "a result of using a large number of actors.\\n'"
    "'bar 1\\rbar 2\\rbar 3\\n');"
    # the driver's listener prints raylet messages on stdout, with Ray's colour prefix
    "sys.stdout.write('{\"result\": 1}\\n\\x1b[33m(raylet)\\x1b[0m WARNING: 8 PYTHON worker processes have been "
    "started on node: 3f9 with address: 10.0.0.1.\\n' 'stdout kept\\n')"
)

DRIVER = f"""
import subprocess, sys
from apo_ray.quiet import drop_noise
with drop_noise():
    print("ours", file=sys.stderr)
    subprocess.run([sys.executable, "-c", {NOISE_CHILD!r}], check=True)
    print("tail without newline", file=sys.stderr, end="")
    print("ours too")
print(" / after", file=sys.stderr)
print("after")
"""


def test_known_ray_noise_is_dropped_and_the_rest_passes_unchanged() -> None:
    r = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, check=True)
    assert r.stderr == (b"ours\nkept: core_worker.cc said something else\nbar 1\rbar 2\rbar 3\n"
                        b"tail without newline / after\n"), r.stderr
    assert r.stdout == b'{"result": 1}\nstdout kept\nours too\nafter\n', r.stdout


def test_debug_turns_the_filter_off() -> None:
    import os

    r = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, check=True,
                       env={**os.environ, "APO_RAY_DEBUG": "1"})
    assert b"constructor arguments in the object store" in r.stderr and b"PYTHON worker processes" in r.stderr
    assert b"PYTHON worker processes" in r.stdout
