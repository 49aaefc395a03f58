"""robomimic HDF5 export: robomimic's own SequenceDataset loads it, and it reads back as the same episodes."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from apo_ray import schema as S
from apo_ray.errors import UserError
from apo_ray.hdf5 import export_hdf5, hdf5_to_episodes
from tests.test_data import ENV_META, IMG, episode, write


@pytest.fixture
def episodes_dir(tmp_path: Path) -> Path:
    return write(tmp_path / "episodes", {"e0": episode("e0", [1, 1, 2, 2, 1]), "e1": episode("e1", [1] * 4)})


def _robomimic_dataset(path: Path):
    # robomimic 0.3.0's env code imports mujoco_py for an exception class only; the dataset code doesn't,
    # but keep the import safe either way (docs: stack.md).
    if "mujoco_py" not in sys.modules:
        stub = types.ModuleType("mujoco_py")
        stub.builder = types.SimpleNamespace(MujocoException=Exception)
        sys.modules["mujoco_py"] = stub
    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    low = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": low, "rgb": ["agentview_image"]}})
    return SequenceDataset(hdf5_path=str(path), obs_keys=[*low, "agentview_image"],
                           dataset_keys=["actions", "rewards", "dones", "c"], load_next_obs=True,
                           seq_length=2, hdf5_cache_mode=None)


def test_export_loads_in_robomimic(episodes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demos.hdf5"
    summary = export_hdf5([episodes_dir], out)
    assert summary == {"demos": 2, "steps": 9, "intervention_steps": 2, "out": str(out)}
    with h5py.File(out, "r") as f:
        assert json.loads(f["data"].attrs["env_args"]) == ENV_META
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1"]
        np.testing.assert_array_equal(f["data/demo_0/c"][:], [1, 1, 2, 2, 1])  # per-step intervention labels
        assert f["data/demo_0/obs/agentview_image"].shape == (5, IMG, IMG, 3)
    ds = _robomimic_dataset(out)
    assert len(ds) == 9  # one sample per step
    item = ds[2]
    assert item["actions"].shape == (2, 7)
    assert item["obs"]["agentview_image"].shape[0] == 2
    np.testing.assert_allclose(item["actions"][0], pq.read_table(episodes_dir / "e0.parquet")[S.ACTION]
                               .combine_chunks().to_numpy_ndarray()[2], atol=1e-6)


def test_hdf5_reads_back_as_expert_episodes(episodes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demos.hdf5"
    export_hdf5([episodes_dir], out)
    tables = list(hdf5_to_episodes(out))
    assert [t.num_rows for t in tables] == [5, 4]
    orig = pq.read_table(episodes_dir / "e0.parquet")
    back = tables[0]
    assert back[S.EPISODE_ID][0].as_py() == "e0" and back[S.INSTRUCTION][0].as_py() == "lift the cube"
    for name in (S.IMAGE, S.PROPRIO, S.ACTION):
        np.testing.assert_allclose(S.column_to_numpy(back[name]), S.column_to_numpy(orig[name]), atol=1e-6)
    assert set(back[S.C].to_pylist()) == {1}  # demonstrations are expert data
    assert S.env_meta_of(back.schema) == ENV_META


def test_wrist_images_export_as_robomimics_two_views_and_read_back_side_by_side(tmp_path: Path) -> None:
    eps = write(tmp_path / "episodes", {"w0": episode("w0", [1, 2, 1], views=2)})
    out = tmp_path / "wrist.hdf5"
    export_hdf5([eps], out)
    orig = S.column_to_numpy(pq.read_table(eps / "w0.parquet")[S.IMAGE])
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/obs/agentview_image"][:], orig[:, :, :IMG])
        np.testing.assert_array_equal(f["data/demo_0/obs/robot0_eye_in_hand_image"][:], orig[:, :, IMG:])
        assert f["data/demo_0/obs/robot0_eye_in_hand_image"][0, 0, 0, 0] == 107  # the wrist half
    back = next(hdf5_to_episodes(out))
    np.testing.assert_array_equal(S.column_to_numpy(back[S.IMAGE]), orig)
    with h5py.File(out, "a") as f:  # a wrist view of another size cannot sit beside agentview
        del f["data/demo_0/obs/robot0_eye_in_hand_image"]
        f["data/demo_0/obs/robot0_eye_in_hand_image"] = np.zeros((3, IMG, IMG + 2, 3), np.uint8)
    with pytest.raises(UserError, match="robot0_eye_in_hand_image is uint8"):
        next(hdf5_to_episodes(out))


def test_bad_hdf5(tmp_path: Path) -> None:
    p = tmp_path / "x.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("data/demo_0").create_dataset("actions", data=np.zeros((3, 7)))
    with pytest.raises(UserError) as e:
        list(hdf5_to_episodes(p))
    assert "data/demo_0/obs/agentview_image" in e.value.line()
    with pytest.raises(UserError):
        export_hdf5([tmp_path / "nope"], tmp_path / "y.hdf5")
