"""`apo-ray bench rollout`: collection throughput against the raw robosuite step rate, in one run.

Both sides use the same task, image size and cheap-render settings. The raw side steps the robosuite env
directly in this process with uniform random actions (camera observations on). The collection side is the
real ``collect`` path: Ray actors, policy + oracle per step, labels, atomic Parquet writes; a random policy
with no corrector keeps every episode at the same length so 1- and 2-worker runs do equal work per episode.

The VLA side deploys the default tiny VLA (untrained, so every episode runs to the horizon): greedy decoding
of its 7 action tokens (KV cache, 1 thread) per step, against the same raw env step time. With the default
env runners (``collect.workers``, ``collect.envs_per_worker``) it is collected twice on the same seeds: through
the batched inference service (apo_ray.inference) and with a policy copy per actor (the path before it);
``vla_collect_vs_raw`` divides the service's rate by that of as many plain env processes stepping at once.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np

from apo_ray.rollout import RolloutSpec, RunOptions, collect


def raw_step_rate(task: str, image_size: int, steps: int, horizon: int, barrier: Any = None) -> float:
    """Plain robosuite steps per second; with a barrier, the timing starts when every process is ready."""
    import envs

    te = envs.TaskEnv(task, "nominal", image_size=image_size, camera=True, cheap_render=True)
    env = te.env
    rng = np.random.default_rng(0)
    np.random.seed(0)
    env.reset()
    env.step(rng.uniform(-1, 1, 7))  # first render / numba JIT outside the timing
    if barrier is not None:
        barrier.wait()  # every process steps at once, as the env runners do
    t0 = time.perf_counter()
    for i in range(steps):
        env.step(rng.uniform(-1, 1, 7))
        if (i + 1) % horizon == 0:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    te.close()
    return rate


def _raw_worker(task: str, image_size: int, steps: int, horizon: int, barrier: Any, out: Any) -> None:
    out.put(raw_step_rate(task, image_size, steps, horizon, barrier))


def raw_parallel_rate(processes: int, task: str, image_size: int, steps: int, horizon: int) -> float:
    """Env steps/s of ``processes`` plain env processes stepping at the same time (their rates summed)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_raw_worker, args=(task, image_size, steps, horizon, barrier, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def vla_rates(task: str, image_size: int, episodes: int, horizon: int) -> dict[str, float]:
    """ms per action of the default tiny VLA (batch 1, 1 thread), 1-actor collection steps/s with its own copy,
    and collection steps/s of the default env runners through the inference service and with a copy each."""
    from apo_ray import model as M
    from apo_ray.config import CollectConfig, InferenceConfig, ModelConfig
    from apo_ray.vla_policy import VLAPolicy, ms_per_action

    cc = CollectConfig()
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}

    def spec(out: str) -> RolloutSpec:
        return RolloutSpec(task, "nominal", ckpt, out, image_size=image_size, horizon=horizon)

    off = InferenceConfig(enabled=False)
    with tempfile.TemporaryDirectory(prefix="apo-bench-vla-") as d:
        model, proc = M.build_model(ModelConfig(), stats, image_size, ["lift the red cube"], seed=0)
        ckpt = str(M.save_checkpoint(model, proc, f"{d}/ckpt"))
        ms = ms_per_action(VLAPolicy(ckpt, threads=1), batch=1, repeats=50)
        one = collect(spec(f"{d}/one"), range(episodes), RunOptions(workers=1, inference=off, progress=False))
        n = episodes * cc.workers
        per_actor = collect(spec(f"{d}/per_actor"), range(n),
                            RunOptions(workers=cc.workers, inference=off, progress=False))
        served = collect(spec(f"{d}/served"), range(n),
                         RunOptions(workers=cc.workers, envs_per_worker=cc.envs_per_worker,
                                    inference=InferenceConfig(), progress=False))
    return {"ms_per_action": round(ms, 2), "steps_per_s": one["env_steps_per_s"], "workers": cc.workers,
            "envs_per_worker": cc.envs_per_worker, "per_actor": per_actor["env_steps_per_s"],
            "served": served["env_steps_per_s"], "mean_rows": served["inference"]["mean_rows"]}


def measure(task: str = "lift", image_size: int = 64, episodes_per_worker: int = 4,
            horizon: int = 100) -> dict[str, Any]:
    raw = raw_step_rate(task, image_size, episodes_per_worker * horizon, horizon)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="apo-bench-") as d:
            s = collect(RolloutSpec(task, "nominal", "random", f"{d}/out", image_size=image_size, horizon=horizon),
                        range(episodes_per_worker * workers), RunOptions(workers=workers, progress=False))
            rates[workers] = s["env_steps_per_s"]
    vla = vla_rates(task, image_size, episodes_per_worker, horizon)
    raw_n = raw_parallel_rate(vla["workers"], task, image_size, episodes_per_worker * horizon, horizon)
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
        "vla_workers": vla["workers"], "vla_envs_per_worker": vla["envs_per_worker"],
        f"raw_{vla['workers']}proc_steps_per_s": round(raw_n, 2),
        "vla_per_actor_steps_per_s": vla["per_actor"],
        "vla_service_steps_per_s": vla["served"],
        "vla_service_mean_rows_per_decode": vla["mean_rows"],
        "vla_collect_vs_raw": round(vla["served"] / raw_n, 3),
        "vla_batched_vs_per_actor": round(vla["served"] / vla["per_actor"], 3),
        "goals": {"ratio_1w_vs_raw": 0.85, "ratio_2w_vs_1w": 1.8, "vla_collect_vs_raw": 0.8},
    }


def bench_rollout(args: argparse.Namespace) -> dict[str, Any]:
    return measure(args.task, args.image_size, args.episodes_per_worker, args.horizon)
