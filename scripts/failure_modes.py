"""Where rollouts fail: replay each episode's saved sim states and sort failures by the furthest sub-goal reached.

    PYTHONPATH=. .venv/bin/python scripts/failure_modes.py EPISODE_DIR [EPISODE_DIR ...]

EPISODE_DIR is an eval or collect stage dir (its ``episodes/*.parquet``). Per dir it prints the count of failed
episodes that never grasped the object, grasped but never lifted it 3 cm, or lifted it and still failed; for
collect dirs it also prints, per intervention, what the corrector took over from. Replay only sets states, so it
needs no camera and no policy.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from apo_ray.rollout import EPISODES_DIR
from envs.env import TaskEnv

LIFT_M = 0.03
EVERY = 3  # replay every 3rd step: a grasp or lift lasts far longer


def _replayer(task: str, scenario: str, cache: dict) -> TaskEnv:
    if (task, scenario) not in cache:
        cache[(task, scenario)] = TaskEnv(task, scenario, camera=False)
    return cache[(task, scenario)]


def _priv(env: TaskEnv, state: np.ndarray) -> dict[str, np.ndarray]:
    sim = env.env.sim
    sim.set_state_from_flattened(np.asarray(state, np.float64))
    sim.forward()
    return env._obs(env.env._get_observations(force_update=True))["privileged"]


def classify(path: Path, cache: dict) -> tuple[bool, str, list[str]]:
    """(success, furthest sub-goal, what each intervention took over from) of one episode file."""
    t = pq.read_table(path, columns=["task", "scenario", "seed", "state", "success", "intervention_id", "c"])
    d = t.to_pydict()
    env = _replayer(d["task"][0], d["scenario"][0], cache)
    env.reset(int(d["seed"][0]))
    start_z = None
    grasped = lifted = False
    takeovers: list[str] = []
    prev_c = None
    for i, state in enumerate(d["state"]):
        starts = d["c"][i] == 2 and prev_c != 2
        prev_c = d["c"][i]
        if i % EVERY and not starts:
            continue
        p = _priv(env, state)
        z = float(p["object_pos"][2])
        start_z = z if start_z is None else start_z
        g = bool(p["grasped"])
        up = g and z > start_z + LIFT_M
        if starts:
            takeovers.append("carrying" if up else "holding" if g else "empty hand")
        grasped, lifted = grasped or g, lifted or up
    reached = "lifted" if lifted else "grasped" if grasped else "never grasped"
    return bool(max(d["success"])), reached, takeovers


def main(dirs: list[str]) -> None:
    cache: dict = {}
    for name in dirs:
        files = sorted((Path(name) / EPISODES_DIR).glob("*.parquet"))
        if not files:
            raise SystemExit(f"error: no episodes in {name}/{EPISODES_DIR}; pass an eval or collect stage dir")
        rows = [classify(f, cache) for f in files]
        fails = Counter(r for ok, r, _ in rows if not ok)
        takes = Counter(x for _, _, tk in rows for x in tk)
        print(f"{name}: {sum(ok for ok, _, _ in rows)}/{len(rows)} succeeded; failures by furthest sub-goal: "
              + ", ".join(f"{k} {fails[k]}" for k in ("never grasped", "grasped", "lifted")))
        if takes:
            print("  interventions took over from: " + ", ".join(f"{k} {v}" for k, v in takes.most_common()))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
