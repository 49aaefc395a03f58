"""The lifelong loop: plan, config checks, and a real end-to-end run killed with SIGKILL and resumed.

The end-to-end test runs configs/smoke.yaml cut to one round (``loop.rounds=1``) twice: once uninterrupted, once
SIGKILLed (the loop and its embedded Ray, like a preempted node) three times by apo_ray.bench.chaos and resumed with
the same command each time. The resumed run must hold the same stages, episodes, datasets and evaluation results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apo_ray import config
from apo_ray.errors import UserError
from apo_ray.loop import check_config, plan, prepare_run_dir
from apo_ray.storage import RunStorage

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
APO_RAY = [sys.executable, "-m", "apo_ray"]
E2E_OVERRIDES = ["loop.rounds=1"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "docs" / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_plans(path: Path, monkeypatch) -> None:
    """A config the README, a study or a script names must load, pass the loop's checks and plan round 0 first."""
    monkeypatch.chdir(ROOT)  # a loop.base_policy is relative to the repository root, where make runs
    cfg = config.load(path)
    check_config(cfg)
    keys = [s.key for s in plan(cfg)]
    r0 = ["r0/demos/collect/nominal", *([] if cfg.loop.base_policy else ["r0/base/dataset"]), "r0/base/train"]
    assert keys[:len(r0)] == r0 and len(keys) == len(set(keys))


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
    (["loop.demo_policy=random"], "not an expert"),
    (["loop.demo_policy=dart-oracle:0.3"], "demo_label"),
    (["loop.demo_policy=dart-oracle:3", "data.demo_label=oracle"], "bad policy spec"),
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
    prepare_run_dir(config.load(SMOKE, ["loop.arms=[apo,dagger]"]), st, resume=True)  # an arm added: allowed
    with pytest.raises(UserError, match="loop.arms"):  # an arm dropped: its finished stages would be orphaned
        prepare_run_dir(config.load(SMOKE, ["loop.arms=[dagger]"]), st, resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run_dir(config.load(SMOKE), RunStorage(tmp_path / "empty"), resume=True)
    # a run saved before a key existed resumes while that key keeps its default, and not with another value
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["data"]["demo_label"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    prepare_run_dir(config.load(SMOKE, ["loop.arms=[apo,dagger]"]), st, resume=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="data.demo_label"):
        prepare_run_dir(config.load(SMOKE, ["loop.arms=[apo,dagger]", "data.demo_label=oracle"]), st, resume=True)
    # ... except a key whose absence meant something else: runs before the off_target trigger ran without it
    del saved["corrector"]["off_target_steps"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"'corrector.off_target_steps' differs \(0 there, 3 now\)"):
        prepare_run_dir(config.load(SMOKE, ["loop.arms=[apo,dagger]"]), st, resume=True)
    prepare_run_dir(config.load(SMOKE, ["loop.arms=[apo,dagger]", "corrector.off_target_steps=0"]), st, resume=True)
    # ... and runs before the oracle's revision 2 collected with revision 1
    del saved["collect"]["oracle_version"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    old = ["loop.arms=[apo,dagger]", "corrector.off_target_steps=0"]
    with pytest.raises(UserError, match=r"'collect.oracle_version' differs \(1 there, 2 now\)"):
        prepare_run_dir(config.load(SMOKE, old), st, resume=True)
    prepare_run_dir(config.load(SMOKE, [*old, "collect.oracle_version=1"]), st, resume=True)


def test_loop_log_is_timestamped_appended_and_names_where_a_run_stopped(tmp_path: Path, monkeypatch) -> None:
    import re

    from apo_ray import loop as L

    run = tmp_path / "run"
    echoed: list[str] = []

    def stops(self: L.Loop) -> dict:
        self.log("[r0/demos/collect/nominal] done in 1.0 s: 3 episodes")
        L.set_progress(self.run_dir, "r0/base/dataset", round=0, arm="base", kind="dataset")
        raise UserError("a bad episode", "x.parquet", "fix it")

    monkeypatch.setattr(L.Loop, "run", stops)
    with pytest.raises(UserError):
        L.run_loop(config.load(SMOKE), run, progress=False, log=echoed.append)
    monkeypatch.setattr(L.Loop, "run", lambda self: {"ran": 14, "seconds": 9.5, "report": "r.html"})
    L.run_loop(config.load(SMOKE), run, resume=True, progress=False, log=echoed.append)
    lines = (run / L.LOG_FILE).read_text().splitlines()
    assert echoed == ["[r0/demos/collect/nominal] done in 1.0 s: 3 episodes"]  # the file-only lines are not echoed
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", ln) for ln in lines), lines
    body = [ln.split(" ", 1)[1] for ln in lines]
    assert body[0].startswith("apo-ray loop (pid ") and body[1] == echoed[0]
    assert body[2] == "stopped in r0/base/dataset: UserError: error: a bad episode (x.parquet); fix: fix it"
    assert body[3].startswith("apo-ray loop (pid ") and body[4] == "finished: 14 stages run, 9.5 s; report r.html"


def test_chaos_kill_timing_follows_the_runs_pace(tmp_path: Path) -> None:
    """A kill point scales with how fast this run goes against the reference, and a kind is aimed at only while
    a stage of it is still ahead."""
    from apo_ray.bench.chaos import _ahead, _pace, _target

    ref = {"report": 2.0, "r0/demos/collect/nominal": 20.0, "r0/base/dataset": 10.0, "r0/base/train": 60.0}
    order = ["r0/demos/collect/nominal", "r0/base/dataset", "r0/base/train"]
    assert _pace(tmp_path, ref) == 1.0  # nothing finished yet
    stages = {"r0/demos/collect/nominal": {"seconds": 12.0}, "r0/base/dataset": {"seconds": 6.0}}
    (tmp_path / "journal.json").write_text(json.dumps({"order": list(stages), "stages": stages}))
    assert _pace(tmp_path, ref) == pytest.approx(18.0 / 30.0)
    assert _ahead(order, tmp_path) == {"train", "report"}
    assert _target("dataset", order, tmp_path) == "train" and _target("collect", order, tmp_path) == "train"
    stages["r0/base/dataset"]["seconds"] = 600.0  # clamped: one stalled stage does not push kills 20x later
    (tmp_path / "journal.json").write_text(json.dumps({"order": list(stages), "stages": stages}))
    assert _pace(tmp_path, ref) == 5.0


# ------------------------------------------------------------------------------------------ end to end


def _env() -> dict[str, str]:
    return {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "APO_RAY_DEBUG": "1"}


@pytest.mark.ray
def test_loop_end_to_end_killed_and_resumed(tmp_path: Path, monkeypatch) -> None:
    """The chaos driver (`make chaos` does 20 kills) with 3 kills: an uninterrupted run, then one SIGKILLed 3 times,
    aimed at a collection, a dataset build and a training stage, each resumed by the same command. The kill point
    scales with this run's pace against the reference, and a stage that ends first passes the aim to the next one
    of its kind; where each kill landed is printed, not asserted (on a busy box the last of a kind can end first)."""
    from apo_ray.bench.chaos import run_chaos, structure

    seed = int(os.environ.get("APO_RAY_KILL_SEED", "0"))
    monkeypatch.setenv("APO_RAY_DEBUG", "1")  # a failing stage shows its traceback
    res = run_chaos(str(SMOKE), tmp_path, kills=3, seed=seed, overrides=E2E_OVERRIDES, log=lambda *_: None)
    ref = tmp_path / "ref"
    report = (ref / "report" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4 and "data:video/mp4;base64," in report
    cfg = config.load(SMOKE, E2E_OVERRIDES)
    fp_ref = structure(ref)
    assert fp_ref["order"] == [s.key for s in plan(cfg)]
    j_ref = json.loads((ref / "journal.json").read_text())["stages"]
    # every eval holds eval.episodes episodes; deployment the configured rollouts, with corrector takeovers
    assert set(fp_ref["eval_episodes"].values()) == {cfg.eval.episodes}
    deploy = j_ref["r1/apo/collect/position"]["result"]
    assert deploy["episodes"] == cfg.loop.rollouts_per_round and deploy["intervention_steps"] > 0
    assert len(fp_ref["episodes"]) == cfg.loop.demos + cfg.loop.rollouts_per_round + 4 * cfg.eval.episodes
    assert len(fp_ref["dataset_inputs"]["r1/apo/dataset"]) == cfg.loop.demos + cfg.loop.rollouts_per_round
    # round 0 builds its BC set with the loop.base_* batch and filter, later rounds with data.*
    built = {k: json.loads((ref / k / "manifest.json").read_text())["config"] for k in ("r0/base/dataset",
                                                                                        "r1/apo/dataset")}
    assert (built["r0/base/dataset"]["batch_size"], built["r0/base/dataset"]["filters"]["idle_threshold"]) == (16, 0.0)
    assert (built["r1/apo/dataset"]["batch_size"], built["r1/apo/dataset"]["filters"]["idle_threshold"]) == (8, 0.05)
    # pi0 standardises its proprio token with the demos' statistics, and every later round keeps them
    pi0 = json.loads((ref / "r0/base/train/checkpoint/config.json").read_text())
    assert pi0["use_proprio"] and len(pi0["proprio_std"]) == 9 and pi0["proprio_std"] != [1.0] * 9
    assert json.loads((ref / "r1/apo/train/checkpoint/config.json").read_text())["proprio_mean"] == pi0["proprio_mean"]
    status = subprocess.run([*APO_RAY, "status", "--run-dir", str(ref), "--json"], capture_output=True, text=True,
                            env=_env(), check=True)
    st = json.loads(status.stdout)
    assert st["state"] == "finished" and st["stages_done"] == st["stages_total"]
    # every kill survived, and the resumed run equals the uninterrupted one
    assert res["kills_tried"] == 3 and res["kills_survived"] == 3, res
    print(f"\nkills landed in: {[k['in_flight'] for k in res['kills']]} ({res['kills_on_target']}/3 on target)")
    assert res["same_structure"] and res["same_content"], res
    run = tmp_path / "chaos"
    assert not (run / ".work").exists() or not list((run / ".work").iterdir())
    log = (run / "loop.log").read_text()  # one file across the kills: each resume appended to it
    assert log.count("apo-ray loop (pid ") >= 2 and "finished: " in log and "[r1/apo/train] done in" in log
    _fork_and_finish(ref, tmp_path / "fork")


def _fork_and_finish(ref: Path, fork: Path) -> None:
    """A variant with more steps per refinement: the fork shares the reference run's round 0 and round-1 data
    (hard-linked, journal entries unchanged) and the loop on it trains and evaluates only what changed."""
    overrides = [*E2E_OVERRIDES, "train.max_steps=6"]
    cmd = ["--config", str(SMOKE), "--run-dir", str(fork), *overrides]
    out = subprocess.run([*APO_RAY, "fork", "--from", str(ref), *cmd], capture_output=True, text=True,
                         env=_env(), check=True)
    assert out.stdout.strip().splitlines()[-1].endswith(" ".join(["apo-ray", "loop", *cmd]))
    kept = json.loads(out.stdout.splitlines()[0])["kept"]
    assert kept == ["r0/demos/collect/nominal", "r0/base/dataset", "r0/base/train", "r0/base/eval/position",
                    "r0/base/eval/nominal", "r1/apo/collect/position", "r1/apo/dataset"]
    ep = next((fork / "r1/apo/collect/position/episodes").iterdir())
    assert ep.stat().st_ino == (ref / ep.relative_to(fork)).stat().st_ino
    subprocess.run([*APO_RAY, "loop", "--no-progress", *cmd], capture_output=True, text=True, env=_env(), check=True)
    j_ref, j_fork = (json.loads((d / "journal.json").read_text())["stages"] for d in (ref, fork))
    assert list(j_fork) == list(j_ref)
    assert all(j_fork[k] == j_ref[k] for k in kept)  # adopted, not rerun
    assert (j_ref["r1/apo/train"]["result"]["step"], j_fork["r1/apo/train"]["result"]["step"]) == (5, 6)
    assert (fork / "report" / "report.html").is_file()


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


def _fork_kept(overrides: list[str], base: tuple[str, ...] = ("loop.arms=[apo,dagger]", "loop.share_round1=true")
               ) -> tuple[list[str], list[str]]:
    from apo_ray.fork import reusable_stages

    src = config.load(SMOKE, list(base))
    done = {s.key for s in plan(src)}
    new = config.load(SMOKE, [*base, *overrides])
    return reusable_stages(src, new, done), [s.key for s in plan(new)]


def test_fork_keeps_exactly_the_stages_the_new_config_would_reproduce() -> None:
    r0 = ["r0/demos/collect/nominal", "r0/base/dataset", "r0/base/train", "r0/base/eval/position",
          "r0/base/eval/nominal"]
    shared = ["r1/shared/collect/position", "r1/shared/dataset"]
    # more training per round: round 0 (its own loop.base_* budget) and the shared round-1 data stay
    kept, _ = _fork_kept(["train.max_steps=9"])
    assert kept == r0 + shared
    # an APO-only parameter: DAgger's whole line stays, APO's is retrained from round 1's training on
    kept, new_plan = _fork_kept(["train.bc_weight=1.0"])
    assert [k for k in kept if "/apo/" in k] == [] and [k for k in new_plan if "/dagger/" in k and k not in kept] == []
    assert kept[:7] == r0 + shared
    # dropping an arm keeps the other's stages; adding a round keeps every stage of the first two
    kept, new_plan = _fork_kept(["loop.arms=[dagger]", "loop.rounds=3"])
    assert kept == [k for k in new_plan if not k.startswith("r3/")]
    # the corrector shapes every deployment: only round 0 stays; a new base budget changes pi0: only its data
    assert _fork_kept(["corrector.deviation_threshold=0.5"])[0] == r0
    # another oracle revision makes other demos: nothing stays
    assert _fork_kept(["collect.oracle_version=1"])[0] == []
    assert _fork_kept(["loop.base_max_steps=30"])[0] == r0[:2]
    # how a stage runs (workers, videos) is not what it produces; a smaller evaluation is
    assert _fork_kept(["eval.workers=1", "collect.videos=0"])[0] == _fork_kept([])[0] == _fork_kept([])[1]
    assert not any("/eval/" in k for k in _fork_kept(["eval.episodes=3"])[0])
    # a stage not completed in the source, or one whose input is not kept, is run again
    from apo_ray.fork import reusable_stages

    cfg = config.load(SMOKE)
    assert reusable_stages(cfg, cfg, {"r0/demos/collect/nominal", "r0/base/train"}) == ["r0/demos/collect/nominal"]
