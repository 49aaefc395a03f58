"""Disruption scenarios as data, composable with '+'.

A scenario is one :class:`ScenarioSpec` entry of ``SCENARIOS``: each field is a kind of change (object region,
fixture region, colours, texture, distractors, physics scales, push), and ``compose`` overlays the entries of a
composition like ``position+texture``. Three generic appliers interpret the merged spec:

- ``configure``: once per env (placement ranges, XML for distractors, colours, textures);
- ``randomize``: after every reset, from a ``np.random.Generator`` seeded by the episode seed;
- ``push_force``: the external force on the object at control step t.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from envs.errors import UserError
from envs.tasks import TaskSpec

Range = tuple[float, float]


@dataclass(frozen=True)
class PushSpec:
    accel: Range
    """Horizontal acceleration of the object while pushed, m/s^2 (force = mass x accel)."""
    start: tuple[int, int]
    """Control step at which the push starts, drawn uniformly (inclusive)."""
    steps: int
    """Control steps the force lasts."""


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    description: str
    object_region: dict[str, tuple[Range, Range]] = field(default_factory=dict)
    """Per task: (x_range, y_range) replacing the object's placement-sampler ranges (sampler-relative)."""
    fixture_region: dict[str, tuple[Range, Range]] = field(default_factory=dict)
    """Per task: (x_range, y_range) world position of the task's fixture body, drawn per episode."""
    background_rgba: tuple[float, ...] = ()
    """Flat colour replacing the walls, floor and table top."""
    background_geoms: tuple[str, ...] = ("wall_", "floor", "table_visual")
    object_texture: str = ""
    """robosuite texture file painted over the object's own texture (its material turns white)."""
    distractors: int = 0
    distractor_region: dict[str, tuple[Range, Range, float]] = field(default_factory=dict)
    """Per task: world (x_range, y_range, table z) where distractors are dropped."""
    mass_scale: Range = ()  # type: ignore[assignment]
    friction_scale: Range = ()  # type: ignore[assignment]
    size_scale: Range = ()  # type: ignore[assignment]
    push: PushSpec | None = None


_TABLE_REGION = ((-0.2, 0.2), (-0.28, 0.28), 0.8)

SCENARIOS: dict[str, ScenarioSpec] = {
    s.name: s
    for s in (
        ScenarioSpec("nominal", "robosuite's default task, the demonstration distribution"),
        ScenarioSpec(
            "position",
            "the object starts outside the demo region (Lift: cube x 0.08..0.12 instead of +-0.03; Stack: "
            "cubes shifted +x; Can: only the bin's near-left quarter); Square: the peg is placed at random",
            object_region={
                "lift": ((0.08, 0.12), (-0.03, 0.03)),
                "can": ((-0.195, 0.0), (-0.245, 0.0)),
                "stack": ((0.06, 0.14), (-0.08, 0.08)),
            },
            fixture_region={"square": ((0.13, 0.25), (0.02, 0.18))},
        ),
        ScenarioSpec("background", "the white/light-gray walls, floor and table turn dark gray",
                     background_rgba=(0.35, 0.35, 0.38, 1.0)),
        ScenarioSpec("texture", "the object's colour/texture is replaced by light wood (red cube -> wooden cube)",
                     object_texture="light-wood.png"),
        ScenarioSpec(
            "distractor", "three extra objects (boxes, ball, cylinder) lie on the table or in the bin",
            distractors=3,
            distractor_region={"lift": _TABLE_REGION, "stack": _TABLE_REGION, "square": _TABLE_REGION,
                               "can": ((-0.05, 0.25), (-0.45, -0.05), 0.82)},
        ),
        ScenarioSpec("physics", "object mass x0.5..3, friction x0.5..1.5 and size x0.85..1.15 (box geoms; the can mesh "
                     "keeps its size), drawn per episode",
                     mass_scale=(0.5, 3.0), friction_scale=(0.5, 1.5), size_scale=(0.85, 1.15)),
        ScenarioSpec("push", "an external horizontal force shoves the object once, early in the episode",
                     push=PushSpec(accel=(13.0, 16.0), start=(8, 30), steps=2)),
    )
}


def parse_scenario(name: str) -> tuple[str, ...]:
    """``"position+texture"`` -> ``("position", "texture")``; UserError naming the closest valid scenario."""
    parts = tuple(p.strip() for p in name.split("+"))
    for p in parts:
        if p not in SCENARIOS:
            close = difflib.get_close_matches(p, list(SCENARIOS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid scenarios: {', '.join(SCENARIOS)}"
            raise UserError(f"unknown scenario '{p}' in '{name}'", "scenario", hint + " (compose with '+')")
    if len(set(parts)) != len(parts):
        raise UserError(f"scenario '{name}' repeats a part", "scenario", "name each scenario once")
    return tuple(p for p in parts if p != "nominal") or ("nominal",)


def compose(name: str) -> ScenarioSpec:
    """Merge the entries of a composition: each part sets the fields it changes, later parts win."""
    parts = parse_scenario(name)
    merged = SCENARIOS[parts[0]]
    for p in parts[1:]:
        spec = SCENARIOS[p]
        changes = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                   if f.name not in ("name", "description", "background_geoms")
                   and getattr(spec, f.name) != getattr(SCENARIOS["nominal"], f.name)}
        merged = dataclasses.replace(merged, **changes)
    return dataclasses.replace(merged, name="+".join(parts), description="; ".join(SCENARIOS[p].description
                                                                                    for p in parts))


# ---------------------------------------------------------------------------------------------- appliers


@dataclass
class SceneHandles:
    """Model indices and default values the per-episode appliers need (found once per env)."""

    object_body: int
    object_joint: str
    object_geoms: np.ndarray
    fixture_body: int
    fixture_pos: np.ndarray
    defaults: dict[str, np.ndarray]
    distractor_joints: list[str]


def _sampler(env: Any, task: TaskSpec) -> Any:
    pi = env.placement_initializer
    return pi.samplers[task.object_sampler] if task.object_sampler else pi


def _geoms_of_body(model: Any, body: int) -> np.ndarray:
    """Geoms of a body and all its descendants."""
    bodies = {body}
    for b in range(model.nbody):  # parents precede children in MuJoCo's body order
        if model.body_parentid[b] in bodies and b != 0:
            bodies.add(b)
    return np.array([g for g in range(model.ngeom) if model.geom_bodyid[g] in bodies], dtype=int)


@cache
def _texture_image(file: str) -> np.ndarray:
    import imageio.v3 as iio
    import robosuite

    path = Path(robosuite.__file__).parent / "models" / "assets" / "textures" / file
    return np.asarray(iio.imread(path))[..., :3]


def _paint_texture(model: Any, tex: int, image: np.ndarray) -> None:
    """Overwrite a texture's pixels with ``image`` tiled (nearest) to its size; cube textures get it per face."""
    h, w, c = int(model.tex_height[tex]), int(model.tex_width[tex]), int(model.tex_nchannel[tex])
    rows = (np.arange(h) % w) * image.shape[0] // w  # cube textures stack square faces vertically
    cols = np.arange(w) * image.shape[1] // w
    pix = image[rows][:, cols]
    if c == 4:
        pix = np.concatenate([pix, np.full((h, w, 1), 255, np.uint8)], axis=-1)
    adr = int(model.tex_adr[tex])
    model.tex_data[adr: adr + h * w * c] = pix[..., :c].reshape(-1)


def _add_distractors(env: Any, n: int) -> None:
    """Rebuild the sim from the task XML with n free-floating primitive objects (placed per episode)."""
    from robosuite.models.objects import BallObject, BoxObject, CylinderObject

    shapes = [
        BoxObject(name="distractor0", size=[0.022, 0.022, 0.022], rgba=[0.1, 0.3, 0.9, 1]),
        BallObject(name="distractor1", size=[0.025], rgba=[0.95, 0.8, 0.1, 1]),
        CylinderObject(name="distractor2", size=[0.02, 0.03], rgba=[0.6, 0.1, 0.7, 1]),
        BoxObject(name="distractor3", size=[0.03, 0.015, 0.015], rgba=[0.1, 0.7, 0.3, 1]),
    ]
    env.model.merge_objects(shapes[:n])
    env.reset_from_xml_string(env.edit_model_xml(env.model.get_xml()))


def configure(env: Any, task: TaskSpec, spec: ScenarioSpec) -> SceneHandles:
    """One-time changes to a freshly built robosuite env; returns what the per-episode appliers need."""
    if task.name in spec.object_region:
        sampler = _sampler(env, task)
        sampler.x_range, sampler.y_range = (list(r) for r in spec.object_region[task.name])
    if spec.distractors:
        _add_distractors(env, spec.distractors)
    model = env.sim.model
    if spec.background_rgba:
        for g in range(model.ngeom):
            name = model.geom_id2name(g) or ""
            if name.startswith(spec.background_geoms) and model.geom_group[g] == 1 or name == "floor":
                model.geom_matid[g] = -1
                model.geom_rgba[g] = spec.background_rgba
    body = model.body_name2id(task.object_body)
    geoms = _geoms_of_body(model, body)
    if spec.object_texture:
        image = _texture_image(spec.object_texture)
        for name in task.object_geoms:
            g = model.geom_name2id(name)
            mat = model.geom_matid[g]
            if mat >= 0:
                tex = model.mat_texid[mat][1]  # mjTEXROLE_RGB
                if tex >= 0:
                    _paint_texture(model, tex, image)
                model.mat_rgba[mat] = (1, 1, 1, 1)
                model.mat_reflectance[mat] = 0.0
            model.geom_rgba[g] = (1, 1, 1, 1)
    fixture = model.body_name2id(task.fixture_body) if task.fixture_body else -1
    defaults = {
        "body_mass": model.body_mass.copy(), "body_inertia": model.body_inertia.copy(),
        "geom_friction": model.geom_friction.copy(), "geom_size": model.geom_size.copy(),
        "geom_pos": model.geom_pos.copy(), "geom_rbound": model.geom_rbound.copy(),
    }
    return SceneHandles(
        object_body=body, object_joint=env.sim.model.joint_id2name(model.body_jntadr[body]), object_geoms=geoms,
        fixture_body=fixture, fixture_pos=model.body_pos[fixture].copy() if fixture >= 0 else np.zeros(3),
        defaults=defaults, distractor_joints=[f"distractor{i}_joint0" for i in range(spec.distractors)],
    )


def randomize(env: Any, task: TaskSpec, spec: ScenarioSpec, h: SceneHandles, rng: np.random.Generator) -> None:
    """Per-episode changes after ``env.reset()``; defaults are restored first so episodes never leak."""
    sim, model = env.sim, env.sim.model
    for key, value in h.defaults.items():
        getattr(model, key)[:] = value
    if task.name in spec.fixture_region and h.fixture_body >= 0:
        (x0, x1), (y0, y1) = spec.fixture_region[task.name]
        model.body_pos[h.fixture_body][:2] = rng.uniform(x0, x1), rng.uniform(y0, y1)
    if spec.mass_scale:
        s = rng.uniform(*spec.mass_scale)
        model.body_mass[h.object_body] *= s
        model.body_inertia[h.object_body] *= s
    if spec.friction_scale:
        model.geom_friction[h.object_geoms, 0] *= rng.uniform(*spec.friction_scale)
    if spec.size_scale:
        s = rng.uniform(*spec.size_scale)
        prim = h.object_geoms[model.geom_type[h.object_geoms] != 7]  # meshes keep their size
        half_z = float(np.max(model.geom_size[prim, 2] if len(prim) else [0.0]))
        model.geom_size[prim] *= s
        model.geom_pos[prim] *= s
        model.geom_rbound[prim] *= s
        qpos = sim.data.get_joint_qpos(h.object_joint).copy()
        qpos[2] += max(s - 1.0, 0.0) * half_z  # a grown object must not start inside the table
        sim.data.set_joint_qpos(h.object_joint, qpos)
    if h.distractor_joints:
        _place_distractors(env, task, spec, h, rng)
    sim.forward()


def _place_distractors(env: Any, task: TaskSpec, spec: ScenarioSpec, h: SceneHandles,
                       rng: np.random.Generator) -> None:
    sim = env.sim
    (x0, x1), (y0, y1), z = spec.distractor_region[task.name]
    keep_clear = [sim.data.body_xpos[h.object_body][:2].copy()]
    if h.fixture_body >= 0:
        keep_clear.append(sim.model.body_pos[h.fixture_body][:2].copy())
    for b in range(sim.model.nbody):  # other task objects (Stack's base cube) stay clear too
        name = sim.model.body_id2name(b) or ""
        other = name.endswith("_main") and name != task.object_body and not name.startswith(("Visual", "distractor"))
        if other and sim.data.body_xpos[b][2] > 0.5:  # removed objects are parked below the floor
            keep_clear.append(sim.data.body_xpos[b][:2].copy())
    eef = sim.data.site_xpos[sim.model.site_name2id("gripper0_grip_site")][:2].copy()
    keep_clear.append(eef)
    for joint in h.distractor_joints:
        xy = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        for _ in range(100):
            if all(np.linalg.norm(xy - c) > 0.09 for c in keep_clear):
                break
            xy = np.array([rng.uniform(x0, x1), rng.uniform(y0, y1)])
        keep_clear.append(xy)
        yaw = rng.uniform(0, np.pi)
        sim.data.set_joint_qpos(joint, np.array([xy[0], xy[1], z + 0.04, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]))


def push_schedule(spec: ScenarioSpec, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
    """(first step, last step exclusive, unit horizontal direction) of this episode's push; (0, 0, 0) if none."""
    if spec.push is None:
        return 0, 0, np.zeros(3)
    start = int(rng.integers(spec.push.start[0], spec.push.start[1] + 1))
    angle = rng.uniform(0, 2 * np.pi)
    accel = rng.uniform(*spec.push.accel)
    return start, start + spec.push.steps, accel * np.array([np.cos(angle), np.sin(angle), 0.0])


def apply_push(env: Any, h: SceneHandles, schedule: tuple[int, int, np.ndarray], t: int) -> None:
    """Set (or clear) the object's external force before control step t."""
    start, stop, accel = schedule
    if stop == 0:
        return
    force = env.sim.model.body_mass[h.object_body] * accel if start <= t < stop else np.zeros(3)
    env.sim.data.xfrc_applied[h.object_body, :3] = force
