"""Trainer: a real Ray Train TorchTrainer + DeepSpeed run on a tiny dataset in the ARCHITECTURE.md layout,
resume after an injected worker failure, cached vs live reference, bad input, NaN stop."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apo_ray import config as C
from apo_ray import fsio
from apo_ray.errors import UserError
from apo_ray.loss import logp_where_differ, next_in_group
from apo_ray.schema import tensor_array

B, ROWS, IMG = 8, 6, 64
STATS = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}


def make_dataset(out: Path, rows: int = ROWS, c_zero: bool = True, seed: int = 0) -> Path:
    """Shards + manifest in the ARCHITECTURE.md layout written directly (for bad-input cases the real pipeline
    refuses to produce, e.g. no undesirable samples): one row = one balanced micro-batch of B samples."""
    import pyarrow as pa

    from apo_ray import model as M

    rng = np.random.default_rng(seed)
    vocab = M.VOCAB_SIZE
    c = np.array([1, 1, 1, 1, 2, 2, 0 if c_zero else 1, 0 if c_zero else 1], dtype=np.int8)
    pool = np.array([0, 0, 0, 0, 1, 1, 2, 2], dtype=np.int8)
    images = rng.integers(0, 256, (rows, B, IMG, IMG, 3), dtype=np.uint8)
    bins = rng.integers(0, 256, (rows, B, 7)).astype(np.int16)
    tokens = (bins.astype(np.int32) + vocab - 256)
    oracle = (rng.integers(0, 256, (rows, B, 7)) + vocab - 256).astype(np.int32)
    instr = [["lift the cube"] * B for _ in range(rows)]
    cols = {
        "batch_id": pa.array(np.arange(rows, dtype=np.int64)),
        "image": tensor_array(images),
        "proprio": tensor_array(rng.standard_normal((rows, B, 9)).astype(np.float32)),
        "instruction": pa.array(instr, type=pa.list_(pa.string())),
        "action": tensor_array(rng.uniform(-1, 1, (rows, B, 7)).astype(np.float32)),
        "action_norm": tensor_array(rng.uniform(-1, 1, (rows, B, 7)).astype(np.float32)),
        "action_bins": tensor_array(bins),
        "action_tokens": tensor_array(tokens),
        "oracle_tokens": tensor_array(oracle),
        "c": tensor_array(np.tile(c, (rows, 1))),
        "pool": tensor_array(np.tile(pool, (rows, 1))),
        "is_expert": tensor_array(np.tile(np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool), (rows, 1))),
        "episode_id": pa.array([[f"e{i}"] * B for i in range(rows)], type=pa.list_(pa.string())),
        "t": tensor_array(np.tile(np.arange(B, dtype=np.int32), (rows, 1))),
    }
    out.mkdir(parents=True, exist_ok=True)
    shard = out / "shards" / "part-00000.parquet"
    fsio.write_parquet(shard, pa.table(cols))
    manifest = {"schema_version": 1, "dataset_hash": f"test{seed}", "config": {"batch_size": B, "vocab_size": vocab},
                "action_stats": STATS, "counts": {"rows": rows},
                "shards": [{"name": "shards/part-00000.parquet", "rows": rows, "sha256": fsio.sha256_file(shard)}]}
    fsio.write_json(out / "manifest.json", manifest)
    return out


def tiny_cfg(**train) -> C.Config:
    base = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vision_hidden_size": 16},
            "train": {"lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "torch_threads": 1, **train}}
    return C.from_dict(base)


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    from apo_ray import model as M

    cfg = tiny_cfg()
    m, proc = M.build_model(cfg.model, STATS, IMG, ["lift the red cube"], seed=3)
    return str(M.save_checkpoint(m, proc, tmp_path_factory.mktemp("init") / "ckpt"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, init_ckpt, ray_local):
    """A training set made by the real pipeline (apo_ray.data.build_dataset) from synthetic episodes with
    corrector takeovers, with the reference stage run against ``init_ckpt``."""
    from apo_ray import model as M
    from apo_ray.bench.data import synth_episodes
    from apo_ray.config import DataConfig
    from apo_ray.data import build_dataset

    root = tmp_path_factory.mktemp("built")
    synth_episodes(root / "episodes", episodes=6, steps=30, image_size=IMG)
    build_dataset([root / "episodes"], [], root / "ds", DataConfig(), ref_checkpoint=init_ckpt,
                  vocab_size=M.VOCAB_SIZE)
    return root / "ds"


def test_proprio_stats_by_hand(tmp_path):
    from apo_ray.trainer import _inspect_dataset, proprio_stats

    got = proprio_stats(np.array([[1.0, 2.0, 5.0], [3.0, 2.0, 7.0]]))
    assert got == {"mean": [2.0, 2.0, 6.0], "std": [1.0, 1.0, 1.0]}  # the constant middle dim gets std 1
    got = proprio_stats(np.array([[0.0], [0.5], [1.0], [0.5]]))
    assert got["mean"] == [0.5] and got["std"] == pytest.approx([np.sqrt(0.125)], abs=1e-6)
    # the dataset pass computes them over every sample of every shard
    info = _inspect_dataset(make_dataset(tmp_path / "ds"))
    from apo_ray.schema import PROPRIO_DIM, column_to_numpy, read_table

    x = np.concatenate([column_to_numpy(read_table(s, columns=["proprio"]).column("proprio")).reshape(-1, PROPRIO_DIM)
                        for s in info["shards"]])
    assert len(x) == info["rows"] * info["batch_size"]
    np.testing.assert_allclose(info["proprio_stats"]["mean"], x.mean(0), atol=1e-6)


def test_bad_inputs(tmp_path, init_ckpt):
    from apo_ray.trainer import train

    with pytest.raises(UserError, match="manifest.json missing"):
        train(tmp_path / "nope", "scratch", tmp_path / "o", tiny_cfg())
    d = make_dataset(tmp_path / "d", rows=2, c_zero=False)
    with pytest.raises(UserError, match="needs undesirable"):
        train(d, init_ckpt, tmp_path / "o", tiny_cfg(objective="apo"))
    with pytest.raises(UserError, match="init checkpoint missing"):
        train(d, str(tmp_path / "missing"), tmp_path / "o", tiny_cfg(objective="bc"))
    m = json.loads((d / "manifest.json").read_text())
    m["action_stats"] = {}
    fsio.write_json(d / "manifest.json", m)
    with pytest.raises(UserError, match="no action statistics"):
        train(d, "scratch", tmp_path / "o", tiny_cfg(objective="bc"))


@pytest.mark.ray
def test_dataset_built_against_a_reference_keeps_its_action_statistics(built):
    """The synthetic actions are uniform in [-1, 1] (their own q01/q99 would be about ±0.98); the dataset must bin
    them with the reference checkpoint's statistics (±1), or a warm start would read shifted tokens."""
    m = json.loads((built / "manifest.json").read_text())
    assert m["action_stats"]["q01"] == STATS["q01"] and m["action_stats"]["q99"] == STATS["q99"]


def test_reference_mode_needs_every_column_the_loss_reads(tmp_path):
    """A dataset built before a reference column existed trains against a live replica under ``auto``, and
    ``cached`` refuses it with one clear error naming the column."""
    from apo_ray.trainer import _reference_mode

    info = {"has_ref": True, "ref_optional": ["ref_logp_oracle"], "manifest": {"reference": {"checkpoint": "/c"}}}
    assert _reference_mode(tiny_cfg(objective="apo"), info, "/c") == "cached"
    assert _reference_mode(tiny_cfg(objective="dpo"), info, "/c") == "cached"
    assert _reference_mode(tiny_cfg(objective="apo", undesirable_tokens="differ"), info, "/c") == "live"
    with pytest.raises(UserError, match="no reference log-prob columns ref_logp_u_differ"):
        _reference_mode(tiny_cfg(objective="apo", undesirable_tokens="differ", reference="cached"), info, "/c")
    info["ref_optional"].append("ref_logp_u_differ")
    assert _reference_mode(tiny_cfg(objective="kto", undesirable_tokens="differ"), info, "/c") == "cached"
    assert _reference_mode(tiny_cfg(objective="dagger", undesirable_tokens="differ"), info, "/c") == "none"


def test_cached_reference_follows_the_checkpoints_content_not_its_path(tmp_path):
    """A forked or restored run holds its reference checkpoint at another path than the one in the manifest: the
    same files keep the cached reference (a silent switch to a live one changes the run's arithmetic), other
    files do not."""
    from apo_ray.trainer import _reference_mode

    src = tmp_path / "src" / "checkpoint"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "config.json").write_text("{}")
    info = {"has_ref": True, "ref_optional": [],
            "manifest": {"reference": {"checkpoint": str(src), "sha256": fsio.sha256_dir(src)}}}
    fork = tmp_path / "fork"
    shutil.copytree(src, fork / "checkpoint")
    assert _reference_mode(tiny_cfg(objective="apo"), info, str(fork)) == "cached"
    assert _reference_mode(tiny_cfg(objective="apo"), info, str(src)) == "cached"
    (fork / "checkpoint" / "model.safetensors").write_bytes(b"other weights")
    assert _reference_mode(tiny_cfg(objective="apo"), info, str(fork)) == "live"
    with pytest.raises(UserError, match="reference log-probs come from"):
        _reference_mode(tiny_cfg(objective="apo", reference="cached"), info, str(fork))
    assert _reference_mode(tiny_cfg(objective="apo"), info, "scratch") == "live"


@pytest.mark.ray
def test_cached_reference_matches_live(built, init_ckpt):
    """The loss with the pipeline's ref_* columns equals the loss with a live replica within 1e-5."""
    import pyarrow.parquet as pq

    from apo_ray import model as M
    from apo_ray.loss import LossParams, Scores, apo_loss, dpo_loss
    from apo_ray.schema import column_to_numpy

    t = pq.read_table(sorted((built / "shards").glob("*.parquet"))[0]).slice(0, 2)
    policy, proc, _ = M.load_policy(init_ckpt, trainable=True)
    ref, _, _ = M.load_policy(init_ckpt)
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference so the rewards are non-zero
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    imgs = column_to_numpy(t["image"]).reshape(-1, IMG, IMG, 3)
    toks = torch.as_tensor(column_to_numpy(t["action_tokens"]).reshape(-1, 7).astype(np.int64))
    orc = torch.as_tensor(column_to_numpy(t["oracle_tokens"]).reshape(-1, 7).astype(np.int64))
    c = torch.as_tensor(column_to_numpy(t["c"]).reshape(-1).astype(np.int64))
    inp = proc(imgs, [x for row in t["instruction"].to_pylist() for x in row])
    sets = [toks, next_in_group(toks, B), orc]
    sc = M.score_actions(policy, inp, sets, proc.meta)
    with torch.no_grad():
        rs = M.score_actions(ref, inp, sets, proc.meta)
    cached = {k: torch.as_tensor(column_to_numpy(t[k]).reshape(-1)) for k in
              ("ref_logp", "ref_logp_u", "ref_kl_logp", "ref_logp_oracle", "ref_logp_u_differ")}
    torch.testing.assert_close(cached["ref_logp"], rs[0].logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached["ref_kl_logp"], rs[1].logp_u, atol=1e-5, rtol=0)
    assert (toks != orc).any() and (toks == orc).any()

    def scores(r):
        return Scores(logp=sc[0].logp, logp_u=sc[0].logp_u, token_logp=sc[0].token_logp, c=c,
                      is_expert=torch.zeros_like(c, dtype=torch.bool), l1=M.decoded_l1(sc[0].pred_tokens, toks, proc.meta),
                      ref_logp=r[0], ref_logp_u=r[1], kl_logp=sc[1].logp_u, ref_kl_logp=r[2],
                      oracle_logp=sc[2].logp, ref_oracle_logp=r[3], differ_mask=toks != orc, ref_logp_u_differ=r[4])

    live = scores((rs[0].logp, rs[0].logp_u, rs[1].logp_u, rs[2].logp, logp_where_differ(rs[0].token_logp, toks, orc)))
    cach = scores(tuple(cached[k] for k in ("ref_logp", "ref_logp_u", "ref_kl_logp", "ref_logp_oracle",
                                            "ref_logp_u_differ")))
    for p in (LossParams(), LossParams(undesirable_tokens="differ", corrector_weight=2.0)):
        a, _ = apo_loss(live, p)
        b, _ = apo_loss(cach, p)
        assert abs(a.item()) > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    p = LossParams()
    torch.testing.assert_close(dpo_loss(live, p)[0], dpo_loss(cach, p)[0], atol=1e-5, rtol=0)


@pytest.mark.ray
def test_train_deepspeed_resume_after_worker_failure(tmp_path, built, init_ckpt, monkeypatch):
    """2 workers, ZeRO-2, APO with cached reference columns; the last worker dies at step 3 and the group
    resumes from the step-2 checkpoint (not from step 0); the final checkpoint loads as a policy."""
    from apo_ray.trainer import train
    from apo_ray.vla_policy import VLAPolicy

    rows = json.loads((built / "manifest.json").read_text())["counts"]["batches"]
    out = tmp_path / "run"
    monkeypatch.setenv("APO_RAY_FAIL_AT_STEP", "3")
    m = train(built, init_ckpt, out, tiny_cfg(objective="apo", workers=2, zero_stage=2, epochs=2, grad_accum=1,
                                          cpus_per_worker=0.5))
    assert (out / ".fault-injected-3").exists()
    steps = rows // 2 * 2
    assert steps >= 6
    assert m["step"] == steps and m.get("final")
    # resumed from the step-2 checkpoint; samples_seen counts the whole run (kept in the checkpoint), per pool at
    # the micro-batch's 4/2/2 composition, on 2 ranks
    assert m["resumed_from_step"] == 2
    assert m["samples_seen"] == {"correct": steps * 2 * 4, "interaction": steps * 2 * 2, "incorrect": steps * 2 * 2}
    for k in ("loss", "r_D", "r_U", "kl", "sum_lambda_D", "sum_lambda_U", "acc_c2", "l1", "samples_per_s"):
        assert k in m, k
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    pol = VLAPolicy(out / "checkpoint", threads=1)
    a = pol.act([{"image": np.zeros((IMG, IMG, 3), np.uint8), "proprio": np.zeros(9, np.float32)}])
    assert a.shape == (1, 7) and np.isfinite(a).all()


@pytest.mark.ray
@pytest.mark.slow
def test_nan_loss_stops_with_one_error(tmp_path, built):
    from apo_ray.trainer import train

    with pytest.raises(UserError, match="loss became"):
        train(built, "scratch", tmp_path / "o", tiny_cfg(objective="bc", lr=1e30, warmup_steps=0, grad_clip=0.0,
                                                     checkpoint_every=1, max_steps=4))
    assert os.path.isdir(tmp_path / "o" / "checkpoint")  # the last good checkpoint is kept


@pytest.mark.slow
@pytest.mark.ray
def test_cli_train_prints_metrics_json(tmp_path, built, capsys):
    """`apo-ray train` end to end (DPO, live reference, 2 workers, all-reduced KL flag on), JSON last line."""
    from apo_ray.cli import main

    rc = main(["train", "--data", str(built), "--init", "scratch", "--objective", "dpo", "--out", str(tmp_path / "o"),
               "--workers", "2", "--zero", "1", "--epochs", "1", "train.max_steps=2", "train.kl_allreduce=true",
               "train.torch_threads=1", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = json.loads(last)
    assert m["step"] == 2 and "margin" in m and (tmp_path / "o" / "checkpoint" / "model.safetensors").is_file()
    assert main(["train", "--data", str(tmp_path / "none"), "--init", "scratch", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.ray
def test_workers_that_starve_ray_data_are_refused(tmp_path, built):
    """2 workers x 1 CPU on the 2-CPU local Ray would leave Ray Data no CPU and hang forever."""
    from apo_ray.trainer import train

    with pytest.raises(UserError, match="leave no CPU for Ray Data"):
        train(built, "scratch", tmp_path / "o", tiny_cfg(objective="bc", workers=2, cpus_per_worker=1.0))


@pytest.mark.ray
@pytest.mark.slow
def test_driver_sigkill_resumes_from_last_checkpoint(tmp_path, built):
    """SIGKILL the whole `apo-ray train` process group (driver, embedded Ray, workers) after its first checkpoint;
    the same command again continues from that checkpoint's step and ends at the configured step count."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "apo_ray", "train", "--data", str(built), "--init", "scratch", "--objective", "bc",
           "--out", str(out), "--epochs", "30", "train.checkpoint_every=2", "train.torch_threads=1",
           "train.cpus_per_worker=1", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
           "model.vision_hidden_size=16"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list((out / "ray").rglob("state.json")):
        time.sleep(0.2)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive, "training ended before the kill; nothing was tested"
    assert not (out / "metrics.json").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    rows = json.loads((built / "manifest.json").read_text())["counts"]["batches"]
    assert m["step"] == rows * 30 and m["final"]
    assert m["resumed_from_step"] >= 2 and m["resumed_from_step"] % 2 == 0
    assert sum(m["samples_seen"].values()) == m["step"] * B  # the whole run's, across the kill


@pytest.mark.ray
def test_wrist_view_runs_collect_to_train_to_eval(tmp_path, ray_local, init_ckpt):
    """env.wrist end to end on real robosuite: oracle demos with both views → the real data pipeline → a scratch
    model with 2 views → eval, which turns the wrist camera on from the checkpoint alone; a 1-view --init on
    2-view data is refused, and so is a 1-view reference for the dataset's reference stage."""
    from apo_ray import model as M
    from apo_ray.config import DataConfig
    from apo_ray.data import build_dataset
    from apo_ray.evaluate import evaluate
    from apo_ray.rollout import RolloutSpec, RunOptions, collect
    from apo_ray.schema import column_to_numpy, read_table
    from apo_ray.trainer import train

    collect(RolloutSpec("lift", "nominal", "oracle", str(tmp_path / "demos"), horizon=12, wrist=True), range(2),
            RunOptions(workers=1, progress=False))
    ep = read_table(next((tmp_path / "demos" / "episodes").glob("*.parquet")), columns=["image"])
    assert column_to_numpy(ep.column("image")).shape == (12, 64, 128, 3)
    build_dataset([], [tmp_path / "demos" / "episodes"], tmp_path / "ds", DataConfig(), vocab_size=M.VOCAB_SIZE)
    cfg = tiny_cfg(objective="bc", max_steps=2)
    train(tmp_path / "ds", "scratch", tmp_path / "bc", cfg)
    assert M.read_meta(tmp_path / "bc")["image_views"] == 2
    model, _, _ = M.load_policy(tmp_path / "bc")
    assert model.config.n_image_tokens == 32
    r = evaluate(RolloutSpec("lift", "nominal", str(tmp_path / "bc" / "checkpoint"), str(tmp_path / "ev"), horizon=3),
                 [100], RunOptions(workers=1, progress=False))
    assert r["episodes"] == 1
    ev = read_table(next((tmp_path / "ev" / "episodes").glob("*.parquet")), columns=["image"])
    assert column_to_numpy(ev.column("image")).shape == (3, 64, 128, 3)
    with pytest.raises(UserError, match="takes 1 camera view"):
        train(tmp_path / "ds", init_ckpt, tmp_path / "ft", cfg)
    with pytest.raises(UserError, match="reference checkpoint takes 1 camera view"):
        build_dataset([], [tmp_path / "demos" / "episodes"], tmp_path / "ds_ref", DataConfig(),
                      ref_checkpoint=init_ckpt, vocab_size=M.VOCAB_SIZE)
    assert not (tmp_path / "ds_ref").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_hf_kind_with_lora_trains_through_ray_train(tmp_path, ray_local, init_ckpt):
    """model.kind hf, the config switch for OpenVLA-7B + LoRA: a tiny VLA exported as an HF remote-code dir
    trains through the same Ray Train + DeepSpeed trainer. BC from the base gives an adapter-only checkpoint; the
    dataset's reference stage scores with it; APO warm-starts from it with the cached reference, and again with
    a live replica (ZeRO-3), and both land on the same loss; the result acts as a policy."""
    import dataclasses

    from apo_ray import model as M
    from apo_ray.bench.data import synth_episodes
    from apo_ray.config import DataConfig
    from apo_ray.data import build_dataset
    from apo_ray.trainer import train
    from apo_ray.vla_policy import VLAPolicy

    hf_dir = M.export_hf(init_ckpt, tmp_path / "hf_vla")
    synth_episodes(tmp_path / "episodes", episodes=4, steps=30, image_size=IMG)
    base = tmp_path / "ds0"
    build_dataset([tmp_path / "episodes"], [], base, DataConfig(), vocab_size=M.VOCAB_SIZE)

    def cfg(**t):
        c = tiny_cfg(workers=1, epochs=1, max_steps=2, grad_accum=1, **t)
        return dataclasses.replace(c, model=dataclasses.replace(c.model, kind="hf", path=str(hf_dir), lora_r=4))

    bc = train(base, "scratch", tmp_path / "bc", cfg(objective="bc", zero_stage=2))
    assert bc["step"] == 2 and np.isfinite(bc["loss"])
    ck = tmp_path / "bc" / "checkpoint"
    assert (ck / "adapter" / "adapter_model.safetensors").is_file() and not (ck / "model.safetensors").exists()
    assert M.read_meta(ck)["kind"] == "hf"

    ds = tmp_path / "ds1"
    build_dataset([tmp_path / "episodes"], [], ds, DataConfig(), ref_checkpoint=str(ck), vocab_size=M.VOCAB_SIZE)
    cached = train(ds, str(ck), tmp_path / "apo_cached", cfg(objective="apo", zero_stage=2, lr=0.0))
    live = train(ds, str(ck), tmp_path / "apo_live", cfg(objective="apo", zero_stage=3, lr=0.0, reference="live"))
    assert cached["reference"] == "cached" and live["reference"] == "live"
    # lr 0: the policy stays π_ref, so both see log-ratios of 0 and the same KTO loss
    assert abs(cached["r_D"]) < 1e-4 and abs(live["r_D"]) < 1e-4
    assert cached["loss"] == pytest.approx(live["loss"], abs=1e-5)
    pol = VLAPolicy(tmp_path / "apo_cached" / "checkpoint", threads=1)
    a = pol.act([{"image": np.zeros((IMG, IMG, 3), np.uint8), "instruction": "lift the cube"}])
    assert a.shape == (1, 7) and np.isfinite(a).all()


@pytest.fixture(scope="module")
def correct_heavy(tmp_path_factory, ray_local):
    """The real pipeline on a correct-pool-heavy set: 2 policy episodes (one takeover of 6 corrector steps) and
    6 demo episodes, 3 fresh schedules (data.epochs=3). An epoch is 3 micro-batches (ceil(6 interaction / 2))."""
    from apo_ray import model as M
    from apo_ray.bench.data import synth_episodes
    from apo_ray.config import DataConfig
    from apo_ray.data import build_dataset

    root = tmp_path_factory.mktemp("heavy")
    synth_episodes(root / "episodes", episodes=2, steps=30, image_size=IMG)
    synth_episodes(root / "demos", episodes=6, steps=30, image_size=IMG, seed=1)
    build_dataset([root / "episodes"], [root / "demos"], root / "ds", DataConfig(epochs=3), vocab_size=M.VOCAB_SIZE)
    return root / "ds"


def _tb_losses(run: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.mark.ray
def test_a_kept_pass_replays_exactly_what_reading_the_shards_again_gives(tmp_path, correct_heavy, monkeypatch):
    """7 epochs over 3 schedules are 3 passes. Kept in memory, the shards are read once; with the cache off
    (pass_cache_mb=0) every pass is read, and a worker killed inside the second pass resumes by reading it. Both
    give the same per-step losses."""
    from apo_ray.trainer import train

    cfg = {"objective": "bc", "checkpoint_every": 2, "epochs": 7}
    kept = train(correct_heavy, "scratch", tmp_path / "kept", tiny_cfg(**cfg))
    monkeypatch.setenv("APO_RAY_FAIL_AT_STEP", "11")  # pass 2 (steps 10-18), resumed from step 10
    read = train(correct_heavy, "scratch", tmp_path / "read", tiny_cfg(pass_cache_mb=0, **cfg))
    assert kept["passes_read"] == 1 and read["passes_read"] == 2 and read["resumed_from_step"] == 10
    a, b = _tb_losses(tmp_path / "kept"), _tb_losses(tmp_path / "read")
    assert sorted(a) == sorted(b) == list(range(1, 22))
    assert all(b[step] == a[step] for step in a), (a, b)
    assert len({round(v, 6) for v in a.values()}) == 21  # the losses move, so equal curves are a real check
    assert kept["samples_seen"] == read["samples_seen"] and kept["distinct_seen"] == read["distinct_seen"]


@pytest.mark.ray
def test_fresh_epochs_cover_the_correct_pool_and_resume_mid_epoch_exactly(tmp_path, correct_heavy, monkeypatch):
    """3 epochs see ~(1-(1-p)^3)/p x the distinct correct samples of 1 epoch (each epoch draws a fresh schedule;
    before, every epoch replayed the first one's). A run killed mid-epoch 2 and resumed from its step-4
    checkpoint reproduces the uninterrupted run's per-step losses and coverage."""
    from apo_ray.trainer import train

    m = json.loads((correct_heavy / "manifest.json").read_text())
    per_pool, n = m["counts"]["per_pool"], m["counts"]["batches"]
    assert n == 3 and m["counts"]["batch_composition"] == {"correct": 4, "interaction": 2, "incorrect": 2}
    cfg = {"objective": "bc", "checkpoint_every": 2}
    one = train(correct_heavy, "scratch", tmp_path / "one", tiny_cfg(epochs=1, **cfg))
    three = train(correct_heavy, "scratch", tmp_path / "three", tiny_cfg(epochs=3, **cfg))
    n_c = per_pool["correct"]
    p = n * 4 / n_c  # share of the correct pool one epoch shows
    assert one["samples_seen"] == {"correct": n * 4, "interaction": n * 2, "incorrect": n * 2}
    assert three["samples_seen"] == {"correct": 3 * n * 4, "interaction": 3 * n * 2, "incorrect": 3 * n * 2}
    assert one["distinct_seen"]["correct"] == n * 4  # a fresh permutation: no repeats within an epoch
    assert one["distinct_seen"]["interaction"] == three["distinct_seen"]["interaction"] == per_pool["interaction"]
    want = n_c * (1 - (1 - p) ** 3)
    sd = (n_c * (1 - (1 - p) ** 3) * (1 - p) ** 3) ** 0.5
    got = three["distinct_seen"]["correct"]
    print(f"correct pool {n_c}, p={p:.4f}: distinct 1 epoch {one['distinct_seen']['correct']}, 3 epochs {got} "
          f"(by hand {want:.1f} ± {sd:.1f}); seen {one['samples_seen']} / {three['samples_seen']}")
    assert abs(got - want) <= 3 * sd
    assert got >= 2.4 * one["distinct_seen"]["correct"]  # about 3x (2.84x by hand at this p), not 1x

    monkeypatch.setenv("APO_RAY_FAIL_AT_STEP", "5")  # epoch 2 of 3, its second step; checkpoint at step 4
    resumed = train(correct_heavy, "scratch", tmp_path / "resumed", tiny_cfg(epochs=3, **cfg))
    assert (tmp_path / "resumed" / ".fault-injected-5").exists() and resumed["resumed_from_step"] == 4
    a, b = _tb_losses(tmp_path / "three"), _tb_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
    assert len({round(v, 6) for v in a.values()}) == 9  # the losses move, so equal curves are a real check
    assert resumed["samples_seen"] == three["samples_seen"] and resumed["distinct_seen"] == three["distinct_seen"]
