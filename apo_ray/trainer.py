"""Ray Train ``TorchTrainer`` whose workers train the VLA in a DeepSpeed engine against a frozen reference.

Data: the dataset's Parquet rows (one row = one balanced micro-batch) through ``get_dataset_shard``; a step
takes ``grad_accum`` rows and computes the loss per micro-batch (λ, KL estimate, reduction), then averages —
exactly gradient accumulation over micro-batches, in one forward. Reference: the dataset's ``ref_*`` columns
when present (no reference forward at all), else a frozen replica per worker (ZeRO-3-sharded with the policy).
Checkpoints: ``ray.train.report`` with an HF-format model (``hf/``), the DeepSpeed state (``ds/``) and the
position (``state.json``); a restarted worker group resumes from that step. A NaN/inf loss stops the run
without checkpointing it; the driver then raises one clear error naming the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from apo_ray import fsio
from apo_ray.config import Config, TrainConfig, from_dict
from apo_ray.errors import UserError
from apo_ray.loss import OBJECTIVES, LossParams, get_objective

REF_COLUMNS = ("ref_logp", "ref_logp_u", "ref_kl_logp")
# written by today's reference stage; older datasets may lack them (then a run that needs one uses a live replica)
OPTIONAL_REF_COLUMNS = ("ref_logp_oracle", "ref_logp_u_differ")
BASE_COLUMNS = ("image", "proprio", "instruction", "action_tokens", "oracle_tokens", "c", "is_expert")
POOL_NAMES = ("correct", "interaction", "incorrect")  # apo_ray.data's pools (not imported: it pulls in Ray Data)
NAN_MARKER = "NONFINITE.json"
FAIL_ENV = "APO_RAY_FAIL_AT_STEP"
"""Fault injection for tests/chaos: the last worker raises once at this step (first attempt only)."""


# ------------------------------------------------------------------------------------------- driver side
def _inspect_dataset(data_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    mf = data_dir / "manifest.json"
    if not mf.is_file():
        raise UserError("no training set: manifest.json missing", str(data_dir), "pass a dir written by apo-ray dataset")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise UserError("manifest.json is not valid JSON", str(mf), "rebuild the dataset") from None
    stats = manifest.get("action_stats") or {}
    if "q01" not in stats or "q99" not in stats:
        raise UserError("the dataset has no action statistics (q01/q99)", str(mf), "rebuild it with apo-ray dataset")
    shards = sorted((data_dir / "shards").glob("part-*.parquet"))
    if not shards:
        raise UserError("the dataset has no shards", str(data_dir / "shards"), "rebuild it with apo-ray dataset")
    _verify_shards(data_dir, manifest, shards)
    schema = pq.read_schema(shards[0])
    missing = [c for c in BASE_COLUMNS if c not in schema.names]
    if missing:
        raise UserError(f"shards lack columns {missing}", str(shards[0]), "rebuild the dataset with this version")
    from apo_ray.schema import PROPRIO_DIM, column_to_numpy, image_views, read_table

    rows, instructions, c_counts, proprio = 0, set(), np.zeros(3, dtype=np.int64), []
    for s in shards:
        t = read_table(s, columns=["instruction", "c", "proprio"])
        rows += t.num_rows
        for lst in t.column("instruction").to_pylist():
            instructions.update(lst)
        c_counts += np.bincount(column_to_numpy(t.column("c")).reshape(-1).astype(np.int64), minlength=3)[:3]
        proprio.append(column_to_numpy(t.column("proprio")).reshape(-1, PROPRIO_DIM))
    first = read_table(shards[0], columns=["image"]).slice(0, 1)

    img = column_to_numpy(first.column("image"))  # (1, B, H, W, 3)
    h, w = int(img.shape[2]), int(img.shape[3])
    views = image_views(h, w)
    if not views:
        raise UserError(f"images are {w}x{h}; expected square (agentview) or 2:1 (agentview + wrist)",
                        str(shards[0]), "collect the data with apo-ray collect")
    schedules = int((manifest.get("counts") or {}).get("schedules", 1))  # datasets before data.epochs hold one
    if schedules < 1 or rows % schedules:
        raise UserError(f"{rows} micro-batches do not split into {schedules} epoch schedules", str(mf),
                        "rebuild the dataset with apo-ray dataset")
    return {"manifest": manifest, "shards": [str(s) for s in shards], "rows": rows,
            "schedules": schedules, "per_schedule": rows // schedules,
            "coverage_cols": [c for c in ("pool", "sample_id", "episode_id", "t") if c in schema.names],
            "batch_size": int(img.shape[1]), "image_size": h, "image_views": views,
            "instructions": sorted(instructions), "c_counts": c_counts.tolist(),
            "proprio_stats": proprio_stats(np.concatenate(proprio)),
            "has_ref": all(c in schema.names for c in REF_COLUMNS),
            "ref_optional": [c for c in OPTIONAL_REF_COLUMNS if c in schema.names]}


def proprio_stats(proprio: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension mean/std of the training samples' proprio (N, D), for the model's input standardisation.
    A constant dimension gets std 1 so it cannot blow up."""
    x = np.asarray(proprio, np.float64)
    std = x.std(0)
    return {"mean": x.mean(0).round(6).tolist(), "std": np.where(std < 1e-4, 1.0, std).round(6).tolist()}


def _verify_shards(data_dir: Path, manifest: dict, shards: list[Path]) -> None:
    """The shards on disk must be exactly the manifest's, byte for byte (sha256): a truncated, swapped or
    stray shard would silently change what is trained on."""
    listed = {e["name"]: e for e in manifest.get("shards") or []}
    fix = "rebuild the dataset with apo-ray dataset (or restore it from storage)"
    for s in shards:
        rel = s.relative_to(data_dir).as_posix()
        if rel not in listed:
            raise UserError("shard not listed in manifest.json", str(s), fix)
    for rel, e in listed.items():
        p = data_dir / rel
        if not p.is_file():
            raise UserError("shard listed in manifest.json is missing", str(p), fix)
        if e.get("sha256") and fsio.sha256_file(p) != e["sha256"]:
            raise UserError("shard checksum does not match manifest.json (truncated or modified)", str(p), fix)


def _reference_mode(cfg: Config, info: dict, init: str) -> str:
    t = cfg.train
    obj = get_objective(t.objective)
    if not obj.reference:
        return "none"
    need = obj.reference_columns(LossParams.from_train_config(t))
    cached_ok = info["has_ref"] and need <= set(info["ref_optional"])
    ref = info["manifest"].get("reference") or {}
    same = _same_ckpt(ref, init)
    if t.reference == "cached":
        if not cached_ok:
            missing = sorted((set(REF_COLUMNS) if not info["has_ref"] else set()) | (need - set(info["ref_optional"])))
            raise UserError(f"train.reference=cached but the dataset has no reference log-prob columns "
                            f"{', '.join(missing)}",
                            "config train.reference", "build the dataset with --ref-checkpoint, or use live")
        if ref.get("checkpoint") and not same:
            raise UserError(f"the dataset's reference log-probs come from {ref['checkpoint']}, not from --init {init}",
                            "config train.reference", "rebuild the dataset with this reference or use live")
        return "cached"
    if t.reference == "live":
        return "live"
    if t.reference != "auto":
        raise UserError(f"unknown train.reference '{t.reference}'", "config train.reference", "auto, cached or live")
    return "cached" if cached_ok and same else "live"


def _fresh_or_resume(out_dir: Path, key: dict) -> None:
    """Ray Train resumes a run dir's latest checkpoint. Keep that only for an unfinished run of the same
    config, init and dataset (a crashed driver); anything else starts over."""
    run_key = out_dir / "run_key.json"
    same = run_key.is_file() and json.loads(run_key.read_text()) == json.loads(json.dumps(key))
    if not same or (out_dir / "metrics.json").is_file():
        shutil.rmtree(out_dir / "ray", ignore_errors=True)
        (out_dir / "metrics.json").unlink(missing_ok=True)
        for flag in out_dir.glob(".fault-injected-*"):
            flag.unlink()
    fsio.write_json(run_key, key)


def _check_vocab(info: dict, init_meta: dict | None, cfg: Config) -> None:
    """The dataset's action tokens must be the model's last 256 ids, in the model's convention (scratch hf
    included: its layout is read from model.path's config.json)."""
    from apo_ray.checkpoint import meta_action_tokens, meta_vocab_size, token_layout

    dcfg = info["manifest"].get("config") or {}
    want = dcfg.get("vocab_size")
    if init_meta is None:
        layout = token_layout(cfg.model, None)
        have, conv = layout["vocab_size"], layout["action_tokens"]
    else:
        have, conv = meta_vocab_size(init_meta), meta_action_tokens(init_meta)
    if want is not None and int(want) != have:
        raise UserError(f"the dataset's action tokens were made for vocab_size {want}, the model has {have}",
                        "manifest.json config.vocab_size", f"rebuild the dataset with --vocab-size {have}")
    if dcfg.get("action_tokens", "ascending") != conv:
        raise UserError(f"the dataset's action tokens use the {dcfg.get('action_tokens', 'ascending')} convention, "
                        f"the model the {conv} one", "manifest.json config.action_tokens",
                        "rebuild the dataset with the model's config (apo-ray dataset --config)")


ARCH_FIELDS = ("kind", "hidden_size", "num_layers", "num_heads", "vision", "vision_hidden_size", "vision_layers",
               "patch_size", "use_proprio", "coord_channels")


def _check_model_config(init: str, init_meta: dict, cfg: Config) -> None:
    """--init fixes the architecture: a config asking for another one is a mistake, not something to ignore."""
    built = init_meta.get("model") or {}
    want = dataclasses.asdict(cfg.model)
    for k in ARCH_FIELDS if built.get("kind", "tiny") == "tiny" else ("kind",):
        if k in built and built[k] != want[k]:
            raise UserError(f"--init checkpoint was built with model.{k}={built[k]}, the config asks for {want[k]}",
                            init, f"drop model.{k} from the config (or set it to {built[k]}), or train from scratch")


def _check_action_stats(info: dict, init: str, init_meta: dict) -> None:
    """A warm start must see actions binned as its checkpoint was trained: same q01/q99 statistics."""
    have, want = init_meta.get("action_stats") or {}, info["manifest"]["action_stats"]

    def same(k: str) -> bool:
        a, b = np.asarray(have.get(k, []), float), np.asarray(want.get(k, []), float)
        return a.shape == b.shape and np.allclose(a, b)

    if not (same("q01") and same("q99")):
        raise UserError("the dataset's action statistics differ from the --init checkpoint's, so its action tokens "
                        "would mean other actions", str(Path(info["shards"][0]).parents[1] / "manifest.json"),
                        f"rebuild the dataset with --ref-checkpoint {init}")


def _same_ckpt(ref: dict, init: str) -> bool:
    """Whether the dataset's reference checkpoint is --init: the same directory, or the same content (a forked or
    restored run keeps the source's path in its manifest, and falling back to a live reference there would change
    the run's arithmetic)."""
    def norm(p: str) -> Path:
        q = Path(p).resolve()
        return q / "checkpoint" if (q / "checkpoint").is_dir() else q

    if not ref.get("checkpoint") or init == "scratch":
        return False
    a, b = norm(ref["checkpoint"]), norm(init)
    return a == b or (bool(ref.get("sha256")) and b.exists() and fsio.sha256_dir(b) == ref["sha256"])


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What the driver hands every Ray Train worker (``train_loop_config={"spec": LoopSpec}``)."""

    cfg: dict  # the resolved Config, as a dict
    init: str  # a checkpoint dir, or "scratch"
    out_dir: str
    ref_mode: str  # none | cached | live
    action_stats: dict
    image_size: int
    image_views: int
    proprio_stats: dict | None  # standardisation of the proprio token, for a tiny VLA trained from scratch
    instructions: list[str]
    group: int  # the micro-batch size B
    steps_per_epoch: int
    total_steps: int
    schedules: int  # epoch schedules the dataset holds
    fail_at_step: int = 0  # fault injection (FAIL_ENV)


def train(data_dir: str | Path, init: str, out_dir: str | Path, cfg: Config, *, address: str | None = None) -> dict:
    """Train ``cfg.train.objective`` on the dataset at ``data_dir`` from ``init`` (a checkpoint dir or
    ``scratch``); writes ``out_dir/checkpoint/`` (HF format), ``out_dir/metrics.json``, ``out_dir/tb/``."""
    t = cfg.train
    if t.objective not in OBJECTIVES:
        raise UserError(f"unknown objective '{t.objective}'", "--objective", f"use one of {', '.join(OBJECTIVES)}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    info = _inspect_dataset(data_dir)
    if get_objective(t.objective).undesirable and info["c_counts"][0] == 0:
        raise UserError(f"objective {t.objective} needs undesirable (c=0) samples and the dataset has none",
                        str(data_dir), "collect with the corrector on (k>0), or use --objective bc/dagger")
    init_meta = None
    if init != "scratch":
        from apo_ray.checkpoint import META_FILE, checkpoint_dir, read_meta

        p = Path(init)
        if not (checkpoint_dir(p) / META_FILE).is_file():
            raise UserError(f"--init checkpoint missing or incomplete ({META_FILE} not found)", str(p),
                            "pass a checkpoint dir written by apo-ray train, or scratch")
        init = str(p.resolve())
        init_meta = read_meta(init)
        _check_model_config(init, init_meta, cfg)
        if int(init_meta.get("image_views", 1)) != info["image_views"]:
            raise UserError(f"the --init checkpoint takes {init_meta.get('image_views', 1)} camera view(s), the "
                            f"dataset's images have {info['image_views']}", str(data_dir),
                            "build the dataset from episodes collected with the same env.wrist as the checkpoint")
        _check_action_stats(info, init, init_meta)
    _check_vocab(info, init_meta, cfg)
    ref_mode = _reference_mode(cfg, info, init)
    world = t.workers
    steps_per_epoch = info["per_schedule"] // world // t.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{info['per_schedule']} micro-batches per epoch cannot feed {world} workers × grad_accum "
                        f"{t.grad_accum}",
                        str(data_dir), "use fewer workers, a smaller train.grad_accum or more data")
    total = steps_per_epoch * t.epochs
    if t.max_steps:
        total = min(total, t.max_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / NAN_MARKER).unlink(missing_ok=True)
    _fresh_or_resume(out_dir, {"config": cfg.to_dict(), "init": init,
                               "dataset": info["manifest"].get("dataset_hash", str(data_dir.resolve()))})
    fsio.write_json(out_dir / "config.json", cfg.to_dict())
    spec = LoopSpec(cfg=cfg.to_dict(), init=init, out_dir=str(out_dir.resolve()), ref_mode=ref_mode,
                    action_stats=info["manifest"]["action_stats"], image_size=info["image_size"],
                    image_views=info["image_views"],
                    proprio_stats=(info["proprio_stats"] if init == "scratch" and cfg.model.use_proprio
                                   and cfg.model.kind == "tiny" else None),
                    instructions=info["instructions"], group=info["batch_size"], steps_per_epoch=steps_per_epoch,
                    total_steps=total, schedules=info["schedules"],
                    fail_at_step=int(os.environ.get(FAIL_ENV, "0") or 0))
    from apo_ray.ray_utils import ray_session

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".venv" / "torch_extensions"))
    with ray_session(address):
        result = _fit(spec, info, out_dir, t)
    marker = out_dir / NAN_MARKER
    if marker.is_file():
        bad = json.loads(marker.read_text())
        last = out_dir / "checkpoint"
        raise UserError(f"loss became {bad['value']} at step {bad['step']}; training stopped",
                        str(out_dir), f"last good checkpoint: {last if last.is_dir() else 'none'}; "
                        f"lower train.lr or check the data")
    return result


def train_placement(t: TrainConfig, offered: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """(use_gpu, resources per Ray Train worker), given what the cluster can hold (``ray_utils.cluster_offers``):
    a GPU each where ``train.use_gpu`` and the cluster has or can scale to one per worker, and the ``trainer``
    resource where it offers that, so the workers land on (and scale out) the trainer node type."""
    use_gpu = bool(t.use_gpu and offered.get("GPU", 0) >= t.workers)
    res = {"CPU": t.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    if offered.get("trainer", 0) > 0:
        res["trainer"] = 1.0
    return use_gpu, res


def _fit(spec: LoopSpec, info: dict, out_dir: Path, t: TrainConfig) -> dict:
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from apo_ray.ray_utils import cluster_offers

    cols = ["batch_id", *BASE_COLUMNS, *info["coverage_cols"]] + (list(REF_COLUMNS) + info["ref_optional"]
                                                                  if spec.ref_mode == "cached" else [])
    # the v1 Parquet reader: v2 (Ray 2.60's default) lists the files with 32 FooterReader actors of a CPU each,
    # spread over the nodes; under an autoscaler that demand launched rollout nodes through every training
    # (and its metadata-sampling bar on a terminal only, as the dataset stage's bars: logs stay ours)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, sys.stderr.isatty()
    try:
        ds = ray.data.read_parquet(info["shards"], columns=cols, num_cpus=0.25)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = saved
    # Each rank reads its own rows of every epoch's schedule (not Ray's streaming_split, which hands out whole
    # blocks: a small epoch is one block, so one rank would get all of it): with the shards in epoch order, rank r
    # gets rows b ≡ r (mod world) of each schedule, the first steps_per_epoch·grad_accum of them, in file order.
    take = spec.steps_per_epoch * t.grad_accum * t.workers
    datasets = {f"rank{r}": ds.map_batches(functools.partial(_rank_rows, rank=r, world=t.workers,
                                                             per_schedule=info["per_schedule"], take=take),
                                           batch_format="pyarrow", num_cpus=0.25)
                for r in range(t.workers)}
    offered = cluster_offers()
    use_gpu, resources = train_placement(t, offered)
    cpus = offered.get("CPU", 0)
    if t.workers * t.cpus_per_worker + 1 > cpus:
        # Ray Data's file listing needs a whole free CPU; without it iter_torch_batches waits forever
        raise UserError(f"{t.workers} train workers x {t.cpus_per_worker} CPU leave no CPU for Ray Data on a "
                        f"{cpus:g}-CPU cluster", "train.workers / train.cpus_per_worker",
                        f"keep workers x cpus_per_worker <= {cpus - 1:g}, e.g. train.cpus_per_worker=0.5")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="train", storage_path=str((out_dir / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the root cause on one line
        if (out_dir / NAN_MARKER).is_file():
            return {}
        raise RuntimeError(f"training failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from e
    metrics = {**(result.metrics or {}), "reference": spec.ref_mode, "device": "cuda" if use_gpu else "cpu"}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d, fsio.atomic_dir(out_dir / "checkpoint") as tmp:
            shutil.copytree(Path(d) / "hf", tmp, dirs_exist_ok=True)
            cov = Coverage.from_state(json.loads((Path(d) / "state.json").read_text()).get("coverage"))
        metrics.update(cov.summary())  # the whole run's, restarts included
        metrics["schedules"] = info["schedules"]
    fsio.write_json(out_dir / "metrics.json", metrics)
    return metrics


def _rank_rows(table: Any, rank: int, world: int, per_schedule: int, take: int) -> Any:
    """map_batches UDF (pyarrow): the rows of ``rank`` — row b of each epoch's schedule (batch_id = e·n + b) with
    b ≡ rank (mod world) and b < take, so every rank trains the same number of steps on disjoint rows."""
    import pyarrow as pa

    b = table["batch_id"].to_numpy() % per_schedule
    return table.filter(pa.array((b % world == rank) & (b < take)))


class Coverage:
    """Samples trained on per pool (``samples_seen``) and how many distinct ones (``distinct_seen``), kept in the
    checkpoint so a resumed run reports the whole run's. A sample is its ``sample_id`` (or episode/t in datasets
    built before the column)."""

    def __init__(self) -> None:
        self.samples = [0, 0, 0]
        self.ids: list[set] = [set(), set(), set()]

    def add(self, b: dict[str, Any]) -> None:
        if "pool" not in b:
            return
        pool = np.asarray(b["pool"]).reshape(-1).astype(np.int64)
        if "sample_id" in b:
            ids = np.asarray(b["sample_id"]).reshape(-1).tolist()
        else:
            ids = [f"{e}/{t}" for e, t in zip(np.asarray(b["episode_id"], dtype=object).reshape(-1).tolist(),
                                              np.asarray(b["t"]).reshape(-1).tolist(), strict=True)]
        for p, i in zip(pool.tolist(), ids, strict=True):
            self.samples[p] += 1
            self.ids[p].add(i)

    def merged(self, world: int) -> Coverage:
        """The union over all ranks (a collective: every rank calls it at the same step)."""
        if world == 1:
            return self
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (self.samples, self.ids))
        out = Coverage()
        for samples, ids in parts:
            out.samples = [a + b for a, b in zip(out.samples, samples, strict=True)]
            out.ids = [a | b for a, b in zip(out.ids, ids, strict=True)]
        return out

    def to_state(self) -> dict:
        return {"samples": dict(zip(POOL_NAMES, self.samples, strict=True)),
                "ids": {n: sorted(ids, key=str) for n, ids in zip(POOL_NAMES, self.ids, strict=True)}}

    @classmethod
    def from_state(cls, state: dict | None, counts: bool = True) -> Coverage:
        """``counts=False`` (ranks other than 0 on a resume): the ids only, so the ranks' sums count each once."""
        out = cls()
        if state:
            out.samples = [int(state["samples"][n]) if counts else 0 for n in POOL_NAMES]
            out.ids = [set(state["ids"][n]) for n in POOL_NAMES]
        return out

    def summary(self) -> dict:
        return {"samples_seen": dict(zip(POOL_NAMES, self.samples, strict=True)),
                "distinct_seen": {n: len(ids) for n, ids in zip(POOL_NAMES, self.ids, strict=True)}}


# ------------------------------------------------------------------------------------------- worker side
def _lr_lambda(warmup: int, total: int):
    """Linear warmup from 0.1× over ``warmup`` steps, then cosine decay to 0 (the paper's code)."""

    def f(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _ds_config(t, micro: int, bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _safe_ds_load(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's checkpoint loader unpickles with weights_only=False. Its files hold tensors, plain containers
    and three small DeepSpeed types; allow exactly those, so a checkpoint dir can never run code."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _batch_arrays(b: dict) -> dict[str, np.ndarray]:
    """Flatten R rows of B-sample micro-batches into N = R·B samples."""
    out = {}
    for k, v in b.items():
        if k == "instruction":
            out[k] = [str(s) for row in v for s in row]
        else:
            a = np.stack(list(v)) if v.dtype == object else np.asarray(v)
            out[k] = a.reshape(-1, *a.shape[2:])
    return out


class _Passes:
    """A rank's batches, read through Ray Data one pass (``spec.schedules`` epochs) at a time. A pass that fits
    ``budget_mb`` is kept and replayed for the later passes: the same batches in the same order, without
    decoding the shards again."""

    def __init__(self, shard: Any, rows: int, per_pass: int, budget_mb: int) -> None:
        self.shard, self.rows, self.per_pass, self.budget = shard, rows, per_pass, budget_mb * 2**20
        self.kept: list[dict] | None = None
        self.fits = budget_mb > 0  # False once a pass outgrew the budget: every pass has the same size
        self.reads = 0  # passes read from the shards by this worker

    def start(self) -> Iterator[dict]:
        return iter(self.kept) if self.kept is not None else self._read()

    def _read(self) -> Iterator[dict]:
        self.reads += 1
        kept: list[dict] | None = [] if self.fits else None
        size = 0
        for raw in self.shard.iter_batches(batch_size=self.rows, batch_format="numpy", drop_last=True,
                                           prefetch_batches=2):
            b = _batch_arrays(raw)
            if kept is not None:
                size += sum(v.nbytes for v in b.values() if isinstance(v, np.ndarray))
                if size > self.budget:
                    kept, self.fits = None, False
                else:
                    kept.append(b)
                    if len(kept) == self.per_pass:
                        self.kept = kept
            yield b


@dataclasses.dataclass
class _Engine:
    """A worker's DeepSpeed engine and what scoring needs beside it."""

    engine: Any
    proc: Any  # apo_ray.model.Processor
    sched: Any  # the LR scheduler, for the logged lr
    ref: Any  # a frozen reference replica, or None (no reference, a cached one, or the LoRA-disabled policy)
    lora_ref: bool  # the live reference is the policy with its adapters disabled
    device: Any
    dtype: Any


@dataclasses.dataclass
class _Position:
    """Where training stands: global step, epoch, steps done in that epoch (a checkpoint's state.json)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def _setup_engine(spec: LoopSpec, cfg: Config, device: Any, rank: int) -> _Engine:
    """The policy (from scratch or ``spec.init``), its optimizer and schedule in a DeepSpeed engine, and the
    frozen reference (built from the init, never from a resumed policy)."""
    import deepspeed
    import torch

    from apo_ray import model as M

    t, mc = cfg.train, cfg.model
    torch.manual_seed(t.seed + rank)
    if spec.init == "scratch":
        model, proc = M.build_model(mc, spec.action_stats, spec.image_size, spec.instructions, seed=t.seed,
                                    proprio_stats=spec.proprio_stats, image_views=spec.image_views)
    else:
        # hf: the init's adapter is merged and a fresh one trains, so adapters-off is exactly the init
        model, proc, _ = M.load_policy(spec.init, trainable=True, fresh_lora=True)
        if proc.meta.kind == "tiny":
            model.requires_grad_(True)
            proc = M.Processor(proc.tokenizer, M.VLAMeta(**{**proc.meta.to_json(), "action_stats": spec.action_stats}))
    model.train()
    # Under LoRA the adapters start as a no-op on the init (scratch, or a warm start's merged adapters), so the
    # live reference is the same model with them disabled (peft): no second copy of a 7B. Without LoRA, a copy.
    lora_ref = spec.ref_mode == "live" and M.has_lora(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if spec.ref_mode == "live" and not lora_ref else None

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t.warmup_steps, spec.total_steps))
    dtype = M.compute_dtype(device)
    ds_cfg = _ds_config(t, spec.group * t.grad_accum, dtype == torch.bfloat16)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
    engine.checkpoint_engine.load = _safe_ds_load
    if ref is not None:
        if t.zero_stage == 3:  # shard the replica like the policy
            ref, *_ = deepspeed.initialize(model=ref, config={k: v for k, v in ds_cfg.items()
                                                              if k != "gradient_clipping"})
        else:
            ref = ref.to(device=device, dtype=dtype)
        ref.eval()
    return _Engine(engine, proc, sched, ref, lora_ref, device, dtype)


def _resume(eng: _Engine, rank: int) -> tuple[_Position, Coverage]:
    """The position and coverage of Ray Train's latest checkpoint (loaded into the engine), or a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return _Position(), Coverage()
    with ckpt.as_directory() as d:
        eng.engine.load_checkpoint(d, tag="ds")
        st = json.loads((Path(d) / "state.json").read_text())
    return _Position(st["step"], st["epoch"], st["step_in_epoch"]), Coverage.from_state(st.get("coverage"),
                                                                                        counts=rank == 0)


def _score(eng: _Engine, obj: Any, b: dict[str, np.ndarray], spec: LoopSpec) -> tuple[Any, Any, Any]:
    """(Scores, the policy's scores of the sample's own actions, own tokens) for one batch: the policy scores
    the objective's token sets in one forward; the reference's come from the dataset's columns or a live
    forward."""
    import torch

    from apo_ray import model as M
    from apo_ray.loss import add_cached_reference

    dev = eng.device
    inp = eng.proc(b["image"], b["instruction"], b["proprio"]).to(dev, eng.dtype)
    own = torch.as_tensor(b["action_tokens"], dtype=torch.long, device=dev)
    oracle = torch.as_tensor(b["oracle_tokens"], dtype=torch.long, device=dev)
    c = torch.as_tensor(b["c"].astype(np.int64), device=dev)
    is_expert = torch.as_tensor(b["is_expert"].astype(bool), device=dev)
    sets = obj.token_sets(own, oracle, spec.group)
    sc = M.score_actions(eng.engine, inp, sets, eng.proc.meta)
    l1 = M.decoded_l1(sc[0].pred_tokens, own, eng.proc.meta).detach()
    s = obj.scores(sc, own, oracle, c, is_expert, l1, spec.group)
    if spec.ref_mode == "cached":
        add_cached_reference(s, {k: torch.as_tensor(b[k], dtype=torch.float32, device=dev)
                                 for k in (*REF_COLUMNS, *OPTIONAL_REF_COLUMNS) if k in b})
    elif spec.ref_mode == "live":
        with torch.no_grad(), (M.reference_mode(eng.engine) if eng.lora_ref else contextlib.nullcontext()):
            rs = M.score_actions(eng.engine if eng.lora_ref else eng.ref, inp, sets, eng.proc.meta)
        obj.add_reference(s, rs, own, oracle)
    return s, sc[0], own


class _Metrics:
    """Per-step metrics (accuracies by label, throughput, lr), their TensorBoard/MLflow logs on rank 0, and the
    run totals behind the checkpoint's summary."""

    ACC = ("acc_c0", "acc_c1", "acc_c2", "acc_expert")

    def __init__(self, t: TrainConfig, out_dir: Path, rank: int, world: int, resumed_from: int) -> None:
        self.t, self.world = t, world
        self.totals = {"samples": 0, "time": 0.0, "clamp_steps": 0, "ref_steps": 0, "resumed_from_step": resumed_from}
        self.last: dict[str, float] = {}
        self.writer = self.mlflow = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops a killed attempt's events past the resumed step, so curves never double up
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resumed_from + 1 if resumed_from else None)
            if t.mlflow_uri:
                import mlflow  # noqa: PLC0415 - optional dependency, only when configured

                mlflow.set_tracking_uri(t.mlflow_uri)
                mlflow.start_run(run_name=out_dir.name)
                self.mlflow = mlflow

    def step(self, m: dict, s: Any, own_scores: Any, own: Any, *, lr: float, step: int, epoch: int, dt: float) -> None:
        import torch

        n = own.shape[0]
        self.totals["samples"] += n * self.world
        self.totals["time"] += dt
        with torch.no_grad():
            correct = (own_scores.pred_tokens == own).float().mean(dim=1)
            masks = (s.c == 0, (s.c == 1) & ~s.is_expert, s.c == 2, s.is_expert)
            for key, mask in zip(self.ACC, masks, strict=True):
                m[key] = correct[mask].mean().item() if bool(mask.any()) else float("nan")
            m["token_acc"] = correct.mean().item()
            m["l1"] = s.l1.mean().item()
        if "kl_at_clamp" in m:
            self.totals["ref_steps"] += 1
            self.totals["clamp_steps"] += int(m["kl_at_clamp"] > 0)
            m["kl_clamp_frac_steps"] = self.totals["clamp_steps"] / self.totals["ref_steps"]
        m.update({"samples_per_s": n * self.world / dt, "lr": lr, "step": step, "epoch": epoch})
        self.last = m
        if self.writer is not None and step % max(1, self.t.log_every) == 0:
            for k, v in m.items():
                if isinstance(v, float | int) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
            if self.mlflow is not None:
                self.mlflow.log_metrics({k: v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)},
                                        step=step)

    def summary(self) -> dict:
        return _summary(self.last, self.totals)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _train_loop(config: dict) -> None:
    """A Ray Train worker: set up the engine, resume, then train ``spec.total_steps`` steps epoch by epoch,
    checkpointing every ``train.checkpoint_every`` steps and at the end."""
    import ray.train
    import torch

    spec: LoopSpec = config["spec"]
    cfg = from_dict(spec.cfg)
    t = cfg.train
    cuda = torch.cuda.is_available() and t.use_gpu
    # DeepSpeed fixes its accelerator at import. The runtime env carries the driver's DS_ACCELERATOR=cpu (a CPU
    # head), which on a GPU node would run the engine's collectives and optimizer on the CPU path.
    os.environ["DS_ACCELERATOR"] = "cuda" if cuda else "cpu"
    import torch.distributed as dist

    from apo_ray import model as M
    from apo_ray.loss import get_objective

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if cuda else "cpu")
    torch.set_num_threads(t.torch_threads or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    eng = _setup_engine(spec, cfg, device, rank)
    pos, cov = _resume(eng, rank)
    out_dir = Path(spec.out_dir)
    metrics = _Metrics(t, out_dir, rank, world, pos.step)
    obj, params = get_objective(t.objective), LossParams.from_train_config(t)

    def allreduce_mean(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x / world

    kl_reduce = allreduce_mean if (t.kl_allreduce and world > 1) else None

    def save(summary: dict, epoch: int, step_in_epoch: int) -> None:
        seen = cov.merged(world)
        with tempfile.TemporaryDirectory() as tmp:
            eng.engine.save_checkpoint(tmp, tag="ds")
            sd = eng.engine._zero3_consolidated_16bit_state_dict() if t.zero_stage == 3 else None
            if rank == 0:
                M.save_checkpoint(eng.engine.module, eng.proc, Path(tmp) / "hf", state_dict=sd)
                fsio.write_json(Path(tmp) / "state.json", {"step": pos.step, "epoch": epoch,
                                                           "step_in_epoch": step_in_epoch, "coverage": seen.to_state()})
            ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    passes = _Passes(ray.train.get_dataset_shard(f"rank{rank}"), t.grad_accum,
                     spec.schedules * spec.steps_per_epoch, t.pass_cache_mb)
    stop, it, skip = False, None, pos.step_in_epoch
    epoch, step_in_epoch = pos.epoch, skip
    for epoch in range(pos.epoch, t.epochs):
        # The rank's stream holds exactly steps_per_epoch batches of each epoch's schedule, in epoch order; one
        # pass over it covers spec.schedules epochs, and training past the last schedule starts another pass.
        lead = 0
        if it is None or epoch % spec.schedules == 0:
            it = passes.start()
            lead = (epoch % spec.schedules) * spec.steps_per_epoch
        for _ in range(lead + skip):  # resumed: read past what the last checkpoint already trained on
            next(it)
        step_in_epoch = skip
        t0 = time.perf_counter()
        while step_in_epoch < spec.steps_per_epoch and pos.step < spec.total_steps:
            b = next(it, None)
            if b is None:
                raise RuntimeError(f"rank {rank}'s data ran out at epoch {epoch}, step {step_in_epoch}")
            s, own_scores, own = _score(eng, obj, b, spec)
            loss, m = obj.loss(s, params, kl_reduce)
            if not _all_finite(loss, world):
                if rank == 0:
                    fsio.write_json(out_dir / NAN_MARKER, {"step": pos.step + 1, "value": str(loss.item())})
                stop = True
                break
            _maybe_inject_fault(spec, out_dir, pos.step + 1, rank, world)
            eng.engine.backward(loss)
            eng.engine.step()
            cov.add(b)
            pos.step += 1
            step_in_epoch += 1
            dt, t0 = time.perf_counter() - t0, time.perf_counter()
            metrics.step(m, s, own_scores, own, lr=eng.sched.get_last_lr()[0], step=pos.step, epoch=epoch, dt=dt)
            if pos.step % t.checkpoint_every == 0 and pos.step < spec.total_steps:
                save(metrics.summary(), epoch, step_in_epoch)
        skip = 0
        if stop or pos.step >= spec.total_steps:
            break
    metrics.close()
    if not stop:
        epoch_done = step_in_epoch >= spec.steps_per_epoch
        save({**metrics.summary(), "final": True, "passes_read": passes.reads},
             epoch + (1 if epoch_done else 0), 0 if epoch_done else step_in_epoch)


def _all_finite(loss: Any, world: int) -> bool:
    """Whether every rank's loss is finite (a collective, so all ranks stop together)."""
    import torch
    import torch.distributed as dist

    bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
    if world > 1:
        dist.all_reduce(bad)
    return bad.item() == 0


def _maybe_inject_fault(spec: LoopSpec, out_dir: Path, step: int, rank: int, world: int) -> None:
    """Tests and chaos: the last rank raises once at ``spec.fail_at_step`` (first attempt only)."""
    if spec.fail_at_step and step == spec.fail_at_step and rank == world - 1:
        flag = out_dir / f".fault-injected-{spec.fail_at_step}"
        if not flag.exists():
            flag.write_text("1")
            raise RuntimeError(f"injected worker failure at step {step}")


def _summary(last: dict, totals: dict) -> dict:
    out = {k: v for k, v in last.items() if isinstance(v, float | int) and math.isfinite(v)}
    out["samples_per_s_mean"] = totals["samples"] / totals["time"] if totals["time"] else 0.0
    out["resumed_from_step"] = totals["resumed_from_step"]
    return out
