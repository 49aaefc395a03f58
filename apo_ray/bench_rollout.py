"""`apo-ray bench rollout`: collection throughput against the raw robosuite step rate, in one run.

Both sides use the same task, image size and cheap-render settings. The raw side steps the robosuite env
directly in this process with uniform random actions (camera observations on). The collection side is the
real ``collect`` path: Ray actors, policy + oracle per step, labels, atomic Parquet writes; a random policy
with no corrector keeps every episode at the same length so 1- and 2-worker runs do equal work per episode.

The VLA side deploys the default tiny VLA (untrained, so every episode runs to the horizon): greedy decoding
of its 7 action tokens (KV cache, 1 thread) per step, against the same raw env step time.
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


def vla_rates(task: str, image_size: int, episodes: int, horizon: int) -> dict[str, float]:
    """ms per action of the default tiny VLA (batch 1, 1 thread) and 1-actor collection steps/s with it."""
    from apo_ray import model as M
    from apo_ray.config import ModelConfig
    from apo_ray.vla_policy import VLAPolicy, ms_per_action

    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    with tempfile.TemporaryDirectory(prefix="apo-bench-vla-") as d:
        model, proc = M.build_model(ModelConfig(), stats, image_size, ["lift the red cube"], seed=0)
        ckpt = M.save_checkpoint(model, proc, f"{d}/ckpt")
        ms = ms_per_action(VLAPolicy(ckpt, threads=1), batch=1, repeats=50)
        s = collect(task, "nominal", str(ckpt), episodes, 1, 0, f"{d}/out", corrector=None, image_size=image_size,
                    horizon=horizon, progress=False, label="bench vla")
    return {"ms_per_action": round(ms, 2), "steps_per_s": s["env_steps_per_s"]}


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
    vla = vla_rates(task, image_size, episodes_per_worker, horizon)
    env_ms = 1000.0 / raw
    return {
        "task": task, "image_size": image_size, "horizon": horizon,
        "raw_steps_per_s": round(raw, 2),
        "collect_1w_steps_per_s": rates[1],
        "collect_2w_steps_per_s": rates[2],
        "ratio_1w_vs_raw": round(rates[1] / raw, 3),
        "ratio_2w_vs_1w": round(rates[2] / rates[1], 3),
        "vla_ms_per_action": vla["ms_per_action"],
        "env_ms_per_step": round(env_ms, 2),
        "vla_decode_share_of_step": round(vla["ms_per_action"] / (vla["ms_per_action"] + env_ms), 3),
        "collect_1w_vla_steps_per_s": vla["steps_per_s"],
        "ratio_1w_vla_vs_raw": round(vla["steps_per_s"] / raw, 3),
        "goals": {"ratio_1w_vs_raw": 0.85, "ratio_2w_vs_1w": 1.8},
    }


def bench_rollout(args: argparse.Namespace) -> dict[str, Any]:
    return measure(args.task, args.image_size, args.episodes_per_worker, args.horizon)
