"""`apo-ray bench rollout`: collection throughput against the raw robosuite step rate, in one run.

Both sides use the same task, image size and cheap-render settings. The raw side steps the robosuite env
directly in this process with uniform random actions (camera observations on). The collection side is the
real ``collect`` path: Ray actors, policy + oracle per step, labels, atomic Parquet writes; a random policy
with no corrector keeps every episode at the same length so 1- and 2-worker runs do equal work per episode.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np

from apo_ray.rollout import collect


def raw_step_rate(task: str, image_size: int, steps: int, horizon: int) -> float:
    import envs

    te = envs.TaskEnv(task, "nominal", image_size=image_size, camera=True, cheap_render=True)
    env = te.env
    rng = np.random.default_rng(0)
    np.random.seed(0)
    env.reset()
    env.step(rng.uniform(-1, 1, 7))  # first render / numba JIT outside the timing
    t0 = time.perf_counter()
    for i in range(steps):
        env.step(rng.uniform(-1, 1, 7))
        if (i + 1) % horizon == 0:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    te.close()
    return rate


def measure(task: str = "lift", image_size: int = 64, episodes_per_worker: int = 4,
            horizon: int = 100) -> dict[str, Any]:
    raw = raw_step_rate(task, image_size, episodes_per_worker * horizon, horizon)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="apo-bench-") as d:
            s = collect(task, "nominal", "random", episodes_per_worker * workers, workers, 0, f"{d}/out",
                        corrector=None, image_size=image_size, horizon=horizon, progress=False,
                        label=f"bench {workers}w")
            rates[workers] = s["env_steps_per_s"]
    return {
        "task": task, "image_size": image_size, "horizon": horizon,
        "raw_steps_per_s": round(raw, 2),
        "collect_1w_steps_per_s": rates[1],
        "collect_2w_steps_per_s": rates[2],
        "ratio_1w_vs_raw": round(rates[1] / raw, 3),
        "ratio_2w_vs_1w": round(rates[2] / rates[1], 3),
        "goals": {"ratio_1w_vs_raw": 0.85, "ratio_2w_vs_1w": 1.8},
    }


def bench_rollout(args: argparse.Namespace) -> dict[str, Any]:
    return measure(args.task, args.image_size, args.episodes_per_worker, args.horizon)
