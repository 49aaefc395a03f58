"""The shipped pi0 (assets/pi0_lift) and ``loop.base_policy``: round 0 imports a given pi0 instead of training one.

The loop test runs configs/demo.yaml cut to round 0 with 2 demos and 2-episode evaluations: it proves the import
stage, not the policy's success (its measured success is in assets/pi0_lift/README.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from apo_ray import config
from apo_ray.errors import UserError
from apo_ray.fork import fork_run
from apo_ray.loop import plan, run_loop, stage_deps, stage_inputs

ROOT = Path(__file__).resolve().parents[1]
PI0 = ROOT / "assets" / "pi0_lift"
DEMO = ROOT / "configs" / "demo.yaml"
TINY_ROUND0 = ["loop.rounds=0", "loop.demos=2", "eval.episodes=2", "env.horizon=30", "collect.videos=0",
               "eval.videos=0"]


def test_shipped_pi0_is_small_and_inference_only() -> None:
    files = {p.name: p.stat().st_size for p in PI0.iterdir()}
    assert {"model.safetensors", "apo_vla.json", "config.json", "tokenizer.json"} <= set(files)
    assert sum(files.values()) < 10 * 2**20, files  # weights and metadata only: no optimizer or DeepSpeed state
    assert not any(p.is_dir() for p in PI0.iterdir())


def test_shipped_pi0_loads_and_acts() -> None:
    from apo_ray.vla_policy import VLAPolicy

    pol = VLAPolicy(PI0, threads=1)
    assert pol.meta.image_views == 2 and pol.meta.use_proprio  # the recipe: agentview + wrist, proprio token
    rng = np.random.default_rng(0)
    s = pol.meta.image_size
    obs = [{"image": rng.integers(0, 256, (s, 2 * s, 3), dtype=np.uint8),
            "proprio": rng.standard_normal(9).astype(np.float32)} for _ in range(2)]
    act = pol.act(obs)
    assert act.shape == (2, 7) and np.isfinite(act).all()
    assert np.abs(act).max() <= 1.0 + 1e-5  # bin centres inside robosuite's action box


def test_base_policy_plans_no_bc_and_its_content_is_its_identity(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = config.load(DEMO)
    keys = [s.key for s in plan(cfg)]
    assert keys[:2] == ["r0/demos/collect/nominal", "r0/base/train"] and "r0/base/dataset" not in keys
    base = next(s for s in plan(cfg) if s.key == "r0/base/train")
    assert stage_deps(cfg, base) == []
    copy = tmp_path / "pi0"
    shutil.copytree(PI0, copy)
    other = config.load(DEMO, [f"loop.base_policy={copy}"])
    assert stage_inputs(other, base) == stage_inputs(cfg, base)  # same files elsewhere: the same pi0
    (copy / "README.md").write_text("notes\n")
    assert stage_inputs(other, base) == stage_inputs(cfg, base)  # docs are not the policy
    meta = json.loads((copy / "apo_vla.json").read_text())
    meta["default_instruction"] = "lift the blue cube"
    (copy / "apo_vla.json").write_text(json.dumps(meta))
    assert stage_inputs(other, base) != stage_inputs(cfg, base)  # a fork must not reuse the old pi0's stages


@pytest.mark.ray
def test_round0_imports_the_base_policy_instead_of_bc(ray_local, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    pi0 = tmp_path / "pi0"
    shutil.copytree(PI0, pi0)
    cfg = config.load(DEMO, [*TINY_ROUND0, f"loop.base_policy={pi0}"])
    run = tmp_path / "run"
    out = run_loop(cfg, run, progress=False, log=lambda _s: None)
    journal = json.loads((run / "journal.json").read_text())
    done = set(journal["order"])
    assert "r0/base/dataset" not in done and {"r0/base/train", "r0/base/eval/position", "r0/base/eval/nominal"} <= done
    ckpt = run / "r0" / "base" / "train" / "checkpoint"
    for f in ("model.safetensors", "apo_vla.json", "tokenizer.json"):
        assert (ckpt / f).read_bytes() == (pi0 / f).read_bytes()
    assert not (run / "r0" / "base" / "train" / "steps.jsonl").exists()
    assert set(out["eval"]) == {"r0/base/eval/position", "r0/base/eval/nominal"}
    assert len(list((run / "r0" / "demos" / "collect" / "nominal" / "episodes").glob("*.parquet"))) == 2
    assert run_loop(cfg, run, resume=True, progress=False, log=lambda _s: None)["ran"] == 0
    assert set(fork_run(run, cfg, tmp_path / "same")["kept"]) == done  # the same pi0: every stage reused
    meta = json.loads((pi0 / "apo_vla.json").read_text())
    meta["default_instruction"] = "lift the blue cube"
    (pi0 / "apo_vla.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="files changed since this run imported them"):
        run_loop(cfg, run, resume=True, progress=False, log=lambda _s: None)
    # a fork keeps the demos but not the stages of the pi0 that the changed files no longer are
    assert fork_run(run, cfg, tmp_path / "fork")["kept"] == ["r0/demos/collect/nominal"]
