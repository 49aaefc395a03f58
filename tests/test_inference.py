"""The batched policy-inference service: fixed-shape batches keep every row independent of its batch mates, so
episodes are the same whatever the runners, envs per runner and batching; a killed replica costs re-runs only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from apo_ray import model as M
from apo_ray import schema as S
from apo_ray.config import InferenceConfig, ModelConfig
from apo_ray.vla_policy import VLAPolicy

STATS = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model, proc = M.build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), STATS, 64,
                                ["lift the red cube"], seed=0)
    return M.save_checkpoint(model, proc, tmp_path_factory.mktemp("inf") / "ckpt")


def _obs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
             "proprio": rng.standard_normal(9).astype(np.float32), "instruction": "lift the red cube"}
            for _ in range(n)]


def test_a_row_of_a_fixed_shape_batch_is_independent_of_its_batch_mates():
    """The premise of the service's determinism, checked on CPU torch: with the shape fixed, row 0's logits are
    bitwise the same whatever the other rows hold (at batch 1 against 2 they may differ: another kernel)."""
    torch.set_num_threads(1)
    model, proc = M.build_model(ModelConfig(), STATS, 64, ["lift the red cube"], seed=0)
    model.eval()
    first = _obs(1, 0)

    def logits(batch: list[dict]) -> torch.Tensor:
        inp = proc(np.stack([o["image"] for o in batch]), [o["instruction"] for o in batch])
        with torch.inference_mode():
            return model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                         pixel_values=inp.pixel_values).logits[0]

    ref = logits(first + _obs(7, 1))
    for mates in (2, 3, 4):
        assert torch.equal(ref, logits(first + _obs(7, mates))), f"batch mates {mates} moved row 0"
    assert torch.equal(ref, logits(first * 8))


def test_padded_decode_equals_across_batch_mates(ckpt):
    pol = VLAPolicy(ckpt, threads=1)
    a = pol.act_tokens(_obs(1, 0) + _obs(7, 1))
    b = pol.act_tokens(_obs(1, 0) + _obs(1, 0) * 7)  # the replica's padding: copies of the first row
    np.testing.assert_array_equal(a[0], b[0])


def _tables(d: Path) -> dict[str, object]:
    return {f.name: pq.read_table(f) for f in sorted((d / "episodes").glob("*.parquet"))}


@pytest.mark.ray
def test_same_episodes_with_1_and_2_runners_and_batching_on_and_off(ray_local, ckpt, tmp_path):
    """One evaluation four ways: 1 runner, 1 env, no waiting (every decode holds one real row); 2 runners with 2
    envs each, batching across all four; 2 runners, no waiting; the per-actor path as a control that the
    service's rows are really decoded in batches. The service's episode files are equal bit for bit."""
    from apo_ray.evaluate import evaluate
    from apo_ray.rollout import RolloutSpec, RunOptions

    runs = {
        "1x1_nobatch": dict(workers=1, envs_per_worker=1, inference=InferenceConfig(max_wait_ms=0.0)),
        "2x2_batch": dict(workers=2, envs_per_worker=2, inference=InferenceConfig(max_wait_ms=200.0)),
        "2x1_nobatch": dict(workers=2, envs_per_worker=1, inference=InferenceConfig(max_wait_ms=0.0, replicas=2)),
    }
    res = {}
    for name, r in runs.items():
        res[name] = evaluate(RolloutSpec("lift", "nominal", str(ckpt), str(tmp_path / name), horizon=12),
                             range(100_000, 100_006), RunOptions(progress=False, **r))
    summaries = {n: json.loads((tmp_path / n / "collect.json").read_text()) for n in runs}
    # the batched run really batched: more rows per decode than one
    assert summaries["2x2_batch"]["inference"]["mean_rows"] > 1.5, summaries["2x2_batch"]
    assert summaries["1x1_nobatch"]["inference"]["mean_rows"] == 1.0
    base = _tables(tmp_path / "1x1_nobatch")
    assert len(base) == 6
    for name in ("2x2_batch", "2x1_nobatch"):
        other = _tables(tmp_path / name)
        assert list(other) == list(base)
        for f, t in base.items():
            assert t.equals(other[f]) and t.schema.metadata == other[f].schema.metadata, (name, f)
            assert (tmp_path / "1x1_nobatch" / "episodes" / f).read_bytes() == \
                (tmp_path / name / "episodes" / f).read_bytes(), (name, f)
    assert {r["success_rate"] for r in res.values()} == {res["1x1_nobatch"]["success_rate"]}
    # actions came from the policy, all 12 steps of every episode
    t = next(iter(base.values()))
    assert t.num_rows == 12 and set(t.column(S.C).to_pylist()) == {S.C_POLICY}


@pytest.mark.ray
def test_a_killed_replica_is_restarted_and_its_episodes_rerun_once(ray_local, ckpt, tmp_path):
    """A replica exits hard at its 6th decode (mid-episode for every runner waiting on it): Ray restarts it, the
    runners start the affected episodes over from their seeds; each episode is written once, and the files equal
    those of a run without the fault bit for bit."""
    from apo_ray.evaluate import evaluate
    from apo_ray.rollout import RolloutSpec, RunOptions

    evaluate(RolloutSpec("lift", "nominal", str(ckpt), str(tmp_path / "clean"), horizon=10), range(100_000, 100_003),
             RunOptions(progress=False))
    marker = tmp_path / "replica-killed"
    out = tmp_path / "killed"
    env = {**os.environ, "APO_RAY_FAULT_KILL_INFERENCE": f"6:{marker}"}
    r = subprocess.run([sys.executable, "-m", "apo_ray", "collect", "--task", "lift", "--policy", str(ckpt),
                        "--episodes", "3", "--workers", "2", "--seed", "100000", "--horizon", "10", "--no-corrector",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # the replica really died
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and summary["inference_reruns"] >= 1, summary
    clean, killed = _tables(tmp_path / "clean"), _tables(out)
    assert list(killed) == list(clean) == [f"lift-nominal-r0-s{100_000 + i:06d}.parquet" for i in range(3)]
    assert not list((out / "episodes").glob("*.tmp*"))
    for f, t in clean.items():
        assert t.equals(killed[f]), f


@pytest.mark.ray
def test_a_loop_keeps_its_cpu_replica_through_training_without_its_weights(ray_local, ckpt, tmp_path):
    """On the embedded node a CPU replica claims no CPU, so the loop's release before a training keeps its
    process and drops only its weights; the next stage's policy (another checkpoint, as after a training) then
    decodes in that same process, with the episodes of a fresh service."""
    from apo_ray import rollout as R
    from apo_ray.evaluate import evaluate
    from apo_ray.rollout import RolloutSpec, RunOptions

    model, proc = M.build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), STATS, 64,
                                ["lift the red cube"], seed=1)
    other = M.save_checkpoint(model, proc, tmp_path / "other")
    run = RunOptions(progress=False, workers=1, envs_per_worker=2)
    seeds = range(100_000, 100_002)
    evaluate(RolloutSpec("lift", "nominal", str(other), str(tmp_path / "fresh"), horizon=8), seeds, run)
    with R.keep_actors():
        evaluate(RolloutSpec("lift", "nominal", str(ckpt), str(tmp_path / "a"), horizon=8), seeds, run)
        (key, svc), = R._services.items()
        assert json.loads(key)["placement"] == {"num_cpus": 0}
        (replica,) = svc.replicas
        R.release_actors(cpu_only=True)
        assert R._services == {key: svc}
        assert ray_local.get(replica.ping.remote()) == "unloaded"
        assert ray_local.available_resources()["CPU"] == ray_local.cluster_resources()["CPU"]
        evaluate(RolloutSpec("lift", "nominal", str(other), str(tmp_path / "b"), horizon=8), seeds, run)
        assert R._services[key].replicas[0]._actor_id == replica._actor_id
        assert ray_local.get(replica.ping.remote()) == "cpu"
    assert R._services == {}
    fresh, b = _tables(tmp_path / "fresh"), _tables(tmp_path / "b")
    assert list(fresh) == list(b) and len(b) == 2
    for f in fresh:
        assert (tmp_path / "fresh" / "episodes" / f).read_bytes() == (tmp_path / "b" / "episodes" / f).read_bytes()
