"""Column names and the Parquet schema of collected episodes (schema version 1).

One row per control step. Images and fixed-size vectors are Ray tensor-extension columns, so
``ray.data.read_parquet`` yields them as ndarrays (N, H, W, 3) / (N, D) without any decoding.
Each file also carries ``apo_ray.schema_version`` and ``apo_ray.env_meta`` (robomimic env metadata,
JSON) in its Arrow schema metadata.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

# c labels (the paper's convention): the corrector in envs writes them
from envs.labels import C_CORRECTOR, C_POLICY, C_UNDESIRABLE, NO_INTERVENTION  # noqa: F401 - schema's names

SCHEMA_VERSION = 1
ACTION_DIM = 7
PROPRIO_DIM = 9
"""eef pos (3) + eef quat xyzw (4) + gripper finger qpos (2)."""


EPISODE_ID = "episode_id"
ROUND = "round"
TASK = "task"
SCENARIO = "scenario"
SEED = "seed"
T = "t"
IMAGE = "image"
PROPRIO = "proprio"
ACTION = "action"
ORACLE_ACTION = "oracle_action"
C = "c"
INTERVENTION_ID = "intervention_id"
REWARD = "reward"
DONE = "done"
SUCCESS = "success"
INSTRUCTION = "instruction"
POLICY_VERSION = "policy_version"
STATE = "state"
"""Flattened MuJoCo sim state (robomimic's ``states``), for replay and HDF5 export."""

SCALAR_TYPES: dict[str, pa.DataType] = {
    EPISODE_ID: pa.string(),
    ROUND: pa.int32(),
    TASK: pa.string(),
    SCENARIO: pa.string(),
    SEED: pa.int64(),
    T: pa.int32(),
    C: pa.int8(),
    INTERVENTION_ID: pa.int32(),
    REWARD: pa.float32(),
    DONE: pa.bool_(),
    SUCCESS: pa.bool_(),
    INSTRUCTION: pa.string(),
    POLICY_VERSION: pa.string(),
}
TENSOR_COLUMNS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    IMAGE: (np.dtype(np.uint8), None),  # (H, W, 3): W = H (agentview) or 2H (+ wrist), see image_views
    PROPRIO: (np.dtype(np.float32), (PROPRIO_DIM,)),
    ACTION: (np.dtype(np.float32), (ACTION_DIM,)),
    ORACLE_ACTION: (np.dtype(np.float32), (ACTION_DIM,)),
}
STATE_TYPE = pa.list_(pa.float64())


def image_views(height: int, width: int) -> int:
    """Camera views an image tiles side by side: 1 (agentview), 2 (agentview + wrist), 0 for any other shape."""
    return width // height if height > 0 and width in (height, 2 * height) else 0

COLUMNS: tuple[str, ...] = (
    EPISODE_ID, ROUND, TASK, SCENARIO, SEED, T, IMAGE, PROPRIO, ACTION, ORACLE_ACTION, C,
    INTERVENTION_ID, REWARD, DONE, SUCCESS, INSTRUCTION, POLICY_VERSION, STATE,
)

META_VERSION = b"apo_ray.schema_version"
META_ENV = b"apo_ray.env_meta"


def tensor_array(values: np.ndarray) -> pa.ExtensionArray:
    """A Ray tensor-extension array (one ndarray per row) that Ray Data reads back natively."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(values))


def register_tensor_types() -> None:
    """Register Ray's tensor extension types with pyarrow; without it a reader sees bare flat lists."""
    import ray.data.extensions  # noqa: F401


def read_table(path: Any, columns: list[str] | None = None) -> pa.Table:
    """``pq.read_table`` that always yields tensor columns as tensors."""
    import pyarrow.parquet as pq

    register_tensor_types()
    return pq.read_table(path, columns=columns)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Stack a tensor-extension (or fixed-size-list) column into one ndarray."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if hasattr(col, "to_numpy_ndarray"):  # canonical arrow fixed_shape_tensor
        return col.to_numpy_ndarray()
    if isinstance(col.type, pa.ExtensionType):
        return col.to_numpy()
    return np.stack(col.to_numpy(zero_copy_only=False))


def episode_table(steps: dict[str, Any], env_meta: dict[str, Any]) -> pa.Table:
    """Build one episode's table from per-column arrays/lists of equal length."""
    n = len(steps[T])
    arrays, names = [], []
    for name in COLUMNS:
        v = steps[name]
        if name in TENSOR_COLUMNS:
            dtype, _ = TENSOR_COLUMNS[name]
            arr = tensor_array(np.asarray(v, dtype=dtype))
        elif name == STATE:
            arr = pa.array([np.asarray(s, dtype=np.float64) for s in v], type=STATE_TYPE)
        else:
            vals = v if isinstance(v, list | np.ndarray) else [v] * n
            arr = pa.array(vals, type=SCALAR_TYPES[name])
        if len(arr) != n:
            raise ValueError(f"column {name} has {len(arr)} rows, expected {n}")
        arrays.append(arr)
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    meta = {META_VERSION: str(SCHEMA_VERSION).encode(), META_ENV: json.dumps(env_meta).encode()}
    return table.replace_schema_metadata(meta)


def env_meta_of(schema: pa.Schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    return json.loads(meta.get(META_ENV, b"{}"))
