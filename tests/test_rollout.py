"""Parallel rollouts on a real local Ray with real robosuite envs, written to real Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from apo_ray import schema as S
from apo_ray.config import CorrectorConfig, InferenceConfig
from apo_ray.rollout import RolloutSpec as Spec
from apo_ray.rollout import RolloutWorker, RunOptions, actor_capacity, actor_placement, collect

APO = [sys.executable, "-m", "apo_ray"]


def _read(path: Path) -> dict[str, np.ndarray]:
    t = S.read_table(path)
    return {name: S.column_to_numpy(t.column(name)) if name in S.TENSOR_COLUMNS else t.column(name).to_numpy(zero_copy_only=False)
            for name in t.column_names}


@pytest.mark.ray
def test_collect_oracle_writes_schema(ray_local, tmp_path):
    summary = collect(Spec("lift", "nominal", "oracle", str(tmp_path / "out"), corrector=CorrectorConfig()), range(2))
    assert summary["episodes"] == 2 and summary["successes"] == 2 and summary["success_rate"] == 1.0
    assert set(summary) >= {"episodes", "successes", "success_rate", "steps", "intervention_episodes",
                            "intervention_steps", "env_steps_per_s"}
    files = sorted((tmp_path / "out" / "episodes").glob("*.parquet"))
    assert [f.name for f in files] == ["lift-nominal-r0-s000000.parquet", "lift-nominal-r0-s000001.parquet"]
    t = pq.read_table(files[0])
    assert tuple(t.column_names) == S.COLUMNS
    assert t.schema.metadata[S.META_VERSION] == str(S.SCHEMA_VERSION).encode()
    assert S.env_meta_of(t.schema)["env_name"] == "Lift"
    ep = _read(files[0])
    n = t.num_rows
    assert ep[S.IMAGE].shape == (n, 64, 64, 3) and ep[S.IMAGE].dtype == np.uint8
    assert ep[S.PROPRIO].shape == (n, S.PROPRIO_DIM) and ep[S.ACTION].shape == (n, 7)
    assert (ep[S.T] == np.arange(n)).all() and ep[S.DONE][-1] and not ep[S.DONE][:-1].any()
    # a perfect policy never triggers the corrector, and its actions are the oracle's
    assert (ep[S.C] == S.C_POLICY).all() and (ep[S.INTERVENTION_ID] == -1).all()
    np.testing.assert_allclose(ep[S.ACTION], ep[S.ORACLE_ACTION], atol=1e-6)
    assert summary["steps"] == sum(pq.read_metadata(f).num_rows for f in files)
    # Ray Data reads the tensor columns natively
    batch = ray_local.data.read_parquet(str(tmp_path / "out" / "episodes")).take_batch(4, batch_format="numpy")
    assert batch[S.IMAGE].shape == (4, 64, 64, 3) and batch[S.ACTION].shape == (4, 7)


@pytest.mark.ray
def test_same_seed_same_episode_across_actors_and_processes(ray_local, tmp_path, capsys):
    collect(Spec("lift", "nominal", "noisy-oracle:0.2", str(tmp_path / "a"), corrector=CorrectorConfig()), [7],
            RunOptions(workers=1))
    # 3 workers on 2 sim slots: the third actor would wait for a slot forever, so the stage runs 2
    collect(Spec("lift", "nominal", "noisy-oracle:0.2", str(tmp_path / "b"), corrector=CorrectorConfig()),
            range(5, 8), RunOptions(workers=3))
    assert "3 workers but the cluster holds 2 rollout actors at once: using 2" in capsys.readouterr().err
    name = "lift-nominal-r0-s000007.parquet"
    a, b = _read(tmp_path / "a" / "episodes" / name), _read(tmp_path / "b" / "episodes" / name)
    # in-process, with a worker that ran another episode first
    w = RolloutWorker(Spec("lift", "nominal", "noisy-oracle:0.2", str(tmp_path / "c"), corrector=CorrectorConfig()))
    w.run_episode(6)
    w.run_episode(7)
    w.close()
    c = _read(tmp_path / "c" / "episodes" / name)
    for other in (b, c):
        for col in (S.IMAGE, S.ACTION, S.ORACLE_ACTION, S.PROPRIO, S.C, S.INTERVENTION_ID):
            np.testing.assert_array_equal(a[col], other[col], err_msg=col)
        np.testing.assert_array_equal(np.stack(a[S.STATE]), np.stack(other[S.STATE]))


@pytest.mark.ray
def test_a_pooled_actor_serves_the_next_stage_with_the_same_bytes(ray_local, tmp_path):
    """Under keep_actors() (the loop's stages) one actor runs a deployment in another scenario and round, then is
    retargeted to the first test's episode: the same bytes as a fresh actor's, and the same actor process."""
    from apo_ray import rollout as R

    one = RunOptions(workers=1)
    collect(Spec("lift", "nominal", "noisy-oracle:0.2", str(tmp_path / "a"), corrector=CorrectorConfig(), horizon=60),
            [7], one)
    assert R._pool is None
    with R.keep_actors():
        collect(Spec("lift", "position", "oracle", str(tmp_path / "other"), round_=1, horizon=30,
                     corrector=CorrectorConfig()), [3], one)
        (key, (actor,)), = R._pool.items()
        collect(Spec("lift", "nominal", "noisy-oracle:0.2", str(tmp_path / "d"), corrector=CorrectorConfig(),
                     horizon=60), [7], one)
        assert [a._actor_id for a in R._pool[key]] == [actor._actor_id]  # reused, not replaced
        # kept on a sim slot it claims no CPU: the loop keeps it through dataset and training stages
        assert json.loads(key) == {"num_cpus": 0, "resources": {"sim": 1}}
        assert ray_local.available_resources()["CPU"] == ray_local.cluster_resources()["CPU"]
        R.release_actors(cpu_only=True)
        assert list(R._pool) == [key]
        # an actor that holds a CPU (a cluster without sim slots) goes before such a stage
        class Idle:  # defined here so that Ray ships it by value
            def ping(self) -> int:
                return 1

        held = ray_local.remote(num_cpus=1)(Idle).remote()
        ray_local.get(held.ping.remote())
        R._pool['{"num_cpus": 1}'] = [held]
        R.release_actors(cpu_only=True)
        assert list(R._pool) == [key]
        # ray.kill is asynchronous: a call sent right after it may still be served, so wait for the death
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray_local.get(held.ping.remote(), timeout=10)
            except ray_local.exceptions.RayActorError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("release_actors(cpu_only=True) left the CPU-holding actor alive")
        R.release_actors()
        assert R._pool == {}
    assert R._pool is None
    name = "lift-nominal-r0-s000007.parquet"
    a, d = _read(tmp_path / "a" / "episodes" / name), _read(tmp_path / "d" / "episodes" / name)
    assert not (tmp_path / "d" / "episodes" / "lift-position-r1-s000003.parquet").exists()
    for col in (S.IMAGE, S.ACTION, S.ORACLE_ACTION, S.PROPRIO, S.C, S.INTERVENTION_ID):
        np.testing.assert_array_equal(a[col], d[col], err_msg=col)
    np.testing.assert_array_equal(np.stack(a[S.STATE]), np.stack(d[S.STATE]))


@pytest.mark.ray
def test_intervention_labels_match_who_acted(ray_local, tmp_path):
    summary = collect(Spec("lift", "nominal", "noisy-oracle:0.3", str(tmp_path / "o"), corrector=CorrectorConfig()),
                      range(3))
    assert summary["intervention_episodes"] >= 1 and summary["intervention_steps"] > 0
    for f in (tmp_path / "o" / "episodes").glob("*.parquet"):
        ep = _read(f)
        corr = ep[S.C] == S.C_CORRECTOR
        assert set(np.unique(ep[S.C])) <= {S.C_POLICY, S.C_CORRECTOR}
        assert (ep[S.INTERVENTION_ID][corr] >= 0).all() and (ep[S.INTERVENTION_ID][~corr] == -1).all()
        np.testing.assert_allclose(ep[S.ACTION][corr], np.clip(ep[S.ORACLE_ACTION][corr], -1, 1), atol=1e-6)
        # intervention ids count up from 0 in order of appearance
        ids = ep[S.INTERVENTION_ID][corr]
        starts = ids[np.r_[True, ids[1:] != ids[:-1]]]
        assert (starts == np.arange(len(starts))).all()


def test_dart_demos_execute_seeded_noise_and_record_the_clean_oracle(tmp_path):
    w = RolloutWorker(Spec("lift", "nominal", "dart-oracle:0.3", str(tmp_path)))
    stats = w.run_episode(3)
    w.close()
    ep = _read(tmp_path / "episodes" / "lift-nominal-r0-s000003.parquet")
    n = len(ep[S.T])
    assert stats.success and (ep[S.C] == S.C_POLICY).all()
    # by hand: the translation is the oracle's plus N(0, 0.3^2) drawn from the episode seed's generator, clipped
    rng = np.random.default_rng([3, 0xDA27])
    want = np.clip(ep[S.ORACLE_ACTION][:, :3].astype(np.float64) + rng.normal(0.0, 0.3, (n, 3)), -1, 1)
    np.testing.assert_allclose(ep[S.ACTION][:, :3], want, atol=1e-6)
    np.testing.assert_array_equal(ep[S.ACTION][:, 3:], ep[S.ORACLE_ACTION][:, 3:])  # rotation, gripper clean


def _cli(args, env=None, cwd=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(APO + args, capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


@pytest.mark.ray
def test_killed_actor_episode_is_rerun_once(tmp_path):
    out = tmp_path / "k"
    r = _cli(["collect", "--task", "lift", "--policy", "oracle", "--episodes", "3", "--workers", "2",
              "--seed", "0", "--out", str(out)], env={"APO_RAY_FAULT_KILL_ACTOR": "1:5"})
    assert r.returncode == 0, r.stderr
    assert (out / ".fault-killed-1-5").exists()  # the actor really died at step 5 of seed 1
    files = sorted(p.name for p in (out / "episodes").iterdir())
    assert files == [f"lift-nominal-r0-s00000{i}.parquet" for i in range(3)]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and summary["successes"] == 3
    assert pq.read_table(out / "episodes" / files[1]).column(S.T).to_pylist()[:6] == list(range(6))


@pytest.mark.ray
def test_video_has_border_while_correcting(ray_local, tmp_path):
    import imageio.v2 as imageio

    collect(Spec("lift", "nominal", "noisy-oracle:0.3", str(tmp_path / "v"), corrector=CorrectorConfig()), [3],
            RunOptions(workers=1, videos=1))
    ep = _read(next((tmp_path / "v" / "episodes").glob("*.parquet")))
    frames = imageio.mimread(next((tmp_path / "v" / "videos").glob("*.mp4")), memtest=False)
    assert len(frames) == len(ep[S.C])
    corr = np.flatnonzero(ep[S.C] == S.C_CORRECTOR)
    pol = np.flatnonzero(ep[S.C] == S.C_POLICY)
    assert len(corr) and len(pol)
    red = lambda f: f[1:3, :, 0].mean() > 180 and f[1:3, :, 1].mean() < 90  # noqa: E731
    assert red(frames[corr[len(corr) // 2]]) and not red(frames[pol[0]])


def test_actor_placement_takes_a_gpu_share_only_where_the_cluster_has_gpus():
    cpu, sim, gpu = {"CPU": 8.0}, {"CPU": 8.0, "sim": 4.0}, {"CPU": 8.0, "GPU": 1.0, "sim": 4.0}
    assert actor_placement(0.0, cpu) == {"num_cpus": 1}
    assert actor_placement(0.0, sim) == actor_placement(0.0, gpu) == {"num_cpus": 0, "resources": {"sim": 1}}
    assert actor_placement(0.25, sim) == {"num_cpus": 0, "resources": {"sim": 1}}  # no GPU: CPU, on a sim slot
    # a GPU share leaves the CPU-only sim nodes: the policy acts on the GPU node
    assert actor_placement(0.25, gpu) == {"num_cpus": 1, "num_gpus": 0.25}
    # how many fit at once: one per sim slot, per CPU, or per GPU share (CPU permitting)
    assert actor_capacity(actor_placement(0.0, sim), sim) == 4 and actor_capacity(actor_placement(0.0, cpu), cpu) == 8
    assert actor_capacity(actor_placement(0.25, gpu), gpu) == 4
    assert actor_capacity(actor_placement(0.25, gpu), {"CPU": 2.0, "GPU": 1.0}) == 2
    assert actor_capacity({"num_cpus": 1}, {"CPU": 0.5}) == 0


@pytest.mark.ray
def test_checkpoint_policy_acts_on_its_gpu_share(ray_local, tmp_path, capsys):
    """A trained policy asked onto a quarter GPU: there it acts in bf16 on CUDA; on this CPU-only Ray it falls
    back to CPU, and says so. The episode files are the same kind either way."""
    import torch

    from apo_ray import model as M
    from apo_ray.config import ModelConfig
    from apo_ray.evaluate import evaluate

    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    model, proc = M.build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), stats, 64,
                                ["lift the red cube"], seed=0)
    ckpt = M.save_checkpoint(model, proc, tmp_path / "ckpt")
    gpu = torch.cuda.is_available()
    # each actor's own copy (the path before the inference service)
    def spec(out: str) -> Spec:
        return Spec("lift", "nominal", str(ckpt), str(tmp_path / out), horizon=15)

    seeds = [100_000, 100_001]
    own = evaluate(spec("own"), seeds, RunOptions(gpus=0.25, progress=False, inference=InferenceConfig(enabled=False)))
    assert own["policy_device"] == ("cuda:0" if gpu else "cpu") and own["episodes"] == 2
    assert gpu or "gpus_per_worker 0.25 but the cluster has no GPU" in capsys.readouterr().err
    # the default: the inference service's replicas take the share
    res = evaluate(spec("ev"), seeds, RunOptions(gpus=0.25, progress=False))
    assert res["policy_device"] == ("cuda:0" if gpu else "cpu") and res["episodes"] == 2
    assert gpu or "inference replicas asked for 0.25 GPU but the cluster has no GPU" in capsys.readouterr().err
    for f in sorted((tmp_path / "ev" / "episodes").glob("*.parquet")):
        ep = _read(f)
        assert len(ep[S.T]) == 15 and (ep[S.C] == S.C_POLICY).all() and np.abs(ep[S.ACTION]).max() <= 1.0
    # every episode already on disk: nothing ran, so no device to report
    again = evaluate(spec("ev"), seeds, RunOptions(progress=False), resume=True)
    assert again["policy_device"] is None and again["successes"] == res["successes"]


@pytest.mark.parametrize("args,needle", [
    (["--task", "lfit"], "unknown task 'lfit'"),
    (["--task", "lift", "--scenario", "posiiton"], "posiiton"),
    (["--task", "lift", "--episodes", "0"], "--episodes must be >= 1"),
    (["--task", "lift", "--policy", "noisy-oracle:2"], "bad policy spec"),
    (["--task", "lift", "--policy", "dart-oracle:x"], "dart-oracle:<sigma> with 0<=sigma<=1"),
    (["--task", "lift", "--policy", "gpt"], "unknown policy 'gpt'"),
    (["--task", "lift", "--image-size", "32"], "--image-size 32 out of range"),
    (["--task", "lift", "--gpus-per-worker", "-1"], "--gpus-per-worker -1.0 is negative"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    out = tmp_path / "bad"
    r = _cli(["collect", *args, "--out", str(out)])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_non_empty_or_unwritable_out_dir(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    r = _cli(["collect", "--task", "lift", "--out", str(full)])
    assert r.returncode == 2 and "out dir is not empty" in r.stderr and (full / "keep.txt").read_text() == "precious"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli(["collect", "--task", "lift", "--out", str(blocker / "sub")])
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_stalled_marks_failures_that_end_frozen():
    from apo_ray.rollout import STALL_STEPS, EpisodeStats, stalled
    from tests.test_data import episode

    moving = np.zeros((STALL_STEPS + 5, 7), np.float32)
    moving[:, 2] = 1.0  # lifting
    frozen = moving.copy()
    frozen[5:, :6] = 0.01  # Σ|a[:6]| = 0.06 ≥ 0.05 is still moving ...
    assert not stalled(frozen, False)
    frozen[5:, :6] = 0.008  # ... 0.048 is not
    frozen[5:, 6] = 1.0  # the gripper command does not count
    assert stalled(frozen, False)
    assert not stalled(frozen, True)  # a success never stalled
    assert not stalled(frozen[:STALL_STEPS - 1], False)  # too short to tell
    frozen[-1, 0] = 0.5  # one move at the end
    assert not stalled(frozen, False)
    t = episode("e0", [1] * (STALL_STEPS + 2), actions=np.zeros((STALL_STEPS + 2, 7), np.float32))
    assert EpisodeStats.of_table(t).stalled  # episode() writes success=False
