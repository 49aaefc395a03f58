"""The bad-input corpus (tests/bad_inputs/cases.yaml): every case is a real `apo-ray` process on real files.

Good fixtures (episodes, a dataset built by the real Ray Data pipeline, a tiny checkpoint) are built once and
shared by both xdist workers; each case breaks its own copy, so a case that damaged good data would show up as
a changed fixture hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from apo_ray import schema as S

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = yaml.safe_load((HERE / "bad_inputs" / "cases.yaml").read_text())
VICTIM = "bench-00001.parquet"  # the episode file the episode mutations break


def _cli(argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "APO_RAY_DEBUG"}
    return subprocess.run([sys.executable, "-m", "apo_ray", *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _build(root: Path) -> None:
    from apo_ray import model as M
    from apo_ray.bench.data import synth_episodes
    from apo_ray.config import ModelConfig

    synth_episodes(root / "eps", episodes=4, steps=30, image_size=64)
    synth_episodes(root / "eps_noint", episodes=2, steps=30, image_size=64, seed=1)
    for f in (root / "eps_noint").glob("*.parquet"):  # a round where the corrector never took over
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index(S.C), S.C, pa.array(np.ones(t.num_rows, np.int8)))
        t = t.set_column(t.schema.get_field_index(S.INTERVENTION_ID), S.INTERVENTION_ID,
                         pa.array(np.full(t.num_rows, S.NO_INTERVENTION, np.int32)))
        pq.write_table(t.replace_schema_metadata(pq.read_schema(f).metadata), f)
    for eps, ds in (("eps", "ds"), ("eps_noint", "ds_noint")):
        r = _cli(["dataset", "--episodes", str(root / eps), "--out", str(root / ds)])
        assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads((root / "ds" / "manifest.json").read_text())["action_stats"]
    m, proc = M.build_model(ModelConfig(), stats, 64, ["lift the red cube"], seed=0)
    M.save_checkpoint(m, proc, root / "ckpt")
    small, sproc = M.build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), stats, 64,
                                 ["lift the red cube"], seed=0)
    M.save_checkpoint(small, sproc, root / "ckpt_small")
    (root / "empty").mkdir()
    (root / "ready").write_text("1")


@pytest.fixture(scope="session")
def good(tmp_path_factory) -> Path:
    """Built once across xdist workers (their session temp dirs share a parent)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "bad-inputs-good"
    with FileLock(str(root) + ".lock"):
        if not (root / "ready").exists():
            shutil.rmtree(root, ignore_errors=True)
            _build(root)
    return root


# ---------------------------------------------------------------------------------------------- mutations
def _rewrite(f: Path, fn) -> None:
    t = pq.read_table(f)
    pq.write_table(fn(t).replace_schema_metadata(t.schema.metadata), f)


def _set(t: pa.Table, name: str, arr) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _actions(t: pa.Table, row: int, value: float) -> pa.Table:
    a = S.column_to_numpy(t.column(S.ACTION)).copy()
    a[row, 2] = value
    return _set(t, S.ACTION, S.tensor_array(a))


def _shard(d: Path) -> Path:
    return d / "shards" / "part-00000.parquet"


def _manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


MUTATIONS = {
    "truncate": lambda d: (d / VICTIM).write_bytes((d / VICTIM).read_bytes()[:1000]),
    "garbage": lambda d: (d / VICTIM).write_bytes(os.urandom(4096)),
    "drop_c": lambda d: _rewrite(d / VICTIM, lambda t: t.drop_columns([S.C])),
    "extra_column": lambda d: _rewrite(d / VICTIM, lambda t: t.append_column("velocity", pa.array(
        np.zeros(t.num_rows, np.float32)))),
    "c_int64": lambda d: _rewrite(d / VICTIM, lambda t: _set(t, S.C, pa.array(np.ones(t.num_rows, np.int64)))),
    "image_8x6": lambda d: _rewrite(d / VICTIM, lambda t: _set(t, S.IMAGE, S.tensor_array(
        np.zeros((t.num_rows, 8, 6, 3), np.uint8)))),
    "image_32": lambda d: _rewrite(d / VICTIM, lambda t: _set(t, S.IMAGE, S.tensor_array(
        np.zeros((t.num_rows, 32, 32, 3), np.uint8)))),
    "nan_action": lambda d: _rewrite(d / VICTIM, lambda t: _actions(t, 3, float("nan"))),
    "inf_action": lambda d: _rewrite(d / VICTIM, lambda t: _actions(t, 5, float("inf"))),
    "empty_episode": lambda d: _rewrite(d / VICTIM, lambda t: t.slice(0, 0)),
    "c_label_5": lambda d: _rewrite(d / VICTIM, lambda t: _set(t, S.C, pa.array(np.full(t.num_rows, 5, np.int8)))),
    "repeated_t": lambda d: _rewrite(d / VICTIM, lambda t: _set(t, S.T, pa.array(np.zeros(t.num_rows, np.int32)))),
    "truncate_shard": lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-100]),
    "flip_byte": lambda d: _shard(d).write_bytes(_flip(_shard(d).read_bytes())),
    "stray_shard": lambda d: shutil.copy(_shard(d), d / "shards" / "part-09999.parquet"),
    "drop_manifest": lambda d: (d / "manifest.json").unlink(),
    "no_stats": lambda d: _manifest(d, lambda m: m.update(action_stats={})),
    "vocab_600": lambda d: _manifest(d, lambda m: m["config"].update(vocab_size=600)),
    "other_stats": lambda d: _manifest(d, lambda m: m["action_stats"].update(q99=[0.5] * 7)),
    "other_weights": lambda d: shutil.copy(d.parent / "ckpt_small" / "model.safetensors", d / "model.safetensors"),
    "short_tokenizer": lambda d: _short_tokenizer(d / "tokenizer.json"),
    "corrupt_meta": lambda d: (d / "apo_vla.json").write_text('{"kind": "tiny", '),
}


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def _short_tokenizer(path: Path) -> None:
    """A tokenizer from another vocabulary: one action token short, so every action id is off by one."""
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    drop = next(k for k in vocab if k.startswith("<extra_"))
    gone = vocab.pop(drop)
    tok["model"]["vocab"] = {k: (v - 1 if v > gone else v) for k, v in vocab.items()}
    path.write_text(json.dumps(tok))


# ---------------------------------------------------------------------------------------------- the corpus
def test_corpus_is_large_and_unique():
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    used = {c["mutate"][1] for c in CASES if "mutate" in c}
    assert used == set(MUTATIONS), set(MUTATIONS) ^ used


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input(case: dict, good: Path, tmp_path: Path) -> None:
    fixtures = {name: good / name for name in ("eps", "ds", "ds_noint", "ckpt")}
    before = {name: _tree_hash(p) for name, p in fixtures.items()}
    subs = {**{k: str(v) for k, v in fixtures.items()}, "out": str(tmp_path / "out"), "cfg": str(HERE / "bad_inputs" /
            "configs"), "src": str(ROOT), "empty": str(good / "empty")}
    if "mutate" in case:
        what, how = case["mutate"]
        copy = tmp_path / what
        shutil.copytree(fixtures[what], copy)
        if what == "ckpt":
            shutil.copytree(good / "ckpt_small", tmp_path / "ckpt_small")
        MUTATIONS[how](copy)
        subs[what] = str(copy)
    r = _cli([a.format(**subs) for a in case["argv"]])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == case.get("rc", 2), r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    line = lines[0]
    assert "; fix: " in line and " (" in line, line
    for want in case["expect"]:
        assert want in line, f"{want!r} not in {line!r}"
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists(), "a failed command left output behind"
    assert {name: _tree_hash(p) for name, p in fixtures.items()} == before, "good data changed"
