"""Evaluation: the policy acts alone (no corrector) on a fixed seed list. The only eval path: the
loop, ``apo-ray eval`` and the benches all come through ``evaluate``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apo_ray.fsio import write_json
from apo_ray.rollout import RolloutSpec, RunOptions, collect
from apo_ray.stats import wilson_interval


def eval_seeds(seed: int, episodes: int) -> list[int]:
    return [seed + i for i in range(episodes)]


def evaluate(spec: RolloutSpec, seeds: Sequence[int], run: RunOptions = RunOptions(), *,
             resume: bool = False) -> dict[str, Any]:
    """Roll ``spec.policy`` out without a corrector, once per seed, and score it (the oracle only labels
    ``oracle_action``). Writes ``spec.out_dir/eval.json``."""
    seeds = list(seeds)
    spec = dataclasses.replace(spec, corrector=None)
    run = run if run.label != RunOptions.label else dataclasses.replace(run, label=f"eval {spec.scenario}")
    summary = collect(spec, seeds, run, resume=resume)
    lo, hi = wilson_interval(summary["successes"], summary["episodes"])
    result = {
        "success_rate": summary["success_rate"],
        "ci95": [round(lo, 4), round(hi, 4)],
        "episodes": summary["episodes"],
        "successes": summary["successes"],
        "mean_length": summary["mean_length"],
        "mean_success_length": summary["mean_success_length"],
        "stalled_failures": summary["stalled_failures"],  # failures that froze (rollout.stalled)
        "task": spec.task, "scenario": spec.scenario, "policy": spec.policy, "seeds": [seeds[0], seeds[-1]],
        "env_steps_per_s": summary["env_steps_per_s"],
        "policy_device": summary["policy_device"],
    }
    write_json(Path(spec.out_dir) / "eval.json", result)
    return result
