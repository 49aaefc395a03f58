"""robomimic HDF5 interop: export episode Parquet files as a robomimic dataset, and read one back as episodes.

Layout (robomimic v0.3 ``SequenceDataset`` reads it as is)::

    data.attrs: env_args (robomimic env metadata, JSON), total (steps)
    data/demo_i.attrs: num_samples, episode_id, instruction, task, scenario, seed, round, success
    data/demo_i/obs/{agentview_image (T,H,W,3) uint8, robot0_eef_pos (T,3), robot0_eef_quat (T,4) xyzw,
                     robot0_gripper_qpos (T,2)} (+ robot0_eye_in_hand_image (T,H,W,3) uint8 for wrist episodes)
                     (+ next_obs/ the same, shifted by one step)
    data/demo_i/{actions (T,7), rewards (T,), dones (T,), states (T,S)}
    data/demo_i/{c (T,) int8 labels (1 policy, 2 corrector), intervention_id (T,), oracle_actions (T,7)}

Images are stored as the episodes hold them (upright, from our envs); a foreign file's images are taken as is.
An episode image of agentview + wrist side by side, (H, 2H, 3), is split into robomimic's two keys, and a file
with both keys is read back side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from apo_ray import schema as S
from apo_ray.errors import UserError
from apo_ray.fsio import TMP_PREFIX, atomic_path

OBS_IMAGE = "agentview_image"
OBS_WRIST = "robot0_eye_in_hand_image"
OBS_LOW_DIM = (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2))
"""Splits of our 9-D proprio, in order, under robomimic's observation names."""


def _episode_files(dirs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for d in map(Path, dirs):
        if d.is_file():
            files.append(d)
        elif d.is_dir():
            files += sorted(p for p in d.rglob("*.parquet") if not p.name.startswith(TMP_PREFIX))
        else:
            raise UserError(f"input not found: {d}", str(d), "pass an episodes dir written by apo-ray collect")
    if not files:
        raise UserError("no episode files found", " ".join(map(str, dirs)), "pass a dir holding *.parquet episodes")
    return files


def _read_episode(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
        table = S.read_table(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise UserError(f"unreadable episode file ({type(e).__name__})", f"{path}, column *",
                        "re-collect it or remove it") from None
    for name in S.COLUMNS:
        if name not in table.column_names:
            raise UserError(f"missing column '{name}'", f"{path}, column {name}",
                            "write episodes with apo_ray.schema.episode_table")
    order = np.argsort(table[S.T].to_numpy(), kind="stable")
    ep = {name: S.column_to_numpy(table[name])[order] for name in S.TENSOR_COLUMNS}
    for name in S.SCALAR_TYPES:
        ep[name] = table[name].to_numpy(zero_copy_only=False)[order]
    states = table[S.STATE].to_pylist()
    ep[S.STATE] = np.array([states[i] for i in order], dtype=np.float64)
    return ep, S.env_meta_of(table.schema)


def export_hdf5(episode_dirs: Iterable[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write every episode under ``episode_dirs`` as one robomimic demo; atomic. Returns a summary dict."""
    files = _episode_files(episode_dirs)
    env_meta: dict[str, Any] | None = None
    total = interventions = 0
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        for i, path in enumerate(files):
            ep, meta = _read_episode(path)
            if env_meta is None:
                env_meta = meta
            elif meta.get("env_name") != env_meta.get("env_name"):
                raise UserError(f"episode of env {meta.get('env_name')!r} among {env_meta.get('env_name')!r} "
                                "episodes; a robomimic file holds one env", str(path), "export one task per file")
            n = len(ep[S.T])
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = n
            for key in (S.EPISODE_ID, S.INSTRUCTION, S.TASK, S.SCENARIO, S.POLICY_VERSION):
                g.attrs[key] = str(ep[key][0]) if n else ""
            for key in (S.SEED, S.ROUND):
                g.attrs[key] = int(ep[key][0]) if n else 0
            g.attrs[S.SUCCESS] = bool(ep[S.SUCCESS].any())
            img = ep[S.IMAGE]
            if img.ndim == 4 and S.image_views(img.shape[1], img.shape[2]) == 2:
                h = img.shape[1]
                obs = {OBS_IMAGE: img[:, :, :h], OBS_WRIST: img[:, :, h:]}
            else:
                obs = {OBS_IMAGE: img}
            lo = 0
            for name, dim in OBS_LOW_DIM:
                obs[name] = ep[S.PROPRIO][:, lo: lo + dim].astype(np.float64)
                lo += dim
            nxt = np.minimum(np.arange(n) + 1, n - 1)  # robomimic convention: the last next_obs repeats
            for group, rows in (("obs", slice(None)), ("next_obs", nxt)):
                og = g.create_group(group)
                for name, v in obs.items():
                    og.create_dataset(name, data=v[rows])
            g.create_dataset("actions", data=ep[S.ACTION].astype(np.float64))
            g.create_dataset("rewards", data=ep[S.REWARD].astype(np.float64))
            g.create_dataset("dones", data=ep[S.DONE].astype(np.int64))
            g.create_dataset("states", data=ep[S.STATE])
            g.create_dataset("c", data=ep[S.C].astype(np.int8))
            g.create_dataset("intervention_id", data=ep[S.INTERVENTION_ID].astype(np.int32))
            g.create_dataset("oracle_actions", data=ep[S.ORACLE_ACTION].astype(np.float64))
            total += n
            interventions += int((ep[S.C] == S.C_CORRECTOR).sum())
        data.attrs["env_args"] = json.dumps(env_meta or {})
        data.attrs["total"] = total
    return {"demos": len(files), "steps": total, "intervention_steps": interventions, "out": str(out_path)}


def _instruction(env_name: str, attrs: dict[str, Any], where: str) -> str:
    if attrs.get(S.INSTRUCTION):
        return str(attrs[S.INSTRUCTION])
    from envs.tasks import TASKS  # a foreign robomimic file: the instruction of our task on that env

    for spec in TASKS.values():
        if spec.env_name == env_name:
            return spec.instruction
    raise UserError(f"no instruction for env {env_name!r}", where,
                    "set the demo's 'instruction' attribute, or use a task from `apo-ray tasks`")


def hdf5_to_episodes(path: str | os.PathLike[str]) -> Iterator[pa.Table]:
    """A robomimic HDF5 file's demos as episode tables (expert demonstrations: c = 1 everywhere)."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"unreadable HDF5 file ({e})", str(path), "pass a robomimic dataset .hdf5") from None
    with f:
        if "data" not in f:
            raise UserError("no 'data' group", f"{path}, key data", "pass a robomimic dataset .hdf5")
        data = f["data"]
        env_meta = json.loads(data.attrs.get("env_args", "{}"))
        env_name = env_meta.get("env_name", "")
        demos = sorted(data.keys(), key=lambda k: int(k.split("_")[-1]) if k.split("_")[-1].isdigit() else -1)
        for k in demos:
            g = data[k]
            where = f"{path}, key data/{k}"
            for key in ("actions", f"obs/{OBS_IMAGE}", *(f"obs/{n}" for n, _ in OBS_LOW_DIM)):
                if key not in g:
                    raise UserError(f"missing dataset '{key}'", f"{path}, key data/{k}/{key}",
                                    "export image datasets with robomimic's dataset_states_to_obs (agentview)")
            actions = np.asarray(g["actions"], dtype=np.float32)
            n = len(actions)
            image = np.asarray(g[f"obs/{OBS_IMAGE}"])
            if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
                raise UserError(f"{OBS_IMAGE} is {image.dtype} {image.shape}, expected (T,H,W,3) uint8",
                                f"{path}, key data/{k}/obs/{OBS_IMAGE}", "store RGB uint8 images")
            if f"obs/{OBS_WRIST}" in g:
                wrist = np.asarray(g[f"obs/{OBS_WRIST}"])
                if wrist.dtype != np.uint8 or wrist.shape != image.shape:
                    raise UserError(f"{OBS_WRIST} is {wrist.dtype} {wrist.shape}, expected {image.shape} uint8 "
                                    f"like {OBS_IMAGE}", f"{path}, key data/{k}/obs/{OBS_WRIST}",
                                    "store both views as RGB uint8 of one size")
                image = np.concatenate([image, wrist], axis=2)
            proprio = np.concatenate([np.asarray(g[f"obs/{name}"], dtype=np.float32) for name, _ in OBS_LOW_DIM],
                                     axis=1)
            attrs = dict(g.attrs)
            rewards = np.asarray(g["rewards"], np.float32) if "rewards" in g else np.zeros(n, np.float32)
            dones = np.asarray(g["dones"]).astype(bool) if "dones" in g else np.arange(n) == n - 1
            states = np.asarray(g["states"], np.float64) if "states" in g else np.zeros((n, 0))
            oracle = np.asarray(g["oracle_actions"], np.float32) if "oracle_actions" in g else actions
            steps = {
                S.EPISODE_ID: str(attrs.get(S.EPISODE_ID, f"{path.stem}/{k}")), S.ROUND: int(attrs.get(S.ROUND, 0)),
                S.TASK: str(attrs.get(S.TASK, env_name)), S.SCENARIO: str(attrs.get(S.SCENARIO, "nominal")),
                S.SEED: int(attrs.get(S.SEED, -1)), S.T: np.arange(n, dtype=np.int32), S.IMAGE: image,
                S.PROPRIO: proprio, S.ACTION: actions, S.ORACLE_ACTION: oracle,
                S.C: np.full(n, S.C_POLICY, np.int8), S.INTERVENTION_ID: np.full(n, S.NO_INTERVENTION, np.int32),
                S.REWARD: rewards, S.DONE: dones, S.SUCCESS: bool(attrs.get(S.SUCCESS, True)),
                S.INSTRUCTION: _instruction(env_name, attrs, where),
                S.POLICY_VERSION: str(attrs.get(S.POLICY_VERSION, "expert")), S.STATE: list(states),
            }
            yield S.episode_table(steps, env_meta)
