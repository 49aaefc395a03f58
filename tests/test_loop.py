"""The lifelong loop: plan, config checks, and a real end-to-end run killed with SIGKILL and resumed.

The end-to-end test runs configs/smoke.yaml cut to one round (``loop.rounds=1``) twice: once uninterrupted, once
SIGKILLed (the loop and its embedded Ray, like a preempted node) at a random stage and resumed with the same
command. The resumed run must hold the same stages, episodes, datasets and evaluation results.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apo_ray import config
from apo_ray.errors import UserError
from apo_ray.loop import check_config, plan, prepare_run_dir
from apo_ray.storage import RunStorage

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
APO_RAY = [sys.executable, "-m", "apo_ray"]
E2E_OVERRIDES = ["loop.rounds=1"]


def test_plan_shares_round1_and_accumulates() -> None:
    cfg = config.load(SMOKE, ["loop.arms=[apo, dagger]", "loop.share_round1=true", "loop.rounds=2"])
    keys = [s.key for s in plan(cfg)]
    assert keys[:3] == ["r0/demos/collect/nominal", "r0/base/dataset", "r0/base/train"]
    assert keys.count("r1/shared/collect/position") == 1 and keys.count("r1/shared/dataset") == 1
    assert "r1/apo/collect/position" not in keys and "r2/apo/collect/position" in keys
    assert {"r1/apo/train", "r1/dagger/train", "r2/dagger/eval/nominal", "r2/dagger/eval/position"} <= set(keys)
    assert len(keys) == len(set(keys))
    assert keys.index("r1/shared/dataset") < keys.index("r1/apo/train") < keys.index("r2/apo/collect/position")
    unshared = [s.key for s in plan(config.load(SMOKE, ["loop.arms=[apo, dagger]", "loop.rounds=1"]))]
    assert "r1/dagger/collect/position" in unshared and "r1/shared/dataset" not in unshared


@pytest.mark.parametrize("override, match", [
    (["loop.arms=[apo, bogus]"], "unknown arm 'bogus'"),
    (["loop.arms=[apo, apo]"], "distinct"),
    (["loop.scenarios=[nowhere]"], "nowhere"),
    (["eval.seed=10"], "overlap"),
    (["loop.rollouts_per_round=0"], "rollouts_per_round"),
])
def test_bad_loop_configs_are_user_errors(override: list[str], match: str) -> None:
    with pytest.raises(UserError, match=match):
        check_config(config.load(SMOKE, override))


def test_run_dir_refuses_a_different_config(tmp_path: Path) -> None:
    st = RunStorage(tmp_path / "run")
    prepare_run_dir(config.load(SMOKE), st, resume=False)
    prepare_run_dir(config.load(SMOKE, ["loop.rounds=3"]), st, resume=True)  # more rounds: allowed
    with pytest.raises(UserError, match="train.lr"):
        prepare_run_dir(config.load(SMOKE, ["loop.rounds=3", "train.lr=0.5"]), st, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run_dir(config.load(SMOKE), RunStorage(tmp_path / "empty"), resume=True)


# ------------------------------------------------------------------------------------------ end to end


def _env() -> dict[str, str]:
    return {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "APO_RAY_DEBUG": "1"}


def _cmd(run_dir: Path) -> list[str]:
    return [*APO_RAY, "loop", "--config", str(SMOKE), "--run-dir", str(run_dir), "--no-progress", *E2E_OVERRIDES]


def _structure(run_dir: Path) -> dict:
    """What a kill must never change: the stages, and exactly one complete file per planned episode.

    Episode *contents* are compared separately: they are equal only if the simulator is deterministic per seed.
    """
    j = json.loads((run_dir / "journal.json").read_text())
    episodes: dict[str, int] = {}
    for f in sorted(run_dir.rglob("episodes/*.parquet")):
        assert ".work" not in f.parts and not f.name.startswith(".tmp-")
        t = pq.read_table(f, columns=["episode_id", "t"])
        ids = set(t.column("episode_id").to_pylist())
        assert ids == {f.stem}, f"{f}: holds steps of {ids}"
        assert t.column("t").to_pylist() == list(range(t.num_rows)), f"{f}: steps missing or repeated"
        episodes[str(f.relative_to(run_dir))] = t.num_rows
    datasets = {}
    for key in j["order"]:
        if key.endswith("/dataset"):
            m = json.loads((run_dir / key / "manifest.json").read_text())
            datasets[key] = sorted(str(Path(i["path"]).relative_to(run_dir.resolve())) for i in m["inputs"])
    evals = {k: j["stages"][k]["result"]["episodes"] for k in j["order"] if "/eval/" in k}
    return {"order": j["order"], "episodes": sorted(episodes), "dataset_inputs": datasets, "eval_episodes": evals}


def _content(run_dir: Path) -> dict:
    j = json.loads((run_dir / "journal.json").read_text())
    out = {}
    for f in sorted(run_dir.rglob("episodes/*.parquet")):
        t = pq.read_table(f, columns=["action", "c", "success"])
        out[str(f.relative_to(run_dir))] = (t.column("action").to_pylist(), t.column("c").to_pylist())
    out["eval"] = {k: j["stages"][k]["result"]["success_rate"] for k in j["order"] if "/eval/" in k}
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_loop_end_to_end_killed_and_resumed(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    done = subprocess.run(_cmd(ref), env=_env(), capture_output=True, text=True, timeout=1500)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"report: {ref / 'report' / 'report.html'}"
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    cfg = config.load(SMOKE, E2E_OVERRIDES)
    assert summary["ran"] == summary["stages"] == len(plan(cfg))
    report = (ref / "report" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4 and "data:video/mp4;base64," in report
    fp_ref = _structure(ref)
    j_ref = json.loads((ref / "journal.json").read_text())["stages"]
    # every eval holds eval.episodes episodes; deployment the configured rollouts, with corrector takeovers
    assert set(fp_ref["eval_episodes"].values()) == {cfg.eval.episodes}
    deploy = j_ref["r1/apo/collect/position"]["result"]
    assert deploy["episodes"] == cfg.loop.rollouts_per_round and deploy["intervention_steps"] > 0
    assert len(fp_ref["episodes"]) == cfg.loop.demos + cfg.loop.rollouts_per_round + 4 * cfg.eval.episodes
    assert len(fp_ref["dataset_inputs"]["r1/apo/dataset"]) == cfg.loop.demos + cfg.loop.rollouts_per_round
    status = subprocess.run([*APO_RAY, "status", "--run-dir", str(ref), "--json"], capture_output=True, text=True,
                            env=_env(), check=True)
    st = json.loads(status.stdout)
    assert st["state"] == "finished" and st["stages_done"] == st["stages_total"]

    # Kill at a random stage (seeded): wait until that many stages are journaled, then a random extra delay.
    rng = random.Random(int(os.environ.get("APO_RAY_KILL_SEED", "0")))
    target = rng.randrange(0, len(fp_ref["order"]) - 1)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline and proc.poll() is None:
        j = run / "journal.json"
        if j.exists() and len(json.loads(j.read_text())["order"]) >= target:
            break
        time.sleep(0.5)
    time.sleep(rng.uniform(0.5, 6.0))
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)  # the loop and its embedded Ray, like a preempted node
    proc.wait()
    assert killed, "the run finished before the kill; nothing was tested"
    resumed = subprocess.run(_cmd(run), env=_env(), capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout or target == 0
    fp_run = _structure(run)
    assert fp_run["order"] == fp_ref["order"]
    assert fp_run["episodes"] == fp_ref["episodes"]  # none lost, none duplicated, none half-written
    assert fp_run == fp_ref
    assert not (run / ".work").exists() or not list((run / ".work").iterdir())
    same = _content(run) == _content(ref)
    print(f"\nsmoke loop (rounds=1) wall {wall:.0f} s; killed after {target} stages; "
          f"episode contents {'identical' if same else 'differ (the simulator is not deterministic per seed)'}")


def test_run_dir_on_a_uri_resumes_on_a_fresh_node(tmp_path: Path) -> None:
    """With a URI run dir the config and journal live in the bucket; a new node's empty cache resumes from it."""
    from apo_ray.journal import Journal, run_stage

    uri = (tmp_path / "bucket" / "run").as_uri()
    node1 = RunStorage(uri, local_dir=tmp_path / "node1")
    cfg = prepare_run_dir(config.load(SMOKE), node1, resume=False)
    run_stage(Journal(node1.local), "r0/demos/collect/nominal", lambda w: {"episodes": 0},
              on_done=lambda k: (node1.push(k), node1.push("journal.json")))
    node2 = RunStorage(uri, local_dir=tmp_path / "node2")
    assert prepare_run_dir(cfg, node2, resume=True) == cfg
    assert Journal(node2.local).done("r0/demos/collect/nominal")
