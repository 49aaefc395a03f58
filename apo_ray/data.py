"""Episodes -> APO training set, as a Ray Data pipeline (apo_spec.md §1-2, docs/ARCHITECTURE.md).

Two passes over the episode Parquet files, both ``read_parquet -> map_batches/groupby``:

1. **Labels** (light columns only): group by episode, filter (|a|>1, near-idle), then relabel the K kept policy
   steps before each intervention start as undesirable. The per-step labels are small and come back to the
   driver, which computes the action statistics and the balanced batch schedule (pure numpy).
2. **Batches** (all columns): each step is normalized, tokenized and copied into every (batch, slot) the
   schedule gives it; ``groupby(batch_id)`` assembles one row per balanced micro-batch, an optional reference
   stage adds the frozen reference's log-probs, and ``write_parquet`` writes the shards.

The pure functions (:func:`filter_mask`, :func:`relabel`, :func:`label_episode`, :func:`pool_of`,
:func:`batch_slots`, :func:`schedule`) work on plain ndarrays / ``dict[str, ndarray]`` and are tested on literal
values; the Ray stages only route data through them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apo_ray import actions as A
from apo_ray import schema as S
from apo_ray.config import DataConfig
from apo_ray.errors import UserError
from apo_ray.fsio import TMP_PREFIX, atomic_dir, sha256_dir, sha256_file, write_json
from apo_ray.ray_utils import cluster_offers, ray_session

DATASET_SCHEMA_VERSION = 2
"""2: one balanced schedule per epoch (``data.epochs``), schedules seeded by (seed, epoch), a ``sample_id`` column."""
DEFAULT_VOCAB_SIZE = 32064
"""Llama-2 tokenizer + OpenVLA padding; the tiny model passes its own ``vocab_size``."""

POOL_CORRECT, POOL_INTERACTION, POOL_INCORRECT = 0, 1, 2
POOL_NAMES = ("correct", "interaction", "incorrect")
FILTER_NAMES = ("out_of_range", "idle")

PATH = "path"  # added by read_parquet(include_paths=True)
BATCH_ID = "batch_id"
SLOT = "slot"
IS_EXPERT = "is_expert"
SAMPLE_ID = "sample_id"  # the kept step's index in the plan's deterministic order: identifies it across batches
POOL = "pool"
ACTION_NORM = "action_norm"
ACTION_BINS = "action_bins"
ACTION_TOKENS = "action_tokens"
ORACLE_TOKENS = "oracle_tokens"
REF_LOGP, REF_LOGP_U, REF_KL_LOGP, REF_LOGP_ORACLE = "ref_logp", "ref_logp_u", "ref_kl_logp", "ref_logp_oracle"
REF_LOGP_U_DIFFER = "ref_logp_u_differ"
REF_COLUMNS = (REF_LOGP, REF_LOGP_U, REF_KL_LOGP, REF_LOGP_ORACLE, REF_LOGP_U_DIFFER)
TARGET_PARTITION_BYTES = 32 << 20

# Columns of one output row (one micro-batch); every one but batch_id has leading dim B.
SAMPLE_COLUMNS = (S.IMAGE, S.PROPRIO, S.INSTRUCTION, S.ACTION, ACTION_NORM, ACTION_BINS, ACTION_TOKENS,
                  ORACLE_TOKENS, S.C, POOL, IS_EXPERT, S.EPISODE_ID, S.T, SAMPLE_ID)

LIGHT_COLUMNS = (S.EPISODE_ID, S.T, S.ACTION, S.C, S.INTERVENTION_ID)
HEAVY_COLUMNS = (S.EPISODE_ID, S.T, S.IMAGE, S.PROPRIO, S.INSTRUCTION, S.ACTION, S.ORACLE_ACTION)
REQUIRED_COLUMNS = tuple(dict.fromkeys(LIGHT_COLUMNS + HEAVY_COLUMNS))
KNOWN_COLUMNS = frozenset([*S.SCALAR_TYPES, *S.TENSOR_COLUMNS, S.STATE])


# --------------------------------------------------------------------------------------------------------------
# Pure functions


def filter_mask(action: np.ndarray, max_abs: float = 1.0, idle_threshold: float = 0.05
                ) -> tuple[np.ndarray, dict[str, int]]:
    """Which steps survive the paper code's filters, and how many each filter drops.

    ``out_of_range``: any |a| > max_abs (NaN counts as out of range). ``idle``: sum(|a[:6]|) < idle_threshold,
    counted among the steps the first filter kept, so the two counts add up to the total dropped.
    """
    a = np.asarray(action, dtype=np.float64)
    in_range = np.all(np.abs(a) <= max_abs, axis=1)
    moving = np.abs(a[:, :6]).sum(axis=1) >= idle_threshold
    keep = in_range & moving
    return keep, {"out_of_range": int((~in_range).sum()), "idle": int((in_range & ~moving).sum())}


def relabel(c: np.ndarray, k: int) -> np.ndarray:
    """One episode's kept steps in time order: the K policy steps (c=1) before each intervention start -> c=0.

    An intervention starts at a corrector step (c=2) whose predecessor is not one. The window walks back over
    policy steps only: it stops at the episode start and at an earlier intervention's corrector steps, so it
    never reaches into another episode or intervention (the paper code's bug, apo_spec.md §1).
    """
    c = np.asarray(c).astype(np.int8, copy=True)
    src = c.copy()  # decide starts and windows on the input labels, not on relabelled ones
    for i in np.flatnonzero(src == S.C_CORRECTOR):
        if i > 0 and src[i - 1] == S.C_CORRECTOR:
            continue
        j = i - 1
        while j >= 0 and i - j <= k and src[j] == S.C_POLICY:
            c[j] = S.C_UNDESIRABLE
            j -= 1
    return c


def label_episode(ep: dict[str, np.ndarray], cfg: DataConfig, is_expert: bool
                  ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Filter then relabel one episode (rows in any order). Filtering first means K counts kept steps, as in
    the paper's code. Expert demonstrations are desirable: their c is 1 and they are never relabelled.

    Returns the episode sorted by t with ``keep`` (bool) and relabelled ``c`` for every input step (dropped
    steps keep their input c), plus the per-filter drop counts.
    """
    order = np.argsort(ep[S.T], kind="stable")
    out = {name: np.asarray(v)[order] for name, v in ep.items()}
    keep, dropped = filter_mask(out[S.ACTION], cfg.max_abs_action, cfg.idle_threshold)
    c = np.asarray(out[S.C]).astype(np.int8)
    if is_expert:
        c = np.full_like(c, S.C_POLICY)
    else:
        c[keep] = relabel(c[keep], cfg.k)
    out["keep"], out[S.C] = keep, c
    return out, dropped


def pool_of(c: np.ndarray, is_expert: np.ndarray) -> np.ndarray:
    """correct = expert + desirable policy steps, interaction = corrector steps, incorrect = c=0."""
    c = np.asarray(c)
    pool = np.full(c.shape, POOL_CORRECT, dtype=np.int8)
    pool[(c == S.C_CORRECTOR) & ~np.asarray(is_expert, dtype=bool)] = POOL_INTERACTION
    pool[c == S.C_UNDESIRABLE] = POOL_INCORRECT
    return pool


def batch_slots(ratios: Iterable[float], batch_size: int, sizes: Iterable[int]) -> tuple[int, ...]:
    """Samples per pool in every micro-batch: ``ratios * batch_size`` by largest remainder.

    An empty pool's share goes to the others in proportion (e.g. a round without interventions is all
    correct), so each batch is still full; the manifest records the composition actually used.
    """
    sizes = list(sizes)
    r = np.array([x if n > 0 else 0.0 for x, n in zip(ratios, sizes, strict=True)], dtype=np.float64)
    if r.sum() <= 0:
        if sum(sizes) == 0:
            raise ValueError("all pools are empty")
        r = (np.array(sizes) > 0).astype(np.float64)
    share = r / r.sum() * batch_size
    slots = np.floor(share + 1e-9).astype(int)
    for i in np.argsort(-(share - slots), kind="stable")[: batch_size - slots.sum()]:
        slots[i] += 1
    return tuple(int(s) for s in slots)


def num_batches(sizes: Iterable[int], slots: Iterable[int]) -> int:
    """Epoch length: enough batches to show every interaction step once (the pool that drives the paper's
    sampler); without interaction steps, enough to show every step of the slowest pool once."""
    sizes, slots = list(sizes), list(slots)
    if sizes[POOL_INTERACTION] > 0 and slots[POOL_INTERACTION] > 0:
        return math.ceil(sizes[POOL_INTERACTION] / slots[POOL_INTERACTION])
    return max(math.ceil(n / s) for n, s in zip(sizes, slots, strict=True) if s > 0)


def schedule(sizes: Iterable[int], slots: Iterable[int], n_batches: int, seed: int, epoch: int = 0
             ) -> list[np.ndarray]:
    """Pool-local sample indices per batch of one epoch: one (n_batches, slots[p]) int array per pool.

    Each pool is drawn in passes; every pass is a fresh permutation seeded by (seed, epoch, pool, pass), so a pool
    smaller than the epoch cycles, every epoch draws afresh (the paper's sampler reshuffles with seed + epoch),
    and the result depends only on these arguments. A pool larger than its share of the epoch shows each epoch a
    fresh subset: after k epochs a sample has been drawn with probability 1 - (1 - need/n)^k.
    """
    out = []
    for p, (n, s) in enumerate(zip(sizes, slots, strict=True)):
        need = n_batches * s
        idx = np.empty(need, dtype=np.int64)
        for cyc in range(math.ceil(need / n) if n else 0):
            perm = np.random.default_rng([seed, epoch, p, cyc]).permutation(n)
            lo = cyc * n
            idx[lo: lo + n] = perm[: need - lo]
        out.append(idx.reshape(n_batches, s))
    return out


# --------------------------------------------------------------------------------------------------------------
# Input discovery and validation (driver side, cheap: Parquet footers only)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input not found: {path}", str(path), "pass an episodes dir written by apo-ray collect")
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(TMP_PREFIX))


def _dtype_of(typ: pa.DataType) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(value dtype, per-row shape) of a tensor-extension or fixed-shape-tensor column; None otherwise."""
    shape = getattr(typ, "shape", None)
    if shape is None or not isinstance(typ, pa.ExtensionType):
        return None
    return np.dtype(typ.storage_type.value_type.to_pandas_dtype()), tuple(shape)


def validate_schema(path: Path, image_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """Check one episode file's columns, dtypes and image shape; return its image shape (H, W, 3)."""
    S.register_tensor_types()

    try:
        sch = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise UserError(f"unreadable episode file ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                        f"{path}, column *", "re-collect it or remove it from the input dir") from None
    if pq.read_metadata(path).num_rows == 0:
        raise UserError("episode file holds no steps", f"{path}, rows", "re-collect it or remove it from the input dir")
    extra = [n for n in sch.names if n not in KNOWN_COLUMNS]
    if extra:
        raise UserError(f"unexpected column '{extra[0]}' (schema v{S.SCHEMA_VERSION} does not have it)",
                        f"{path}, column {extra[0]}", "write episodes with apo_ray.schema.episode_table")
    for name in REQUIRED_COLUMNS:
        if name not in sch.names:
            raise UserError(f"missing column '{name}'", f"{path}, column {name}",
                            "write episodes with apo_ray.schema.episode_table (apo-ray collect)")
        typ = sch.field(name).type
        if name in S.TENSOR_COLUMNS:
            want_dtype, want_shape = S.TENSOR_COLUMNS[name]
            got = _dtype_of(typ)
            if got is None or got[0] != want_dtype:
                raise UserError(f"column '{name}' has type {typ}, expected a {want_dtype} tensor column",
                                f"{path}, column {name}", "write episodes with apo_ray.schema.episode_table")
            shape = got[1]
            if name == S.IMAGE:
                if len(shape) != 3 or shape[2] != 3 or not S.image_views(shape[0], shape[1]):
                    raise UserError(f"image shape {shape}, expected (H, H, 3), or (H, 2H, 3) with the wrist view",
                                    f"{path}, column {name}", "store square RGB images (apo-ray collect)")
                if image_shape is not None and shape != image_shape:
                    raise UserError(f"image shape {shape} differs from the other inputs' {image_shape}",
                                    f"{path}, column {name}", "build one dataset per image size")
                image_shape = shape
            elif shape != want_shape:
                raise UserError(f"column '{name}' has shape {shape}, expected {want_shape}",
                                f"{path}, column {name}", "write episodes with apo_ray.schema.episode_table")
        elif typ != S.SCALAR_TYPES[name]:
            raise UserError(f"column '{name}' has type {typ}, expected {S.SCALAR_TYPES[name]}",
                            f"{path}, column {name}", "write episodes with apo_ray.schema.episode_table")
    assert image_shape is not None
    return image_shape


# --------------------------------------------------------------------------------------------------------------
# Ray Data stages (plain functions / classes on dict[str, ndarray]; wrapped by map_batches at the call site)


def _label_block(batch: dict[str, np.ndarray], cfg: DataConfig, expert_paths: frozenset[str]
                 ) -> dict[str, np.ndarray]:
    """map_batches UDF (whole read blocks): filter + relabel every episode in the block, keep the labels.

    An episode file is far below Ray's block size, so a read block holds whole episodes and no shuffle is
    needed; the ``block`` column lets the driver check that no episode was split across blocks.
    """
    keys = np.char.add(np.asarray(batch[PATH]).astype(str),
                       np.char.add("\0", np.asarray(batch[S.EPISODE_ID]).astype(str)))
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    parts = []
    for rows in np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1]) if len(counts) else []:
        path = str(batch[PATH][rows[0]])
        c_in = np.asarray(batch[S.C])[rows]
        bad = ~np.isin(c_in, (S.C_POLICY, S.C_CORRECTOR))
        if bad.any():
            raise UserError(f"c = {int(c_in[bad][0])} in an episode file; collected steps are 1 (policy) or "
                            "2 (corrector)", f"{path}, column c", "re-collect the episode")
        act = np.asarray(batch[S.ACTION])[rows]
        if not np.isfinite(act).all():
            i = int(np.flatnonzero(~np.isfinite(act).all(axis=1))[0])
            raise UserError(f"non-finite action {np.round(act[i], 3).tolist()} at t={int(np.asarray(batch[S.T])[rows][i])}",
                            f"{path}, column action", "re-collect the episode; NaN/inf actions are never trained on")
        if len(np.unique(batch[S.T][rows])) != len(rows):
            raise UserError("repeated t within one episode", f"{path}, column t", "store one row per step")
        out, _ = label_episode({n: np.asarray(batch[n])[rows] for n in LIGHT_COLUMNS}, cfg, path in expert_paths)
        out[PATH] = np.full(len(rows), path, dtype=object)
        parts.append(out)
    if not parts:  # an empty read block
        parts = [{PATH: np.array([], object), S.EPISODE_ID: np.array([], object), S.T: np.array([], np.int32),
                  "keep": np.array([], bool), S.C: np.array([], np.int8), S.ACTION: np.zeros((0, 7), np.float32)}]
    out = {k: np.concatenate([p[k] for p in parts]) for k in (PATH, S.EPISODE_ID, S.T, "keep", S.C, S.ACTION)}
    out["block"] = np.full(len(out[S.T]), uuid.uuid4().hex, dtype=object)
    return out


def _explode(batch: dict[str, np.ndarray], plan: dict[str, np.ndarray], path_ids: dict[str, int],
             stats: dict[str, Any], vocab_size: int, n_bins: int,
             action_tokens: str = A.ASCENDING) -> dict[str, np.ndarray]:
    """map_batches UDF: drop filtered steps, normalize + tokenize, and copy each kept step into every
    (batch_id, slot) the schedule gives it (a step of a small pool appears in several batches)."""
    import pandas as pd

    keys = pd.DataFrame({
        "path_id": pd.Series(batch[PATH]).map(path_ids).to_numpy(np.int64),
        S.EPISODE_ID: np.asarray(batch[S.EPISODE_ID], dtype=object), S.T: np.asarray(batch[S.T], np.int64),
        "_row": np.arange(len(batch[S.T])),
    })
    m = keys.merge(pd.DataFrame(plan), on=["path_id", S.EPISODE_ID, S.T], how="inner")
    rows = m["_row"].to_numpy()
    action = np.asarray(batch[S.ACTION])[rows]
    norm = A.normalize(action, stats)
    bins = A.to_bins(norm, n_bins)
    return {
        BATCH_ID: m[BATCH_ID].to_numpy(np.int64), SLOT: m[SLOT].to_numpy(np.int32),
        S.IMAGE: np.asarray(batch[S.IMAGE])[rows], S.PROPRIO: np.asarray(batch[S.PROPRIO])[rows],
        S.INSTRUCTION: np.asarray(batch[S.INSTRUCTION], dtype=object)[rows], S.ACTION: action,
        # tokens follow the model's convention (ascending bins, or OpenVLA's descending ids and 0..1 gripper)
        ACTION_NORM: norm, ACTION_BINS: bins, ACTION_TOKENS: A.tokenize(action, stats, vocab_size, n_bins, action_tokens),
        ORACLE_TOKENS: A.tokenize(np.asarray(batch[S.ORACLE_ACTION])[rows], stats, vocab_size, n_bins, action_tokens),
        S.C: m[S.C].to_numpy(np.int8), POOL: m[POOL].to_numpy(np.int8), IS_EXPERT: m[IS_EXPERT].to_numpy(bool),
        S.EPISODE_ID: m[S.EPISODE_ID].to_numpy(object), S.T: m[S.T].to_numpy(np.int32),
        SAMPLE_ID: m[SAMPLE_ID].to_numpy(np.int64),
    }


def _assemble(batch: dict[str, np.ndarray], batch_size: int) -> pa.Table:
    """groupby(batch_id) UDF: the samples of one micro-batch, in slot order, become one row."""
    if len(batch[SLOT]) != batch_size:
        raise RuntimeError(f"batch {batch[BATCH_ID][0]} has {len(batch[SLOT])} samples, expected {batch_size}")
    order = np.argsort(batch[SLOT], kind="stable")
    cols: dict[str, pa.Array] = {BATCH_ID: pa.array([int(batch[BATCH_ID][0])], pa.int64())}
    for name in SAMPLE_COLUMNS:
        v = np.asarray(batch[name])[order]
        if name in (S.INSTRUCTION, S.EPISODE_ID):
            cols[name] = pa.array([[str(x) for x in v]], pa.list_(pa.string()))
        else:
            cols[name] = S.tensor_array(v[None])
    return pa.table(cols)


LogpFn = Callable[[dict[str, np.ndarray], list[np.ndarray]], list[np.ndarray]]
"""``fn(micro_batch, token_sets) -> per_token``: for each set of tokens (B, 7) int32, the per-token log-probs
(B, 8) of those tokens then EOS under the frozen reference, ``micro_batch`` being one output row as arrays with
leading dim B. One call scores every set, so the observations are encoded once."""


class RefLogp:
    """map_batches stage (an actor: the reference model loads once) adding the reference log-probs.

    Per micro-batch: ``ref_logp`` (action tokens + EOS, the desirable reward), ``ref_logp_u`` (action tokens
    only, the undesirable reward), ``ref_kl_logp`` (row i+1's action tokens within the micro-batch, wrapping,
    the KL term's mismatched pair), ``ref_logp_oracle`` (oracle tokens + EOS, DPO's chosen side) and
    ``ref_logp_u_differ`` (only the action tokens that differ from the oracle's, ``train.undesirable_tokens``).
    The trainer then needs no reference forward pass.
    """

    def __init__(self, make_logp_fn: Callable[[], LogpFn]) -> None:
        self.fn = make_logp_fn()

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = {name: S.column_to_numpy(table[name]) for name in SAMPLE_COLUMNS
                if name not in (S.INSTRUCTION, S.EPISODE_ID)}
        lists = {name: table[name].to_pylist() for name in (S.INSTRUCTION, S.EPISODE_ID)}
        out: dict[str, list[np.ndarray]] = {name: [] for name in REF_COLUMNS}
        for i in range(table.num_rows):
            mb = {name: v[i] for name, v in cols.items()}
            mb.update({name: np.asarray(v[i], dtype=object) for name, v in lists.items()})
            tok, oracle = mb[ACTION_TOKENS], mb[ORACLE_TOKENS]
            own, kl, orc = (np.asarray(x, np.float64) for x in self.fn(mb, [tok, np.roll(tok, -1, axis=0), oracle]))
            out[REF_LOGP].append(own.sum(axis=1))
            out[REF_LOGP_U].append(own[:, :7].sum(axis=1))
            out[REF_LOGP_U_DIFFER].append((own[:, :7] * (tok != oracle)).sum(axis=1))
            out[REF_KL_LOGP].append(kl[:, :7].sum(axis=1))
            out[REF_LOGP_ORACLE].append(orc.sum(axis=1))
        for name in REF_COLUMNS:
            table = table.append_column(name, S.tensor_array(np.stack(out[name]).astype(np.float32)))
        return table


def _model_logp_fn(checkpoint: str) -> LogpFn:
    """The reference log-prob function of a trained checkpoint (provided by apo_ray.model)."""
    try:
        from apo_ray import model
    except ModuleNotFoundError as e:
        if e.name != "apo_ray.model":
            raise
        raise UserError("the reference stage needs apo_ray.model, which is not in this tree yet",
                        f"--ref-checkpoint {checkpoint}", "build the dataset without a reference checkpoint") from None
    return model.reference_logp_fn(checkpoint)


# --------------------------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for this pipeline, restored afterwards (the context is process-global)."""
    import ray
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.use_datasource_v2, ctx.shuffle_strategy,
             ctx.raise_original_map_exception)
    ctx.enable_progress_bars = sys.stderr.isatty()  # progress on a terminal only; logs stay quiet
    ctx.print_on_execution_start = False
    # Measured on 2 cores, 100 episode files: Ray 2.60's ReadFilesParquetV2 took 15 s to read them, the v1
    # reader 0.7 s; the default actor-based hash shuffle took 10 s for groupby(batch_id), the task-based
    # sort shuffle 2.8 s.
    ctx.use_datasource_v2 = False
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.raise_original_map_exception = True  # a UserError from a stage reaches the CLI as one line
    try:
        yield
    finally:
        (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.use_datasource_v2,
         ctx.shuffle_strategy, ctx.raise_original_map_exception) = saved


def _user_error_in(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, unwrapped from Ray's exception wrappers."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, UserError):
            return UserError(x.what, x.where, x.fix)
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    return None


def _locate_unreadable(paths: list[str]) -> UserError | None:
    """After a failed read: the first (file, column) pyarrow cannot decode, for a precise error line."""
    for p in paths:
        for name in REQUIRED_COLUMNS:
            try:
                pq.read_table(p, columns=[name])
            except Exception as e:  # noqa: BLE001
                return UserError(f"corrupt episode file ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                                 f"{p}, column {name}", "re-collect it or remove it from the input dir")
    return None


def _execute(fn: Callable[[], Any], paths: list[str]) -> Any:
    try:
        return fn()
    except Exception as e:
        err = _user_error_in(e) or _locate_unreadable(paths)
        if err is not None:
            raise err from None
        raise


def _concat(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [b for b in batches if len(next(iter(b.values()))) > 0]
    if not parts:
        return {}
    return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def _dataset_hash(inputs: list[dict[str, Any]], config: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """Content hashes (not paths) + config: moving the inputs keeps the hash, editing one changes it."""
    key = {"schema_version": DATASET_SCHEMA_VERSION, "inputs": sorted((i["role"], i["sha256"]) for i in inputs),
           "config": config, "reference": reference and reference["sha256"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _checkpoint_stats(ckpt: Path) -> dict[str, Any]:
    from apo_ray.checkpoint import read_meta

    stats = read_meta(ckpt).get("action_stats")
    if not stats:
        raise UserError("reference checkpoint has no action statistics", str(ckpt), "retrain or restore the checkpoint")
    return stats


def summary_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The CLI's JSON line, from a manifest."""
    c = manifest["counts"]
    return {
        "rows": c["rows"],
        "desirable": c["rows"] - c["per_class"]["0"],
        "undesirable": c["per_class"]["0"],
        "pools": dict(c["per_pool"]),
        "dropped": dict(c["dropped"]),
        "shards": len(manifest["shards"]),
        "rows_per_s": manifest["timing"]["rows_per_s"],
    }


def _plan(labels: dict[str, np.ndarray], expert_paths: frozenset[str], cfg: DataConfig,
          fixed_stats: dict[str, Any] | None = None
          ) -> tuple[list[dict[str, np.ndarray]], dict[str, int], dict[str, Any], dict[str, Any]]:
    """Driver-side numpy: statistics (unless ``fixed_stats``), pools and one batch schedule per epoch
    (``max(1, data.epochs)``) from the labels. Epoch e's batches get ids e·n_batches + b."""
    # deterministic order whatever order Ray returned the groups in
    order = np.lexsort((labels[S.T], labels[PATH].astype(str), labels[S.EPISODE_ID].astype(str)))
    lab = {k: v[order] for k, v in labels.items()}
    keep, dropped = filter_mask(lab[S.ACTION], cfg.max_abs_action, cfg.idle_threshold)
    kept = {k: v[keep] for k, v in lab.items()}
    if not keep.any():
        raise UserError(f"all {len(keep)} steps were filtered out ({dropped})", "data.max_abs_action / "
                        "data.idle_threshold", "check the inputs' actions or the filter thresholds")
    stats = fixed_stats if fixed_stats is not None else A.action_stats(kept[S.ACTION])
    is_expert = np.array([p in expert_paths for p in kept[PATH]], dtype=bool)
    pool = pool_of(kept[S.C], is_expert)
    sizes = [int((pool == p).sum()) for p in range(3)]
    slots = batch_slots(cfg.ratios, cfg.batch_size, sizes)
    n_batches = num_batches(sizes, slots)
    members = [np.flatnonzero(pool == p) for p in range(3)]
    paths = sorted(set(kept[PATH].tolist()))
    path_ids = {p: i for i, p in enumerate(paths)}
    kept_path_id = np.array([path_ids[p] for p in kept[PATH]], dtype=np.int64)
    epochs = max(1, cfg.epochs)
    plans = []
    for e in range(epochs):
        picks = schedule(sizes, slots, n_batches, cfg.seed, e)
        idx = np.concatenate([members[p][picks[p]] for p in range(3) if slots[p] > 0], axis=1)  # (n_batches, B)
        flat = idx.reshape(-1)
        plans.append({
            "path_id": kept_path_id[flat],
            S.EPISODE_ID: kept[S.EPISODE_ID][flat].astype(object), S.T: kept[S.T][flat].astype(np.int64),
            BATCH_ID: np.repeat(np.arange(e * n_batches, (e + 1) * n_batches, dtype=np.int64), cfg.batch_size),
            SLOT: np.tile(np.arange(cfg.batch_size, dtype=np.int32), n_batches),
            S.C: kept[S.C][flat], POOL: pool[flat], IS_EXPERT: is_expert[flat], SAMPLE_ID: flat.astype(np.int64),
        })
    counts = {
        "input_rows": int(len(keep)), "rows": int(keep.sum()), "batches": n_batches, "schedules": epochs,
        "samples": n_batches * cfg.batch_size,
        "episodes": int(len({(p, e) for p, e in zip(lab[PATH], lab[S.EPISODE_ID], strict=True)})),
        "per_class": {str(c): int((kept[S.C] == c).sum()) for c in (0, 1, 2)},
        "expert": int(is_expert.sum()),
        "per_pool": {POOL_NAMES[p]: sizes[p] for p in range(3)},
        "batch_composition": {POOL_NAMES[p]: slots[p] for p in range(3)},
        "dropped": dropped,
    }
    return plans, path_ids, stats, counts


def build_dataset(episode_dirs: Iterable[str | os.PathLike[str]], demo_paths: Iterable[str | os.PathLike[str]],
                  out_dir: str | os.PathLike[str], cfg: DataConfig, *, ref_checkpoint: str | None = None,
                  vocab_size: int = DEFAULT_VOCAB_SIZE, action_tokens: str = A.ASCENDING,
                  address: str | None = None) -> dict[str, Any]:
    """Episodes (+ expert demos: episode dirs or robomimic HDF5 files) -> ``out_dir/shards`` + manifest.

    Returns the summary (``summary_of``) plus ``skipped`` and ``dataset_hash``. The dataset is built in a temp
    dir beside ``out_dir`` and renamed into place; if ``out_dir`` already holds a dataset with the same hash
    (same input contents, config, vocab size and reference), nothing is rebuilt.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    episode_dirs, demo_paths = list(episode_dirs), list(demo_paths)
    if vocab_size < cfg.n_bins:
        raise UserError(f"vocab_size {vocab_size} < {cfg.n_bins} action bins", "--vocab-size",
                        "pass the model's vocabulary size")
    inputs: list[dict[str, Any]] = []
    for d in episode_dirs:
        inputs += [{"role": "episodes", "path": str(p.resolve())} for p in _parquet_files(Path(d))]
    for d in demo_paths:
        d = Path(d)
        if d.suffix in (".hdf5", ".h5"):
            if not d.is_file():
                raise UserError(f"demo file not found: {d}", str(d), "pass a robomimic .hdf5 file")
            inputs.append({"role": "demos_hdf5", "path": str(d.resolve())})
        else:
            inputs += [{"role": "demos", "path": str(p.resolve())} for p in _parquet_files(d)]
    if not inputs:
        raise UserError("no episode files found", " ".join(map(str, [*episode_dirs, *demo_paths])) or "inputs",
                        "pass dirs that hold *.parquet episodes (apo-ray collect --out DIR writes DIR/episodes)")
    image_shape = None  # Parquet footers, before Ray starts: a malformed file costs no cluster start
    for i in inputs:
        if i["role"] != "demos_hdf5":
            image_shape = validate_schema(Path(i["path"]), image_shape)
    seen: dict[str, str] = {}
    for i in inputs:
        if i["path"] in seen:  # the same steps twice would double their weight in training
            raise UserError(f"episode file given twice (as {seen[i['path']]} and {i['role']})", i["path"],
                            "pass each episode dir once")
        seen[i["path"]] = i["role"]
        i["sha256"] = sha256_file(i["path"])
    config = {"k": cfg.k, "ratios": list(cfg.ratios), "filters": {"max_abs_action": cfg.max_abs_action,
              "idle_threshold": cfg.idle_threshold}, "seed": cfg.seed, "batch_size": cfg.batch_size,
              "n_bins": cfg.n_bins, "vocab_size": vocab_size, "rows_per_shard": cfg.rows_per_shard,
              "demo_label": cfg.demo_label, "epochs": max(1, cfg.epochs)}  # every DataConfig key (a test checks)
    if action_tokens != A.ASCENDING:  # absent = ascending, so datasets built before the field keep their hash
        config["action_tokens"] = action_tokens
    reference = None
    if ref_checkpoint is not None:
        # Fine-tuning keeps the reference's action statistics: re-deriving them from the new data would move
        # every bin, so the warm-started policy and its reference would score shifted labels.
        reference = {"checkpoint": str(Path(ref_checkpoint).resolve()), "sha256": sha256_dir(ref_checkpoint),
                     "action_stats": _checkpoint_stats(Path(ref_checkpoint))}
    dhash = _dataset_hash(inputs, config, reference)
    t_hashed = time.perf_counter()
    old = out_dir / "manifest.json"
    if old.is_file():
        try:
            manifest = json.loads(old.read_text())
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("dataset_hash") == dhash:
            return {**summary_of(manifest), "skipped": True, "dataset_hash": dhash}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f"{TMP_PREFIX}{out_dir.name}.*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(out_dir) as tmp, ray_session(address), _data_context():
        spec = BuildSpec(inputs, cfg, config, dhash, reference, vocab_size, image_shape)
        manifest = _build(spec, tmp, t0, t_hashed)
    return {**summary_of(manifest), "skipped": False, "dataset_hash": dhash}


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What one build reads: the inputs (role, path, sha256) and everything that shapes its shards."""

    inputs: list[dict[str, Any]]
    cfg: DataConfig
    config: dict[str, Any]  # the hashed part of cfg, as the manifest records it
    dataset_hash: str
    reference: dict[str, Any] | None  # checkpoint, sha256, action_stats; None: no reference columns
    vocab_size: int
    image_shape: tuple[int, ...] | None  # of the Parquet inputs (None: HDF5 demos only, read in the build)


def _build(spec: BuildSpec, tmp: Path, t0: float, t_hashed: float) -> dict[str, Any]:
    """Write ``spec``'s shards and manifest into ``tmp`` (renamed into place by the caller); ``t0``/``t_hashed``:
    when the call started and finished hashing, for the manifest's stage timings."""
    inputs, cfg, config, reference = spec.inputs, spec.cfg, spec.config, spec.reference
    vocab_size, image_shape = spec.vocab_size, spec.image_shape
    stages: dict[str, float] = {"hash": t_hashed - t0, "ray_start": time.perf_counter() - t_hashed}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = round(now - mark, 3)
        mark = now

    files: list[str] = []
    expert: set[str] = set()
    for i in inputs:
        if i["role"] == "demos_hdf5":
            from apo_ray.hdf5 import hdf5_to_episodes

            conv = tmp / "work" / f"demos-{i['sha256'][:12]}"
            for n, table in enumerate(hdf5_to_episodes(i["path"])):
                conv.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, conv / f"demo_{n:05d}.parquet")
                files.append(str(conv / f"demo_{n:05d}.parquet"))
                expert.add(files[-1])
                image_shape = validate_schema(Path(files[-1]), image_shape)
        else:
            files.append(i["path"])
            if i["role"] == "demos":
                expert.add(i["path"])
    assert image_shape is not None
    if reference is not None:
        from apo_ray.checkpoint import read_meta

        views, have = int(read_meta(reference["checkpoint"]).get("image_views", 1)), S.image_views(*image_shape[:2])
        if have != views:
            raise UserError(f"the reference checkpoint takes {views} camera view(s) per image, the episodes have "
                            f"{have}", reference["checkpoint"],
                            "collect the episodes with the same env.wrist as the checkpoint")
    lap("validate")

    import ray

    oracle_demos = frozenset(expert) if cfg.demo_label == "oracle" else frozenset()
    add_path = functools.partial(_add_local_path, oracle_demos=oracle_demos)
    relabel_from = [S.ORACLE_ACTION] if oracle_demos else []

    # Pass 1: per-episode filter + relabel on the light columns.
    def label_pass() -> dict[str, np.ndarray]:
        ds = ray.data.read_parquet(files, include_paths=True, override_num_blocks=_partitions(len(files), 0))
        ds = ds.select_columns([*LIGHT_COLUMNS, *relabel_from, PATH])
        ds = ds.map_batches(add_path, batch_format="numpy")
        ds = ds.map_batches(functools.partial(_label_block, cfg=cfg, expert_paths=frozenset(expert)),
                            batch_size=None, batch_format="numpy")
        return _concat(ds.iter_batches(batch_size=None, batch_format="numpy"))

    labels = _execute(label_pass, files)
    lap("labels")
    if not labels:
        raise UserError("the input episodes hold no steps", files[0], "collect some episodes first")
    import pandas as pd

    pairs = pd.DataFrame({k: labels[k] for k in (PATH, S.EPISODE_ID, "block")}).drop_duplicates()
    if pairs.duplicated([PATH, S.EPISODE_ID]).any():
        raise RuntimeError("an episode was split across read blocks; relabelling needs whole episodes")
    plans, path_ids, stats, counts = _plan(labels, frozenset(expert), cfg,
                                          reference["action_stats"] if reference is not None else None)
    lap("plan")

    # Pass 2, once per epoch's schedule: normalize, tokenize, place every step into its balanced micro-batches,
    # write. A pass per epoch keeps each epoch's rows in their own shards, in epoch order, for the trainer.
    shard_dir = tmp / "shards"
    batches_per_shard = max(1, cfg.rows_per_shard // cfg.batch_size)
    input_bytes = sum(os.path.getsize(f) for f in files)
    batch_bytes = counts["samples"] * (int(np.prod(image_shape)) + 128)  # images dominate

    def batch_pass(plan: dict[str, np.ndarray], out: Path) -> None:
        ds = ray.data.read_parquet(files, include_paths=True,
                                   override_num_blocks=_partitions(len(files), input_bytes))
        ds = ds.select_columns([*HEAVY_COLUMNS, PATH])
        ds = ds.map_batches(add_path, batch_format="numpy")
        ds = ds.map_batches(functools.partial(_explode, plan=plan, path_ids=path_ids, stats=stats,
                                              vocab_size=vocab_size, n_bins=cfg.n_bins,
                                              action_tokens=config.get("action_tokens", A.ASCENDING)),
                            batch_format="numpy")
        ds = ds.groupby(BATCH_ID, num_partitions=_partitions(counts["batches"], batch_bytes)).map_groups(
            functools.partial(_assemble, batch_size=cfg.batch_size), batch_format="numpy")
        if reference is not None:
            # Ray hides the GPUs from an actor that asks for none: on a GPU cluster the reference (a 7B VLA)
            # must ask for one, or it would score on the CPU in fp32
            gpus = 1 if cluster_offers().get("GPU", 0) >= 1 else 0
            ds = ds.map_batches(RefLogp, fn_constructor_args=(functools.partial(_model_logp_fn,
                                reference["checkpoint"]),), batch_format="pyarrow", batch_size=16, concurrency=1,
                                num_gpus=gpus)
        ds.write_parquet(str(out), min_rows_per_file=min(batches_per_shard, counts["batches"]),
                         max_rows_per_file=batches_per_shard)

    shards: list[dict[str, Any]] = []
    shard_dir.mkdir(parents=True, exist_ok=True)
    for e, plan in enumerate(plans):
        out = tmp / "work" / f"epoch-{e:03d}"
        _execute(functools.partial(batch_pass, plan, out), files)
        for p in sorted(out.glob("*.parquet")):
            dest = shard_dir / f"part-{len(shards):05d}.parquet"
            os.replace(p, dest)
            shards.append({"name": f"shards/{dest.name}", "rows": pq.ParquetFile(dest).metadata.num_rows,
                           "sha256": sha256_file(dest), "epoch": e})
        if sum(s["rows"] for s in shards if s["epoch"] == e) != counts["batches"]:
            raise RuntimeError(f"wrote {sum(s['rows'] for s in shards if s['epoch'] == e)} batches for epoch {e}, "
                               f"planned {counts['batches']}")
    lap("batches")
    shutil.rmtree(tmp / "work", ignore_errors=True)
    elapsed = time.perf_counter() - t0
    manifest = {
        "schema_version": DATASET_SCHEMA_VERSION,
        "dataset_hash": spec.dataset_hash,
        "inputs": inputs,
        "config": config,
        "image_shape": list(image_shape or ()),
        "action_stats": stats,
        "counts": counts,
        "shards": shards,
        "reference": reference,
        "columns": [BATCH_ID, *SAMPLE_COLUMNS, *(REF_COLUMNS if reference else ())],
        "timing": {"seconds": round(elapsed, 3), "rows_per_s": round(counts["input_rows"] / elapsed, 1),
                   "stages_s": {k: round(v, 3) for k, v in stages.items()}},
    }
    write_json(tmp / "manifest.json", manifest)
    return manifest


def _partitions(n_keys: int, nbytes: int) -> int:
    """Read blocks / shuffle partitions: about 32 MB each, at most two per cluster CPU, at most one per key.
    Ray's defaults (200) cost a task each, which dominates on a small cluster."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(n_keys, 2 * cpus, math.ceil(nbytes / TARGET_PARTITION_BYTES)))


def _add_local_path(batch: dict[str, np.ndarray], oracle_demos: frozenset[str] = frozenset()
                    ) -> dict[str, np.ndarray]:
    """Ray reports paths without a scheme or with ``local://``-style prefixes; key on the absolute path.
    Rows of ``oracle_demos`` files then take the recorded oracle action as their action (``demo_label: oracle``),
    before any filter, statistic or token sees it."""
    batch[PATH] = np.array([os.path.abspath(str(p).split("://", 1)[-1]) for p in batch[PATH]], dtype=object)
    if oracle_demos:
        rows = np.isin(batch[PATH].astype(str), list(oracle_demos))
        action = np.array(batch[S.ACTION], np.float32)
        action[rows] = np.asarray(batch[S.ORACLE_ACTION], np.float32)[rows]
        batch[S.ACTION] = action
    return batch
