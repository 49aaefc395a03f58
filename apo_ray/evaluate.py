"""Evaluation: the policy acts alone (no corrector) on a fixed seed list. The only eval path: the
loop, ``apo-ray eval`` and the benches all come through ``evaluate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from apo_ray.config import InferenceConfig
from apo_ray.fsio import write_json
from apo_ray.rollout import collect
from apo_ray.stats import wilson_interval


def eval_seeds(seed: int, episodes: int) -> list[int]:
    return [seed + i for i in range(episodes)]


def evaluate(policy: str, task: str, scenario: str, episodes: int, workers: int, seed: int,
             out_dir: str | os.PathLike[str], *, videos: int = 0, image_size: int = 64, horizon: int = 0,
             address: str | None = None, resume: bool = False, progress: bool = True,
             round_: int = 0, wrist: bool = False, oracle_version: int | None = None,
             gpus: float = 0.0, envs_per_worker: int = 1, inference: InferenceConfig | None = None) -> dict[str, Any]:
    """Roll ``policy`` out without a corrector and score it (the oracle only labels ``oracle_action``).
    Writes ``out_dir/eval.json``."""
    seeds = eval_seeds(seed, episodes)
    summary = collect(task, scenario, policy, episodes, workers, seed, out_dir, round_=round_, corrector=None,
                      image_size=image_size, horizon=horizon, videos=videos, address=address, seeds=seeds,
                      resume=resume, progress=progress, label=f"eval {scenario}", wrist=wrist,
                      oracle_version=oracle_version, gpus=gpus, envs_per_worker=envs_per_worker, inference=inference)
    lo, hi = wilson_interval(summary["successes"], summary["episodes"])
    result = {
        "success_rate": summary["success_rate"],
        "ci95": [round(lo, 4), round(hi, 4)],
        "episodes": summary["episodes"],
        "successes": summary["successes"],
        "mean_length": summary["mean_length"],
        "mean_success_length": summary["mean_success_length"],
        "stalled_failures": summary["stalled_failures"],  # failures that froze (rollout.stalled)
        "task": task, "scenario": scenario, "policy": policy, "seeds": [seeds[0], seeds[-1]],
        "env_steps_per_s": summary["env_steps_per_s"],
        "policy_device": summary["policy_device"],
    }
    write_json(Path(out_dir) / "eval.json", result)
    return result
