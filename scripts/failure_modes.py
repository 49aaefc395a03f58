"""Where rollouts fail: replay each episode's saved sim states and sort failures by the furthest sub-goal reached.

    PYTHONPATH=. .venv/bin/python scripts/failure_modes.py EPISODE_DIR [EPISODE_DIR ...]
    PYTHONPATH=. .venv/bin/python scripts/failure_modes.py --keep-control VERSION COLLECT_DIR

EPISODE_DIR is an eval or collect stage dir (its ``episodes/*.parquet``). Per dir it prints the count of failed
episodes that never grasped the object, grasped but never lifted it 3 cm, or lifted it and still failed; success
by how close the object started to a bin wall (Can); and for collect dirs, per intervention, what the corrector
took over from. Replay only sets states, so it needs no camera and no policy.

``--keep-control VERSION`` asks what a corrector that never handed back would have done: for each failed
episode of a collect dir it restores the state of the first takeover and lets oracle revision VERSION act
alone to the horizon.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from apo_ray.rollout import EPISODES_DIR
from envs.env import TaskEnv
from envs.oracle import make_oracle

LIFT_M = 0.03
WALL_BUCKETS_CM = (0, 5, 7, 10)
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


def classify(path: Path, cache: dict) -> tuple[bool, str, list[str], float]:
    """(success, furthest sub-goal, what each intervention took over from, the object's starting distance to
    the nearest bin wall in m) of one episode file."""
    t = pq.read_table(path, columns=["task", "scenario", "seed", "state", "success", "c"])
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
        if start_z is None:
            start_z, wall = z, float(min(p["wall_clearance"]))
        g = bool(p["grasped"])
        up = g and z > start_z + LIFT_M
        if starts:
            takeovers.append("carrying" if up else "holding" if g else "empty hand")
        grasped, lifted = grasped or g, lifted or up
    reached = "lifted" if lifted else "grasped" if grasped else "never grasped"
    return bool(max(d["success"])), reached, takeovers, wall


def keep_control(name: str, version: int) -> None:
    cache: dict = {}
    wins = []
    for f in sorted((Path(name) / EPISODES_DIR).glob("*.parquet")):
        d = pq.read_table(f, columns=["task", "scenario", "seed", "state", "success", "c"]).to_pydict()
        if max(d["success"]) or 2 not in d["c"]:
            continue
        k = d["c"].index(2)
        env = _replayer(d["task"][0], d["scenario"][0], cache)
        env.reset(int(d["seed"][0]))  # scenario randomisation that is not in the state (model parameters)
        obs = {"privileged": _priv(env, d["state"][k])}
        env._t = k
        oracle = make_oracle(d["task"][0], version)
        ok = False
        for _ in range(k, env.horizon):
            obs, _, _, info = env.step(oracle.act(obs["privileged"]))
            if ok := info["success"]:
                break
        wins.append(ok)
        print(f"  seed {d['seed'][0]}: from the takeover at step {k}, oracle v{version} alone "
              f"{'succeeds' if ok else 'fails in ' + oracle.phase}")
    print(f"{name}: oracle v{version} keeping control from the first takeover finishes {sum(wins)}/{len(wins)} "
          "of the failed episodes")


def main(dirs: list[str]) -> None:
    cache: dict = {}
    for name in dirs:
        files = sorted((Path(name) / EPISODES_DIR).glob("*.parquet"))
        if not files:
            raise SystemExit(f"error: no episodes in {name}/{EPISODES_DIR}; pass an eval or collect stage dir")
        rows = [classify(f, cache) for f in files]
        fails = Counter(r for ok, r, _, _ in rows if not ok)
        takes = Counter(x for _, _, tk, _ in rows for x in tk)
        print(f"{name}: {sum(r[0] for r in rows)}/{len(rows)} succeeded; failures by furthest sub-goal: "
              + ", ".join(f"{k} {fails[k]}" for k in ("never grasped", "grasped", "lifted")))
        if np.isfinite(rows[0][3]):
            edges = [*WALL_BUCKETS_CM, np.inf]
            cells = []
            for lo, hi in zip(edges, edges[1:], strict=False):
                inside = [ok for ok, _, _, w in rows if lo <= 100 * w < hi]
                cells.append(f"{lo}-{hi if np.isfinite(hi) else ''} cm {sum(inside)}/{len(inside)}")
            print("  success by the object's start distance to a bin wall: " + ", ".join(cells))
        if takes:
            print("  interventions took over from: " + ", ".join(f"{k} {v}" for k, v in takes.most_common()))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "--keep-control":
        if len(sys.argv) != 4:
            raise SystemExit("usage: failure_modes.py --keep-control VERSION COLLECT_DIR")
        keep_control(sys.argv[3], int(sys.argv[2]))
    else:
        main(sys.argv[1:])
