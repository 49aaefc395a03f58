"""Data pipeline: pure relabel/filter/balance functions on literal arrays, then the Ray Data pipeline on small
hand-made episode Parquet files whose every number can be checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apo_ray import actions as A
from apo_ray import data as D
from apo_ray import schema as S
from apo_ray.config import DataConfig
from apo_ray.errors import UserError

ENV_META = {"env_name": "Lift", "type": 1, "env_kwargs": {"control_freq": 20}}
IMG = 8


# ---------------------------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("c, k, want", [
    # intervention at t=3, K=5: only t=0..2 exist before it (never across the episode start)
    ([1, 1, 1, 2, 2, 1, 1], 5, [0, 0, 0, 2, 2, 1, 1]),
    # two interventions; the second's window stops at the first's corrector steps
    ([1, 1, 1, 1, 2, 2, 1, 1, 2, 1], 3, [1, 0, 0, 0, 2, 2, 0, 0, 2, 1]),
    # intervention at t=0: nothing before it
    ([2, 2, 1, 1, 1], 5, [2, 2, 1, 1, 1]),
    # no intervention
    ([1, 1, 1, 1], 5, [1, 1, 1, 1]),
    # K=0 relabels nothing
    ([1, 1, 2], 0, [1, 1, 2]),
])
def test_relabel(c: list[int], k: int, want: list[int]) -> None:
    np.testing.assert_array_equal(D.relabel(np.array(c, np.int8), k), want)


def test_filter_mask_counts() -> None:
    a = np.zeros((5, 7))
    a[0, :3] = [0.5, 0, 0]      # kept
    a[1, 0] = 1.5               # out of range
    a[2, :6] = 0.005            # idle: sum 0.03 < 0.05
    a[3, :2] = [0.04, 0.02]     # sum 0.06: kept
    a[4, 6] = -1.2              # gripper out of range (also idle, counted once as out of range)
    keep, dropped = D.filter_mask(a)
    np.testing.assert_array_equal(keep, [True, False, False, True, False])
    assert dropped == {"out_of_range": 2, "idle": 1}


def test_filter_runs_before_relabel_so_k_counts_kept_steps() -> None:
    n = 7
    act = np.full((n, 7), 0.0)
    act[:, 0] = 0.5
    act[4, 0] = 0.0  # idle step right before... t=4, dropped
    ep = {S.T: np.arange(n)[::-1].copy(), S.ACTION: act[::-1].copy(),  # rows given out of order
          S.C: np.array([1, 1, 1, 1, 1, 1, 2])[::-1].copy()}
    out, dropped = D.label_episode(ep, DataConfig(k=2), is_expert=False)
    np.testing.assert_array_equal(out[S.T], np.arange(n))
    np.testing.assert_array_equal(out["keep"], [1, 1, 1, 1, 0, 1, 1])
    # kept steps before the intervention at t=6: t=5 and t=3 (t=4 was dropped)
    np.testing.assert_array_equal(out[S.C][out["keep"]], [1, 1, 1, 0, 0, 2])
    assert dropped == {"out_of_range": 0, "idle": 1}
    out, _ = D.label_episode(ep, DataConfig(k=2), is_expert=True)
    assert set(out[S.C].tolist()) == {1}  # expert demos are desirable, never relabelled


def test_pools_slots_schedule() -> None:
    pool = D.pool_of(np.array([1, 2, 0, 1, 2]), np.array([1, 0, 0, 0, 0], bool))
    np.testing.assert_array_equal(pool, [0, 1, 2, 0, 1])
    assert D.batch_slots((0.5, 0.25, 0.25), 8, (10, 5, 3)) == (4, 2, 2)
    assert D.batch_slots((0.5, 0.25, 0.25), 8, (10, 0, 3)) == (5, 0, 3)  # no interventions: share moves
    assert D.batch_slots((0.5, 0.25, 0.25), 8, (10, 0, 0)) == (8, 0, 0)  # BC-only round
    assert D.num_batches((10, 5, 3), (4, 2, 2)) == 3  # driven by the interaction pool: ceil(5/2)
    assert D.num_batches((10, 0, 0), (8, 0, 0)) == 2
    picks = D.schedule((10, 5, 3), (4, 2, 2), 3, seed=0)
    assert [p.shape for p in picks] == [(3, 4), (3, 2), (3, 2)]
    assert sorted(picks[1].reshape(-1)[:5].tolist()) == [0, 1, 2, 3, 4]  # every interaction step once
    assert sorted(picks[2].reshape(-1)[:3].tolist()) == [0, 1, 2]  # small pool cycles: full pass first
    again = D.schedule((10, 5, 3), (4, 2, 2), 3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(picks, again, strict=True))
    other = D.schedule((10, 5, 3), (4, 2, 2), 3, seed=0, epoch=1)  # each epoch draws afresh
    assert not all(np.array_equal(a, b) for a, b in zip(picks, other, strict=True))
    assert sorted(other[1].reshape(-1)[:5].tolist()) == [0, 1, 2, 3, 4]


def test_fresh_schedules_cover_a_large_pool_as_computed_by_hand() -> None:
    """Lift round-1-like pools (correct 7,400 / interaction 1,167 / incorrect 125) at 4/2/2: an epoch is 584
    batches (ceil(1167/2)) and shows 2,336 correct samples. A fixed schedule shows those same 2,336 (32%) every
    epoch; fresh schedules reach n(1-(1-p)^k) distinct ones after k epochs (p = 2336/7400), every interaction
    step exactly once per epoch."""
    sizes, slots = (7400, 1167, 125), (4, 2, 2)
    n = D.num_batches(sizes, slots)
    assert n == 584
    p = n * 4 / 7400
    seen: set[int] = set()
    got = []
    for e in range(5):
        picks = D.schedule(sizes, slots, n, seed=0, epoch=e)
        assert len(np.unique(picks[0])) == n * 4  # within an epoch no correct sample repeats
        assert sorted(picks[1].reshape(-1)[:1167].tolist()) == list(range(1167))
        seen |= set(picks[0].reshape(-1).tolist())
        got.append(len(seen))
    want = [7400 * (1 - (1 - p) ** k) for k in range(1, 6)]
    assert got[0] == 2336
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) < 0.01 * 7400, (got, want)  # within 1% of the pool (about 1.7 binomial sd)
    # measured: 2,336 / 3,974 / 5,041 / 5,801 / 6,296 (85%) after 1..5 epochs; by hand 2,336 / 3,935 / 5,029 /
    # 5,777 / 6,289. With p = 0.32 three epochs give (1-(1-p)^3)/p = 2.15x one epoch's (3x needs a small p)
    assert got[2] / got[0] == pytest.approx((1 - (1 - p) ** 3) / p, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Parquet inputs


def episode(eid: str, c: list[int], *, actions: np.ndarray | None = None, oracle_actions: np.ndarray | None = None,
            instruction: str = "lift the cube", views: int = 1) -> pa.Table:
    """Actions are distinct per step (a[0] = 0.01 * t + 0.1, gripper ±1) so rows can be traced in the output.
    ``views=2``: agentview + wrist side by side, the wrist half 100 levels brighter."""
    n = len(c)
    t = np.arange(n)
    if actions is None:
        actions = np.zeros((n, 7), np.float32)
        actions[:, 0] = 0.1 + 0.01 * t + (0.3 if eid.startswith("demo") else 0.0)
        actions[:, 6] = np.where(t % 2 == 0, -1.0, 1.0)
    iid = np.full(n, -1)
    steps = {
        S.EPISODE_ID: eid, S.ROUND: 0, S.TASK: "lift", S.SCENARIO: "nominal", S.SEED: 0, S.T: t.astype(np.int32),
        S.IMAGE: (np.full((n, IMG, IMG * views, 3), 7, np.uint8) + t[:, None, None, None].astype(np.uint8)
                  + np.repeat(np.arange(views, dtype=np.uint8) * 100, IMG)[None, None, :, None]),
        S.PROPRIO: np.zeros((n, 9), np.float32), S.ACTION: actions,
        S.ORACLE_ACTION: actions if oracle_actions is None else oracle_actions,
        S.C: np.array(c, np.int8), S.INTERVENTION_ID: iid.astype(np.int32), S.REWARD: np.zeros(n, np.float32),
        S.DONE: np.arange(n) == n - 1, S.SUCCESS: False, S.INSTRUCTION: instruction, S.POLICY_VERSION: "test",
        S.STATE: [np.zeros(4)] * n,
    }
    return S.episode_table(steps, ENV_META)


def write(dirpath: Path, tables: dict[str, pa.Table]) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, dirpath / f"{name}.parquet")
    return dirpath


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    eps = write(root / "round0" / "episodes", {
        # e0: intervention at t=3 -> t=0..2 become c=0 (K=5); 10 steps
        "e0": episode("e0", [1, 1, 1, 2, 2, 1, 1, 1, 1, 1]),
        # e1: two interventions (t=4, t=9), K=5 -> t=0..3 and t=6..8 become 0
        "e1": episode("e1", [1, 1, 1, 1, 2, 2, 1, 1, 1, 2, 1, 1]),
        # e2: no intervention, 8 policy steps
        "e2": episode("e2", [1] * 8),
    })
    demos = write(root / "demos" / "episodes", {"demo0": episode("demo0", [1] * 6)})
    return eps, demos


def read_rows(out: Path) -> list[dict]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))
    rows = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in table.to_pylist()]
    return sorted(rows, key=lambda r: r["batch_id"])


@pytest.mark.ray
def test_pipeline_end_to_end(ray_local, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    eps, demos = inputs
    cfg = DataConfig(k=5)
    out = tmp_path / "ds"
    summary = D.build_dataset([eps], [demos], out, cfg, vocab_size=1000)
    # kept steps: 10 + 12 + 8 + 6 = 36 (nothing filtered: every a[0] >= 0.1)
    # c=0: e0 t0..2 (3) + e1 t0..3, t6..8 (7) = 10; c=2: 2 + 3 = 5; correct = 36 - 10 - 5 = 21
    assert summary["rows"] == 36 and summary["undesirable"] == 10 and summary["desirable"] == 26
    assert summary["pools"] == {"correct": 21, "interaction": 5, "incorrect": 10}
    assert summary["dropped"] == {"out_of_range": 0, "idle": 0}
    assert summary["skipped"] is False and summary["shards"] >= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["batches"] == 3  # ceil(5 interaction / 2 per batch)
    assert manifest["counts"]["per_class"] == {"0": 10, "1": 21, "2": 5}
    assert manifest["counts"]["expert"] == 6
    assert {i["role"] for i in manifest["inputs"]} == {"episodes", "demos"}
    assert sum(s["rows"] for s in manifest["shards"]) == 3
    stats = manifest["action_stats"]

    rows = read_rows(out)
    assert [r["batch_id"] for r in rows] == [0, 1, 2]
    seen_interaction = set()
    want_c0 = {("e0", t) for t in range(3)} | {("e1", t) for t in (0, 1, 2, 3, 6, 7, 8)}
    for r in rows:
        assert r["pool"] == [0, 0, 0, 0, 1, 1, 2, 2]  # the exact ratio in every micro-batch
        assert np.asarray(r["image"]).shape == (8, IMG, IMG, 3)
        for j in range(8):
            eid, t, c = r["episode_id"][j], r["t"][j], r["c"][j]
            assert ((eid, t) in want_c0) == (c == 0)
            assert r["is_expert"][j] == eid.startswith("demo")
            if r["pool"][j] == 1:
                assert c == 2
                seen_interaction.add((eid, t))
            assert r["image"][j][0][0][0] == 7 + t  # the step's own image travelled with it
            assert r["instruction"][j] == "lift the cube"
            act = np.array(r["action"][j], np.float32)
            np.testing.assert_array_equal(r["action_tokens"][j], A.tokenize(act, stats, 1000))
            assert all(744 <= x < 1000 for x in r["action_tokens"][j])
    assert seen_interaction == {("e0", 3), ("e0", 4), ("e1", 4), ("e1", 5), ("e1", 9)}

    # same inputs + config -> same hash -> skipped
    again = D.build_dataset([eps], [demos], out, cfg, vocab_size=1000)
    assert again["skipped"] is True and again["dataset_hash"] == summary["dataset_hash"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # a different config -> a different hash, rebuilt in place
    other = D.build_dataset([eps], [demos], out, DataConfig(k=1), vocab_size=1000)
    assert other["dataset_hash"] != summary["dataset_hash"] and other["undesirable"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.ray
def test_one_fresh_schedule_per_epoch_and_a_hash_over_every_data_key(ray_local, inputs: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    """data.epochs=3: three schedules, each in its own shards in epoch order (batch ids e·3 + b), each with the
    exact 4/2/2 composition and every interaction step once, and not all alike. The dataset hash covers every
    DataConfig key: changing only demo_label rebuilds."""
    eps, demos = inputs
    out = tmp_path / "ds"
    s = D.build_dataset([eps], [demos], out, DataConfig(epochs=3), vocab_size=1000)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["batches"] == 3 and m["counts"]["schedules"] == 3
    assert [sh["epoch"] for sh in m["shards"]] == sorted(sh["epoch"] for sh in m["shards"])
    rows = read_rows(out)
    assert [r["batch_id"] for r in rows] == list(range(9))
    by_epoch = []
    for e in range(3):
        rs = rows[3 * e: 3 * e + 3]
        assert all(r["pool"] == [0, 0, 0, 0, 1, 1, 2, 2] for r in rs)
        inter = sorted((r["episode_id"][j], r["t"][j]) for r in rs for j in (4, 5))
        assert len(inter) == 6 and len(set(inter)) == 5  # all 5 interaction steps, one of them cycled again
        by_epoch.append([r["sample_id"] for r in rs])
        for r in rs:  # a sample_id names one step, whatever batch it lands in
            for j in range(8):
                assert r["sample_id"][j] >= 0
    assert by_epoch[0] != by_epoch[1] and by_epoch[1] != by_epoch[2]
    ids = {}
    for r in rows:
        for j in range(8):
            assert ids.setdefault(r["sample_id"][j], (r["episode_id"][j], r["t"][j])) == (r["episode_id"][j], r["t"][j])
    # every DataConfig key is hashed (the manifest's config is what the hash covers)
    flat = {**m["config"], **m["config"]["filters"]}
    assert set(DataConfig.__dataclass_fields__) <= set(flat), set(DataConfig.__dataclass_fields__) - set(flat)
    again = D.build_dataset([eps], [demos], out, DataConfig(epochs=3), vocab_size=1000)
    assert again["skipped"] is True
    relabel = D.build_dataset([eps], [demos], out, DataConfig(epochs=3, demo_label="oracle"), vocab_size=1000)
    assert relabel["skipped"] is False and relabel["dataset_hash"] != s["dataset_hash"]
    assert json.loads((out / "manifest.json").read_text())["config"]["demo_label"] == "oracle"


@pytest.mark.ray
def test_dart_demos_train_on_the_recorded_oracle_action(ray_local, tmp_path: Path) -> None:
    n = 6
    executed = np.zeros((n, 7), np.float32)
    executed[:, 0] = [0.5, 0.6, -0.2, 0.01, 0.9, 0.3]   # noisy; t=3 is near-idle (|a| sum 0.01 < 0.05)
    clean = np.zeros((n, 7), np.float32)
    clean[:, 0] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]        # the oracle's, all kept
    demos = write(tmp_path / "demos", {"demo0": episode("demo0", [1] * n, actions=executed, oracle_actions=clean)})
    # a policy episode whose recorded oracle differs too: only demos are relabelled
    eps = write(tmp_path / "eps", {"e0": episode("e0", [1] * 4, oracle_actions=np.ones((4, 7), np.float32))})
    for label, want_demo, rows in (("action", executed, 9), ("oracle", clean, 10)):  # executed t=3 is idle
        out = tmp_path / label
        s = D.build_dataset([eps], [demos], out, DataConfig(batch_size=2, demo_label=label), vocab_size=300)
        assert s["rows"] == rows and s["dropped"]["idle"] == 10 - rows  # the filter saw the label, not the noise
        got = {(r["episode_id"][j], r["t"][j]): r["action"][j] for r in read_rows(out) for j in range(2)}
        for t in range(n):
            if ("demo0", t) in got:
                np.testing.assert_allclose(got[("demo0", t)], want_demo[t], atol=1e-7)
        assert len({k for k in got if k[0] == "demo0"}) == rows - 4
        np.testing.assert_allclose(got[("e0", 2)][0], 0.12, atol=1e-7)  # the executed action, as collected
        stats = json.loads((out / "manifest.json").read_text())["action_stats"]
        assert (stats["min"][0], stats["max"][0]) == pytest.approx((-0.2, 0.9) if label == "action" else (0.1, 0.6))


@pytest.mark.ray
def test_pipeline_without_interventions(ray_local, tmp_path: Path) -> None:
    eps = write(tmp_path / "eps", {"e": episode("e", [1] * 9)})
    s = D.build_dataset([eps], [], tmp_path / "ds", DataConfig(batch_size=4), vocab_size=300)
    assert s["pools"] == {"correct": 9, "interaction": 0, "incorrect": 0} and s["undesirable"] == 0
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["counts"]["batch_composition"] == {"correct": 4, "interaction": 0, "incorrect": 0}
    assert m["counts"]["batches"] == 3


def _error(tmp_path: Path, tables: dict[str, pa.Table]) -> str:
    eps = write(tmp_path / "bad", tables)
    with pytest.raises(UserError) as e:
        D.build_dataset([eps], [], tmp_path / "ds", DataConfig(), vocab_size=300)
    return e.value.line()


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    line = _error(tmp_path, {"ok": episode("ok", [1] * 3), "x": episode("x", [1] * 3).drop_columns([S.C])})
    assert "x.parquet" in line and "column c" in line and "missing column" in line


def test_wrong_dtype_and_image_shape(tmp_path: Path) -> None:
    t = episode("x", [1] * 3)
    t = t.set_column(t.schema.get_field_index(S.C), S.C, pa.array([1, 1, 1], pa.int64()))
    line = _error(tmp_path / "a", {"x": t})
    assert "x.parquet" in line and "column c" in line and "int64" in line
    t = episode("y", [1] * 3)
    t = t.set_column(t.schema.get_field_index(S.IMAGE), S.IMAGE, S.tensor_array(np.zeros((3, 8, 6, 3), np.uint8)))
    line = _error(tmp_path / "b", {"y": t})
    assert "y.parquet" in line and "column image" in line and "(8, 6, 3)" in line


@pytest.mark.ray
def test_corrupt_and_empty_inputs(ray_local, tmp_path: Path) -> None:
    eps = write(tmp_path / "bad", {"x": episode("x", [1] * 3)})
    data = (eps / "x.parquet").read_bytes()
    (eps / "x.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e:
        D.build_dataset([eps], [], tmp_path / "ds", DataConfig())
    assert "x.parquet" in e.value.line() and "unreadable" in e.value.line()
    # a valid footer over damaged data pages: found while reading, still named by file and column
    good = write(tmp_path / "pages", {"a": episode("a", [1] * 3)})
    pq.write_table(episode("y", [1] * 40), good / "y.parquet", compression="zstd")
    raw = bytearray((good / "y.parquet").read_bytes())
    raw[200:4000] = bytes(3800)
    (good / "y.parquet").write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        D.build_dataset([good], [], tmp_path / "ds", DataConfig())
    assert "y.parquet" in e.value.line() and "column " in e.value.line()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        D.build_dataset([tmp_path / "empty"], [], tmp_path / "ds", DataConfig())
    assert "no episode files" in e.value.line() and "empty" in e.value.line()


@pytest.mark.ray
def test_all_filtered_and_bad_labels(ray_local, tmp_path: Path) -> None:
    line = _error(tmp_path / "a", {"x": episode("x", [1] * 3, actions=np.full((3, 7), 2.0, np.float32))})
    assert "filtered out" in line and "out_of_range" in line
    line = _error(tmp_path / "b", {"x": episode("x", [1, 0, 2])})
    assert "x.parquet" in line and "column c" in line


def test_ref_stage_columns() -> None:
    """RefLogp on one literal micro-batch row, with a reference whose log-prob is worked out by hand:
    every token has log-prob -(token % 7) / 10 and EOS has -0.5."""
    def make():
        def fn(mb, token_sets):
            assert [t.shape for t in token_sets] == [(len(mb[S.C]), 7)] * 3
            return [np.concatenate([-(t % 7) / 10, np.full((len(t), 1), -0.5)], axis=1) for t in token_sets]
        return fn

    tok = np.arange(3 * 7, dtype=np.int32).reshape(1, 3, 7) + 100
    row = {D.BATCH_ID: pa.array([0], pa.int64())}
    for name in D.SAMPLE_COLUMNS:
        if name in (S.INSTRUCTION, S.EPISODE_ID):
            row[name] = pa.array([["a", "b", "c"]], pa.list_(pa.string()))
        else:
            row[name] = S.tensor_array(np.zeros((1, 3, 7), np.int32))
    row[D.ACTION_TOKENS] = S.tensor_array(tok)
    oracle = tok[:, ::-1].copy()
    oracle[0, 0, :5] = tok[0, 0, :5]  # row 0 differs from its oracle in its last 2 tokens, row 1 in none
    row[D.ORACLE_TOKENS] = S.tensor_array(oracle)
    row[S.C] = S.tensor_array(np.ones((1, 3), np.int8))
    out = D.RefLogp(make)(pa.table(row))
    base = -(tok[0] % 7).sum(axis=1) / 10
    np.testing.assert_allclose(S.column_to_numpy(out[D.REF_LOGP])[0], base - 0.5, atol=1e-6)
    np.testing.assert_allclose(S.column_to_numpy(out[D.REF_LOGP_U])[0], base, atol=1e-6)
    np.testing.assert_allclose(S.column_to_numpy(out[D.REF_KL_LOGP])[0], np.roll(base, -1), atol=1e-6)
    orc = -(oracle[0] % 7).sum(axis=1) / 10
    np.testing.assert_allclose(S.column_to_numpy(out[D.REF_LOGP_ORACLE])[0], orc - 0.5, atol=1e-6)
    np.testing.assert_allclose(S.column_to_numpy(out[D.REF_LOGP_U_DIFFER])[0],
                               [-(tok[0, 0, 5:] % 7).sum() / 10, 0.0, base[2]], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# end to end through the CLI, on episodes from `apo-ray collect`


def _cli_json(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    from apo_ray.cli import main

    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.ray
@pytest.mark.slow  # ~1-2 min on 2 busy cores, mostly rendering rollouts
def test_cli_end_to_end_on_collected_episodes(ray_local, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    eps, demos = tmp_path / "noisy", tmp_path / "oracle"
    c = _cli_json(["collect", "--task", "lift", "--policy", "noisy-oracle:0.5", "--episodes", "3", "--workers", "2",
                   "--seed", "0", "--round", "1", "--image-size", "64", "--out", str(eps)], capsys)
    assert c["intervention_steps"] > 0
    _cli_json(["collect", "--task", "lift", "--policy", "oracle", "--episodes", "1", "--workers", "1", "--seed", "50",
               "--no-corrector", "--image-size", "64", "--out", str(demos)], capsys)
    h5 = _cli_json(["export-hdf5", "--episodes", str(demos / "episodes"), "--out", str(tmp_path / "demos.hdf5")],
                   capsys)
    assert h5["demos"] == 1

    # what the pipeline must find, counted straight from the files
    files = sorted((eps / "episodes").glob("*.parquet"))
    kept_corrector = starts = 0
    for f in files:
        t = pq.read_table(f)
        keep, _ = D.filter_mask(S.column_to_numpy(t[S.ACTION]))
        cc = t[S.C].to_numpy()[keep]
        kept_corrector += int((cc == 2).sum())
        starts += int(((cc == 2) & (np.r_[0, cc[:-1]] != 2)).sum())

    demo_kept = sum(int(D.filter_mask(S.column_to_numpy(pq.read_table(f)[S.ACTION]))[0].sum())
                    for f in (demos / "episodes").glob("*.parquet"))
    for demo_arg in (str(demos / "episodes"), str(tmp_path / "demos.hdf5")):  # either form of expert demos
        out = tmp_path / f"ds-{Path(demo_arg).suffix or 'dir'}"
        s = _cli_json(["dataset", "--episodes", str(eps / "episodes"), "--demos", demo_arg, "--out", str(out),
                       "--k", "5"], capsys)
        assert list(s) == ["rows", "desirable", "undesirable", "pools", "dropped", "shards", "rows_per_s"]
        assert s["pools"]["interaction"] == kept_corrector
        assert 0 < s["undesirable"] <= 5 * starts
        m = json.loads((out / "manifest.json").read_text())
        assert m["counts"]["expert"] == demo_kept
        rows = read_rows(out)
        assert len(rows) == m["counts"]["batches"] == -(-kept_corrector // 2)
        for r in rows:
            assert r["pool"] == [0, 0, 0, 0, 1, 1, 2, 2]
            assert np.asarray(r["image"]).shape == (8, 64, 64, 3)
            assert all(x == "lift the red cube" for x in r["instruction"])
    # same command again: skipped, same manifest
    before = (out / "manifest.json").read_text()
    _cli_json(["dataset", "--episodes", str(eps / "episodes"), "--demos", str(tmp_path / "demos.hdf5"), "--out",
               str(out), "--k", "5"], capsys)
    assert (out / "manifest.json").read_text() == before


@pytest.mark.ray
def test_reference_stage_matches_live_reference(ray_local, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """The ref_* columns written by the pipeline equal a live forward pass of the same checkpoint (1e-5)."""
    from apo_ray import model as M
    from apo_ray.config import ModelConfig

    eps, demos = inputs
    stats = A.action_stats(np.random.default_rng(0).uniform(-1, 1, (50, 7)))
    model, proc = M.build_model(ModelConfig(), stats, image_size=64, instructions=["lift the cube"])
    ckpt = M.save_checkpoint(model, proc, tmp_path / "ref")
    out = tmp_path / "ds"
    D.build_dataset([eps], [demos], out, DataConfig(), ref_checkpoint=str(ckpt), vocab_size=M.VOCAB_SIZE)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["reference"]["checkpoint"] == str(Path(ckpt).resolve())
    assert set(D.REF_COLUMNS) <= set(manifest["columns"])
    table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))
    ref, rproc, _ = M.load_policy(ckpt)
    for i in range(table.num_rows):
        row = {n: S.column_to_numpy(table[n].slice(i, 1))[0] for n in (S.IMAGE, S.PROPRIO, D.ACTION_TOKENS,
                                                                       D.ORACLE_TOKENS, *D.REF_COLUMNS)}
        live = M.reference_logps(ref, rproc, row[S.IMAGE], table[S.INSTRUCTION][i].as_py(), row[D.ACTION_TOKENS],
                                 row[D.ORACLE_TOKENS], row[S.PROPRIO], group=8)
        for name in D.REF_COLUMNS:
            np.testing.assert_allclose(row[name], live[name], atol=1e-5, rtol=0)
