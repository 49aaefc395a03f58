"""``TaskEnv``: one robosuite task under one scenario, with upright images and privileged state.

Built through robomimic's ``EnvUtils.create_env_from_metadata`` with ``hard_reset=False``, so the sim, its GL
context and our render and scenario edits survive resets (a hard reset would rebuild them, ~1 s each).
Stepping goes straight to the robosuite env; robomimic's observation post-processing is not needed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from envs import scenarios as sc
from envs.errors import UserError
from envs.tasks import WRIST_CAMERA, env_meta, get_task, install_mujoco_py_stub


def apply_cheap_render(env: Any, size: int) -> None:
    """No reflections, shadows or MSAA, and an offscreen buffer of the image's size: ~3x faster on CPU."""
    import mujoco

    ctx = env.sim._render_context_offscreen
    if ctx is None:
        return
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    model = env.sim.model
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = size
    model.vis.global_.offheight = size
    ctx.gl_ctx.make_current()
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()  # the context holds the buffer size and uploaded textures


def _upload_textures(env: Any) -> None:
    ctx = env.sim._render_context_offscreen
    if ctx is not None:
        for tex in range(env.sim.model.ntex):
            ctx.upload_texture(tex)


class TaskEnv:
    """obs = {"image": (S,S,3) uint8 agentview upright (camera only), "proprio": (9,) float32
    (eef pos, eef quat xyzw, 2 finger qpos), "privileged": dict of numpy arrays}.

    With ``wrist``, "image" is (S,2S,3): agentview and the eye-in-hand view side by side, so every stage that
    stores, shows or encodes one image handles both views unchanged."""

    def __init__(self, task: str, scenario: str = "nominal", image_size: int = 64, camera: bool = True,
                 cheap_render: bool = True, horizon: int = 0, wrist: bool = False) -> None:
        if camera and not 64 <= image_size <= 224:
            raise UserError(f"image size {image_size} out of range", "image_size", "use a value in 64..224")
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
        install_mujoco_py_stub()
        import robomimic.utils.env_utils as EnvUtils

        self.task = get_task(task)
        self.spec = sc.compose(scenario)
        self.scenario = self.spec.name
        self.instruction = self.task.instruction
        self.horizon = horizon or self.task.horizon
        self.image_size = image_size
        self.camera = camera
        self.wrist = camera and wrist
        self.env_meta = env_meta(self.task, camera=camera, image_size=image_size, wrist=self.wrist)
        # robosuite draws model-build randomness (e.g. Lift's cube size) from the global RNG at construction:
        # fix it so every process builds the identical model and a seed alone determines the episode
        np.random.seed(0)
        self._rm_env = EnvUtils.create_env_from_metadata(self.env_meta, render_offscreen=camera,
                                                         use_image_obs=camera)
        self.env_meta["apo_ray"] = {"task": self.task.name, "scenario": self.scenario}
        self.env = self._rm_env.env  # the robosuite env
        self._handles = sc.configure(self.env, self.task, self.spec)
        if camera and cheap_render:
            apply_cheap_render(self.env, image_size)
        elif camera:
            _upload_textures(self.env)
        model = self.env.sim.model
        self._grasp_geoms = [model.geom_id2name(g) for g in self._handles.object_geoms
                             if model.geom_contype[g] or model.geom_conaffinity[g]]
        self._grasp_geoms = [g for g in self._grasp_geoms if g]
        self._handle_site = (model.site_name2id(f"{self.task.object_obs}_handle_site")
                             if f"{self.task.object_obs}_handle_site" in _site_names(model) else -1)
        self._push = (0, 0, np.zeros(3))
        self._t = 0
        self._start_pos = np.zeros(3)

    # -------------------------------------------------------------------------------------------- API
    def reset(self, seed: int) -> dict[str, Any]:
        self._make_current()
        np.random.seed(seed)  # robosuite's placement samplers draw from the global RNG
        self.env.reset()
        rng = np.random.default_rng(seed)
        sc.randomize(self.env, self.task, self.spec, self._handles, rng)
        self._push = sc.push_schedule(self.spec, rng)
        self.env.sim.data.xfrc_applied[:] = 0
        self._t = 0
        self._start_pos = self.env.sim.data.body_xpos[self._handles.object_body].copy()
        return self._obs(self.env._get_observations(force_update=True))

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        self._make_current()
        sc.apply_push(self.env, self._handles, self._push, self._t)
        raw, reward, _, _ = self.env.step(np.asarray(action, dtype=np.float64))
        self._t += 1
        success = self.is_success()
        done = success or self._t >= self.horizon
        return self._obs(raw), float(reward), bool(done), {"success": success}

    def is_success(self) -> bool:
        return bool(self.env._check_success())

    def get_state(self) -> np.ndarray:
        return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

    def close(self) -> None:
        self.env.close()

    # ---------------------------------------------------------------------------------------- helpers
    def _make_current(self) -> None:
        """robosuite renders into whichever GL context is current; with several envs in one process
        (envs_per_worker > 1, tests) that must be this env's own."""
        ctx = self.env.sim._render_context_offscreen if self.camera else None
        if ctx is not None:
            ctx.gl_ctx.make_current()

    def _obs(self, raw: dict[str, Any]) -> dict[str, Any]:
        eef_pos = np.asarray(raw["robot0_eef_pos"], np.float64)
        eef_quat = np.asarray(raw["robot0_eef_quat"], np.float64)
        grip = np.asarray(raw["robot0_gripper_qpos"], np.float64)
        obs: dict[str, Any] = {
            "proprio": np.concatenate([eef_pos, eef_quat, grip]).astype(np.float32),
            "privileged": self._privileged(raw, eef_pos, eef_quat, grip),
        }
        if self.camera:
            views = [raw["agentview_image"], *([raw[f"{WRIST_CAMERA}_image"]] if self.wrist else [])]
            # robosuite renders upside down
            obs["image"] = np.ascontiguousarray(np.concatenate([v[::-1] for v in views], axis=1))
        return obs

    def _privileged(self, raw: dict[str, Any], eef_pos: np.ndarray, eef_quat: np.ndarray,
                    grip: np.ndarray) -> dict[str, np.ndarray]:
        sim, h = self.env.sim, self._handles
        obj_pos = np.asarray(raw[f"{self.task.object_obs}_pos"], np.float64)
        obj_quat = np.asarray(raw[f"{self.task.object_obs}_quat"], np.float64)
        grasp_pos = sim.data.site_xpos[self._handle_site].copy() if self._handle_site >= 0 else obj_pos.copy()
        priv = {
            "eef_pos": eef_pos, "eef_quat": eef_quat, "gripper_qpos": grip,
            "object_pos": obj_pos, "object_quat": obj_quat, "object_start_pos": self._start_pos.copy(),
            "object_vel": sim.data.get_joint_qvel(h.object_joint)[:3].copy(),
            "grasp_pos": grasp_pos,
            "grasped": np.array(self._grasped(grip, eef_pos, grasp_pos)),
            "success": np.array(self.is_success()),
            "target_pos": self._target_pos(obj_pos),
            "table_z": np.array(self._table_z()),
            "wall_clearance": self._wall_clearance(obj_pos),
            "t": np.array(self._t),
        }
        return priv

    def _grasped(self, grip: np.ndarray, eef_pos: np.ndarray, grasp_pos: np.ndarray) -> bool:
        """Both fingerpads touch the object, or the fingers stopped part-closed around its grasp point: the
        contact test alone flickers on a firmly held object."""
        env = self.env
        if env._check_grasp(gripper=env.robots[0].gripper, object_geoms=self._grasp_geoms):
            return True
        gap = float(grip[0] - grip[1])
        return GRASP_GAP[0] < gap < GRASP_GAP[1] and float(np.linalg.norm(grasp_pos - eef_pos)) < 0.015

    def _target_pos(self, obj_pos: np.ndarray) -> np.ndarray:
        env, sim = self.env, self.env.sim
        if self.task.fixture_body:
            return sim.data.body_xpos[self._handles.fixture_body].copy()
        if self.task.name == "can":
            return np.asarray(env.target_bin_placements[env.object_to_id["can"]], np.float64).copy()
        if self.task.name == "stack":
            return np.asarray(sim.data.body_xpos[env.cubeB_body_id], np.float64).copy()
        return self._start_pos + np.array([0.0, 0.0, 0.2])  # lift: raise it 20 cm

    def _wall_clearance(self, obj_pos: np.ndarray) -> np.ndarray:
        """(x, y) distance from the object's centre to the nearest wall of the bin it starts in (inf on a
        table): an open finger beside the object needs room there."""
        env = self.env
        if not hasattr(env, "bin1_pos"):
            return np.array([np.inf, np.inf])
        return np.asarray(env.bin_size[:2], np.float64) / 2 - np.abs(obj_pos[:2] - np.asarray(env.bin1_pos[:2]))

    def _table_z(self) -> float:
        env = self.env
        if hasattr(env, "table_offset"):
            return float(env.table_offset[2])
        return float(env.bin1_pos[2])


GRASP_GAP = (0.006, 0.07)
"""Finger gap (m) of a gripper closed on an object: above empty (fully closed), below open."""


def _site_names(model: Any) -> set[str]:
    return {model.site_id2name(i) for i in range(model.nsite)}
