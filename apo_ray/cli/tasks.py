"""apo-ray tasks: the simulation tasks and disruption scenarios (read from the envs registries)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the tasks and disruption scenarios",
                       description="List tasks (robosuite env, instruction, default horizon) and scenarios. "
                                   "Scenarios compose with '+', e.g. position+texture.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def listing() -> dict:
    from envs import SCENARIOS, TASKS  # registries only: robosuite loads when an env is built

    return {
        "tasks": [{"name": t.name, "env": t.env_name, "instruction": t.instruction, "horizon": t.horizon}
                  for t in TASKS.values()],
        "scenarios": [{"name": s.name, "description": s.description} for s in SCENARIOS.values()],
    }


def run(args: argparse.Namespace) -> int:
    info = listing()
    if args.json:
        print(json.dumps(info))
        return 0
    print("TASKS (Panda, OSC_POSE, 20 Hz)")
    print(f"  {'name':<8} {'robosuite env':<18} {'horizon':>7}  instruction")
    for t in info["tasks"]:
        print(f"  {t['name']:<8} {t['env']:<18} {t['horizon']:>7}  {t['instruction']}")
    print("\nSCENARIOS (compose with '+', e.g. position+texture)")
    for s in info["scenarios"]:
        print(f"  {s['name']:<11} {s['description']}")
    return 0
