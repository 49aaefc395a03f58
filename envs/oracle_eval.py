"""Oracle success rate on a task and scenario, without a camera (fast), printed as one JSON line.

    python -m envs.oracle_eval --task lift --scenario nominal --seeds 100 [--first-seed 0]
    python -m envs.oracle_eval --table results.jsonl     # markdown table from collected JSON lines
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from envs.corrector import Corrector
from envs.env import TaskEnv
from envs.oracle import VERSION as ORACLE_VERSION
from envs.oracle import VERSIONS, make_oracle


def run_episode(env: TaskEnv, oracle: Any, seed: int, policy: Callable[[dict, np.ndarray], np.ndarray] | None = None,
                corrector: Corrector | None = None) -> dict[str, Any]:
    """One episode; the oracle acts alone unless ``policy(obs, oracle_action)`` is given (then the corrector,
    if any, decides who acts). Returns success, steps, the final phase and the per-step c labels."""
    obs = env.reset(seed)
    oracle.reset()
    if corrector is not None:
        corrector.reset(seed)
    cs: list[int] = []
    info = {"success": False}
    for _ in range(env.horizon):
        oracle_action = oracle.act(obs["privileged"])
        action, c = oracle_action, 1
        if policy is not None:
            action = policy(obs, oracle_action)
            if corrector is not None:
                action, c, _ = corrector.decide(action, oracle_action, obs["privileged"], oracle)
        cs.append(c)
        obs, _, done, info = env.step(action)
        if done:
            break
    return {"seed": seed, "success": bool(info["success"]), "steps": len(cs), "phase": oracle.phase, "c": cs,
            "interventions": corrector.interventions if corrector is not None else 0}


def evaluate(task: str, scenario: str, seeds: list[int], version: int = ORACLE_VERSION) -> dict[str, Any]:
    env = TaskEnv(task, scenario, camera=False)
    oracle = make_oracle(task, version)
    start = time.perf_counter()
    try:
        results = [run_episode(env, oracle, s) for s in seeds]
    finally:
        env.close()
    ok = [r for r in results if r["success"]]
    return {
        "task": task, "scenario": env.scenario, "oracle_version": version, "episodes": len(results), "successes": len(ok),
        "success_rate": len(ok) / max(len(results), 1),
        "mean_steps_success": sum(r["steps"] for r in ok) / max(len(ok), 1),
        "mean_steps": sum(r["steps"] for r in results) / max(len(results), 1),
        "failed_seeds": [r["seed"] for r in results if not r["success"]],
        "failed_phases": dict(Counter(r["phase"] for r in results if not r["success"])),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Scenarios as rows, tasks as columns: successes/episodes (rate)."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    cell = {(r["task"], r["scenario"]): f"{r['successes']}/{r['episodes']} ({r['success_rate']:.0%})" for r in rows}
    lines = ["| scenario | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(cell.get((t, s), "-") for t in tasks) + " |" for s in scenarios]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", help="print a markdown table from a file of this tool's JSON lines")
    ap.add_argument("--task")
    ap.add_argument("--scenario", default="nominal")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--oracle-version", type=int, choices=VERSIONS, default=ORACLE_VERSION,
                    help="oracle revision (envs/oracle.py VERSION)")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_table([json.loads(line) for line in f if line.startswith("{")]))
        return
    if not args.task:
        ap.error("--task is required")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(json.dumps(evaluate(args.task, args.scenario, seeds, args.oracle_version)))


if __name__ == "__main__":
    main()
