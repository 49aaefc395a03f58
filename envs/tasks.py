"""Task registry: the robosuite tasks we run, as data.

Every task is Panda + OSC_POSE at 20 Hz, built through robomimic's env layer so that ``env_meta`` (robomimic
environment metadata) describes each episode. A task names the object the robot manipulates and where it must
go; scenarios and oracles read those names instead of branching on the task.
"""

from __future__ import annotations

import copy
import difflib
import sys
import types
from dataclasses import dataclass
from typing import Any

from envs.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    env_name: str
    """robosuite environment class."""
    instruction: str
    horizon: int
    """Default max control steps per episode (about 2x the oracle's slowest episodes)."""
    object_body: str
    """Body of the object the robot picks (its free joint is the first joint of this body)."""
    object_obs: str
    """Prefix of the object's robosuite observables (``<prefix>_pos``, ``<prefix>_quat``)."""
    object_sampler: str
    """Sampler in the env's placement initializer that places the object ("" = the flat sampler)."""
    object_geoms: tuple[str, ...]
    """Visual geoms of the object (recoloured by texture scenarios)."""
    fixture_body: str = ""
    """Static body the object goes onto (Square's peg); the position scenario moves it."""


TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec(
        name="lift", env_name="Lift", instruction="lift the red cube", horizon=200,
        object_body="cube_main", object_obs="cube", object_sampler="", object_geoms=("cube_g0_vis",),
    ),
    "can": TaskSpec(
        name="can", env_name="PickPlaceCan", instruction="put the can into the right bin", horizon=300,
        object_body="Can_main", object_obs="Can", object_sampler="CollisionObjectSampler",
        object_geoms=("Can_g0_visual",),
    ),
    "square": TaskSpec(
        name="square", env_name="NutAssemblySquare", instruction="slide the square nut onto the square peg",
        horizon=400, object_body="SquareNut_main", object_obs="SquareNut", object_sampler="SquareNutSampler",
        object_geoms=tuple(f"SquareNut_g{i}_visual" for i in range(5)), fixture_body="peg1",
    ),
    "stack": TaskSpec(
        name="stack", env_name="Stack", instruction="stack the red block on the green block", horizon=300,
        object_body="cubeA_main", object_obs="cubeA", object_sampler="", object_geoms=("cubeA_g0_vis",),
    ),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid tasks: {', '.join(TASKS)}"
        raise UserError(f"unknown task '{name}'", "task", hint)
    return TASKS[name]


def install_mujoco_py_stub() -> None:
    """robomimic 0.3.0 imports mujoco_py only for an exception class; the real package cannot be installed."""
    if "mujoco_py" not in sys.modules:
        stub = types.ModuleType("mujoco_py")
        stub.builder = types.SimpleNamespace(MujocoException=Exception)  # type: ignore[attr-defined]
        sys.modules["mujoco_py"] = stub


WRIST_CAMERA = "robot0_eye_in_hand"


def env_meta(task: TaskSpec, *, camera: bool, image_size: int, hard_reset: bool = False,
             wrist: bool = False) -> dict[str, Any]:
    """robomimic env metadata (type 1 = robosuite) for one task; JSON-serializable."""
    from robosuite.controllers import load_controller_config

    kwargs: dict[str, Any] = {
        "robots": ["Panda"],
        "controller_configs": copy.deepcopy(load_controller_config(default_controller="OSC_POSE")),
        "control_freq": 20,
        "hard_reset": hard_reset,
        "reward_shaping": False,
    }
    if camera:
        kwargs.update(camera_names=["agentview", WRIST_CAMERA] if wrist else ["agentview"],
                      camera_heights=image_size, camera_widths=image_size)
    return {"env_name": task.env_name, "type": 1, "env_kwargs": kwargs}
