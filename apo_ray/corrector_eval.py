"""Corrector effect on a degraded policy: success with and without the corrector, one JSON line.

    python -m apo_ray.corrector_eval --task lift --policy noisy-oracle:0.05 --seeds 20

Uses the project's policy specs (``apo_ray.policies.make_policy``) on the camera-free env, and the default
``CorrectorConfig``. It lives in apo_ray, not envs, because it needs the policies (envs imports nothing from
apo_ray).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from envs.corrector import Corrector, CorrectorConfig
from envs.env import TaskEnv
from envs.oracle import make_oracle
from envs.oracle_eval import run_episode


def evaluate(task: str, policy_spec: str, seeds: list[int], scenario: str = "nominal") -> dict[str, Any]:
    from apo_ray.policies import make_policy

    env = TaskEnv(task, scenario, camera=False)
    policy = make_policy(policy_spec, task)

    def act(seed: int):
        policy.reset([seed])
        return lambda obs, oracle_action: np.asarray(policy.act([obs])[0], np.float32)

    out: dict[str, Any] = {"task": task, "scenario": env.scenario, "policy": policy_spec, "episodes": len(seeds)}
    try:
        for mode in ("alone", "corrected"):
            ok, interventions, c2, steps, reasons = 0, 0, 0, 0, {}
            for seed in seeds:
                corrector = Corrector(task, CorrectorConfig()) if mode == "corrected" else None
                r = run_episode(env, make_oracle(task), seed, act(seed), corrector)
                ok += r["success"]
                steps += r["steps"]
                c2 += sum(c == 2 for c in r["c"])
                if corrector is not None:
                    interventions += corrector.interventions
                    for _, kind, why in corrector.events:
                        if kind == "trigger":
                            reasons[why] = reasons.get(why, 0) + 1
            out[mode] = {"successes": ok, "success_rate": ok / len(seeds), "interventions": interventions,
                         "corrector_step_share": round(c2 / max(steps, 1), 3), "triggers": reasons}
    finally:
        env.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--policy", default="noisy-oracle:0.05")
    ap.add_argument("--scenario", default="nominal")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args(argv)
    print(json.dumps(evaluate(args.task, args.policy, list(range(args.seeds)), args.scenario)))


if __name__ == "__main__":
    main()
