"""``apo-ray bench data``: the dataset pipeline's throughput against a raw pyarrow read -> write of the same
episode files, measured in the same run (the pipeline reads every file twice, shuffles, tokenizes and writes
balanced micro-batches; the raw copy is the floor any Parquet-to-Parquet job pays)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from apo_ray import schema as S

GOAL_RATIO = 0.5


def synth_episodes(out: Path, episodes: int, steps: int, image_size: int, seed: int = 0) -> list[Path]:
    """Random episodes in the collect schema: policy steps with one corrector takeover in about half of them
    (rates like the paper's Fig. 3c). Throughput depends on sizes, not on what the pixels show."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for e in range(episodes):
        n = steps
        c = np.ones(n, np.int8)
        iid = np.full(n, S.NO_INTERVENTION, np.int32)
        if e % 2 == 0:
            start = int(rng.integers(n // 4, n // 2))
            c[start: start + n // 5] = S.C_CORRECTOR
            iid[start: start + n // 5] = 0
        a = rng.uniform(-1, 1, (n, 7)).astype(np.float32)
        oracle = a.copy()  # the oracle agrees on corrector steps and on rotation + gripper, not on translation
        oracle[c != S.C_CORRECTOR, :3] = rng.uniform(-1, 1, (int((c != S.C_CORRECTOR).sum()), 3))
        steps_ = {
            S.EPISODE_ID: f"bench-{e:05d}", S.ROUND: 1, S.TASK: "lift", S.SCENARIO: "nominal", S.SEED: e,
            S.T: np.arange(n, dtype=np.int32), S.IMAGE: rng.integers(0, 255, (n, image_size, image_size, 3), np.uint8),
            S.PROPRIO: rng.normal(size=(n, S.PROPRIO_DIM)).astype(np.float32), S.ACTION: a, S.ORACLE_ACTION: oracle,
            S.C: c, S.INTERVENTION_ID: iid, S.REWARD: np.zeros(n, np.float32), S.DONE: np.arange(n) == n - 1,
            S.SUCCESS: True, S.INSTRUCTION: "lift the red cube", S.POLICY_VERSION: "bench",
            S.STATE: list(rng.normal(size=(n, 32))),
        }
        p = out / f"bench-{e:05d}.parquet"
        pq.write_table(S.episode_table(steps_, {"env_name": "Lift", "type": 1}), p, compression="zstd")
        paths.append(p)
    return paths


def _raw_copy(files: list[Path], out: Path) -> float:
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in files:
        pq.write_table(pq.read_table(f), out / f.name)
    return time.perf_counter() - t0


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from apo_ray.config import DataConfig
    from apo_ray.data import build_dataset
    from apo_ray.ray_utils import ray_session

    work = Path(tempfile.mkdtemp(prefix="apo-bench-data-"))
    try:
        if args.episodes:
            src = Path(args.episodes)
            files = sorted(src.rglob("*.parquet"))
        else:
            src = work / "episodes"
            files = synth_episodes(src, args.n_episodes, args.steps, args.image_size)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        t0 = time.perf_counter()
        with ray_session(args.address):
            ray_start = time.perf_counter() - t0
            raw, pipe = [], []
            for i in range(args.repeats):  # interleaved, so a shift in machine load hits both sides
                raw.append(_raw_copy(files, work / f"raw{i}"))
                t0 = time.perf_counter()  # a fresh output dir each time: no skip on an existing dataset
                summary = build_dataset([src], [], work / f"ds{i}", DataConfig(), vocab_size=512)
                pipe.append(time.perf_counter() - t0)
        raw_s = min(raw)
        raw_rps, pipe_rps = rows / raw_s, rows / min(pipe)
        return {"bench": "data", "files": len(files), "rows": rows, "repeats": args.repeats,
                "raw_rows_per_s": round(raw_rps, 1), "pipeline_rows_per_s": round(pipe_rps, 1),
                "pipeline_first_s": round(pipe[0], 2), "pipeline_best_s": round(min(pipe), 2),
                "raw_best_s": round(raw_s, 3), "ray_start_s": round(ray_start, 2), "ratio": round(pipe_rps / raw_rps, 3), "goal": GOAL_RATIO,
                "pools": summary["pools"], "meets_goal": pipe_rps / raw_rps >= GOAL_RATIO}
    finally:
        shutil.rmtree(work, ignore_errors=True)
