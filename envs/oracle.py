"""Scripted oracle experts that act from privileged sim state (OSC_POSE deltas).

One pick-and-place state machine serves all tasks; a :class:`Plan` holds the per-task numbers. The phase is
re-derived from the sim state at every step (the only memory is state-derived: consecutive grasped steps, and
whether the gripper closed on nothing and must reopen), so the oracle can take over from whatever state a
policy left behind, and can run alongside a policy to label every step with ``oracle_action``.

Phases, in order: reach -> descend -> grasp -> lift -> carry -> lower -> release -> done. ``reopen`` means the
gripper closed on nothing and is opening again; ``reorient`` turns a badly tilted gripper back down before
anything else. Lift ends after ``lift``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.tasks import get_task

PHASES = ("reorient", "reopen", "reach", "descend", "grasp", "lift", "carry", "lower", "release", "done")
STAGE = {p: max(i - 2, 0) for i, p in enumerate(PHASES)}  # reorient and reopen count as reach
CRITICAL = frozenset({"descend", "grasp", "lower", "release"})

OPEN, CLOSE = -1.0, 1.0
EMPTY_GAP = 0.006
"""Finger gap (m) below which a closed gripper holds nothing."""
OPEN_GAP = 0.07
ROT_MAX = 0.3
"""Cap on rotation actions (x 0.5 rad): a larger orientation error saturates the 12 Nm wrist joints, and the
clipped torques then stall the arm's translation too."""
WALL_CLEARANCE = 0.06
"""Clearance (m) from a round object's centre to a container wall that an open finger needs beside it; closer
than that along the fingers' default axis, revision 2 turns the grasp 90 degrees."""
REGRASP_STEPS = 25
"""Revision 2: steps the gripper may close in the grasp phase without holding anything before the oracle opens,
rises to the hover height and tries again (a normal close holds the object within ~10)."""
VERSION = 2
"""1: as first shipped. 2: clears container walls with its grasp yaw and retries a grasp that holds nothing
(docs/FINDINGS.md §19). Runs pin theirs in ``collect.oracle_version``, so an old run resumes unchanged."""
VERSIONS = tuple(range(1, VERSION + 1))
MAX_TILT = 0.5
"""Gripper tilt (rad from pointing down) beyond which the oracle only turns back: a twisted wrist drives the
arm into joint limits where OSC stalls."""


@dataclass(frozen=True)
class Plan:
    """Per-task numbers of the pick-and-place state machine (heights in m, relative to the named point)."""

    grasp_dz: float = 0.0
    """Grasp point height above the object's grasp point."""
    yaw_symmetry: float = np.pi / 2
    """Object yaw symmetry for the grasp (pi/2: cube faces; pi: nut handle; 0: round, ignore yaw)."""
    yaw_offset: float = 0.0
    """Gripper yaw relative to the object's yaw at grasp."""
    hover: float = 0.10
    carry_z: float = 0.20
    """Carry height of the object above the target point."""
    place_dz: float = 0.05
    """Object height above the target point at which it is released."""
    place_offset: tuple[float, float] = (0.0, 0.0)
    object_yaws: tuple[float, ...] = ()
    """If set, turn the held object to the nearest of these yaws before lowering (the square nut onto its
    peg: any multiple of pi/2 fits, but not the one with the handle pointing away, which is out of reach)."""
    place_tol: float = 0.01
    hold_steps: int = 4
    """Consecutive grasped steps before lifting (a firm grip)."""
    lift_only: bool = False


PLANS: dict[str, Plan] = {
    "lift": Plan(lift_only=True, hold_steps=6),
    "can": Plan(grasp_dz=0.02, yaw_symmetry=0.0, carry_z=0.20, place_dz=0.10, place_offset=(-0.05, -0.06),
                place_tol=0.02),
    "square": Plan(yaw_symmetry=np.pi, carry_z=0.17, place_dz=0.07, object_yaws=(np.pi / 2, np.pi, -np.pi / 2),
                   place_tol=0.005),
    "stack": Plan(carry_z=0.10, place_dz=0.052, place_tol=0.006),
}


def _rot(q_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = q_xyzw
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _yaw(q_xyzw: np.ndarray) -> float:
    r = _rot(q_xyzw)
    return float(np.arctan2(r[1, 0], r[0, 0]))


def tilt(q_xyzw: np.ndarray) -> float:
    """Angle (rad) between the gripper's approach axis and straight down."""
    return float(np.arccos(np.clip(-_rot(q_xyzw)[2, 2], -1.0, 1.0)))


def _wrap(angle: float, period: float) -> float:
    """Wrap into [-period/2, period/2)."""
    return float((angle + period / 2) % period - period / 2)


def _orientation_action(eef_quat: np.ndarray, yaw_target: float, limit: float = ROT_MAX) -> np.ndarray:
    """Axis-angle (world frame) towards gripper-down at ``yaw_target``, scaled to OSC's 0.5 rad per unit."""
    r = _rot(eef_quat)
    z = np.array([0.0, 0.0, -1.0])
    x = np.array([np.cos(yaw_target), np.sin(yaw_target), 0.0])
    rd = np.stack([x, np.cross(z, x), z], axis=1)
    err = 0.5 * sum(np.cross(r[:, i], rd[:, i]) for i in range(3))
    return np.clip(err / 0.5 * 3.0, -limit, limit)


class Oracle:
    """``act(privileged) -> (7,) float32``; ``phase``, ``critical``, ``stage``, ``progress``, ``subgoal_reached``."""

    def __init__(self, task: str, version: int = VERSION) -> None:
        if version not in (1, 2):
            raise ValueError(f"oracle version {version} does not exist (1 or 2)")
        self.task = get_task(task).name
        self.plan = PLANS[self.task]
        self.version = version
        self.reset()

    def reset(self) -> None:
        self.phase = "reach"
        self.progress = 0.0
        self.subgoal_reached = False
        self._held = 0  # consecutive grasped steps
        self._reopen = False  # closed on nothing: open before trying again
        self._closing = 0  # consecutive grasp-phase steps holding nothing
        self._retry = False  # a grasp timed out: open and rise to the hover height before the next one
        self._yaw_goal = 0.0

    @property
    def critical(self) -> bool:
        return self.phase in CRITICAL

    @property
    def stage(self) -> int:
        return STAGE[self.phase]

    def act(self, o: dict[str, np.ndarray]) -> np.ndarray:
        p = self.plan
        eef, quat = o["eef_pos"], o["eef_quat"]
        gap = float(o["gripper_qpos"][0] - o["gripper_qpos"][1])
        grasped = bool(o["grasped"])
        obj = o["object_pos"]
        self._held = self._held + 1 if grasped else 0
        if grasped or gap > OPEN_GAP:
            self._reopen = False
        elif gap < EMPTY_GAP:
            self._reopen = True
        self._retry = self._retry and not grasped

        eef_yaw = _yaw(quat)
        grasp_pt = self.grasp_point(o)
        target = o["target_pos"] + np.array([p.place_offset[0], p.place_offset[1], 0.0])
        yaw_goal = eef_yaw
        gripper = OPEN
        goal = eef.copy()
        fine = False  # precise placing: stiffer xy, slower z
        dist = 0.0  # distance to the current phase's subgoal (drives `progress`)

        if tilt(quat) > MAX_TILT and not bool(o["success"]):
            self.phase = "reorient"
            yaw_goal = eef_yaw if grasped else 0.0
            gripper = CLOSE if grasped else OPEN
            dist = tilt(quat)
        elif bool(o["success"]) and (p.lift_only or not grasped):
            self.phase = "done"
            goal = eef + (np.zeros(3) if p.lift_only else np.array([0.0, 0.0, 0.05]))
            gripper = CLOSE if p.lift_only else OPEN
        elif grasped and self._held >= p.hold_steps:
            gripper = CLOSE
            offset = obj - eef  # keep the object, not the hand, on the path
            if p.lift_only:
                self.phase = "lift"
                goal = np.array([eef[0], eef[1], o["target_pos"][2] - offset[2]])
                dist = abs(goal[2] - eef[2])
            else:
                carry_z = target[2] + p.carry_z
                xy_err = np.linalg.norm(target[:2] - obj[:2])
                yaw_err = _object_yaw_error(p.object_yaws, _yaw(o["object_quat"]))
                aligned = xy_err < p.place_tol and abs(yaw_err) < 0.05
                place_z = target[2] + p.place_dz
                near = xy_err < 1.5 * p.place_tol
                if xy_err < 2 * p.place_tol and obj[2] <= place_z + 0.01:
                    self.phase = "release"
                    gripper = OPEN
                    dist = 0.0
                elif aligned or (xy_err < 3 * p.place_tol and self.phase == "lower"):
                    # descend slowly and only while centred, else back off a little to re-centre
                    self.phase = "lower"
                    goal = np.array([target[0], target[1], place_z]) - offset
                    if not near:
                        goal[2] = eef[2] + 0.01
                    fine = True
                    dist = max(obj[2] - place_z, 0.0)
                elif obj[2] < carry_z - 0.03 and xy_err > 0.05:
                    self.phase = "lift"
                    goal = np.array([eef[0], eef[1], carry_z - offset[2]])
                    dist = carry_z - obj[2]
                else:
                    self.phase = "carry"
                    goal = np.array([target[0], target[1], carry_z]) - offset
                    dist = xy_err + abs(yaw_err) * 0.05
                yaw_goal = eef_yaw + yaw_err
        elif grasped:
            self.phase = "grasp"
            gripper = CLOSE
            dist = float(p.hold_steps - self._held) * 0.01
        else:
            placed_now = (not p.lift_only and np.linalg.norm(target[:2] - obj[:2]) < 2 * p.place_tol + 0.01
                          and np.linalg.norm(o["object_vel"]) > 0.02)
            yaw_goal = self._grasp_yaw(o)
            xy_err = float(np.linalg.norm(grasp_pt[:2] - eef[:2]))
            yaw_ok = abs(_wrap(yaw_goal - eef_yaw, 2 * np.pi)) < 0.08
            hover_z = grasp_pt[2] + p.hover
            if placed_now:
                self.phase = "release"  # the object is still settling onto its target
                goal = eef.copy()
            elif self._reopen or self._retry:
                self.phase = "reopen"
                goal = np.array([eef[0], eef[1], max(eef[2], hover_z)])
                dist = 1.0
                # a jammed finger frees itself only on the way up, not at the height it jammed at
                self._retry = self._retry and not (gap > OPEN_GAP and eef[2] > hover_z - 0.02)
            elif xy_err < 0.01 and eef[2] < grasp_pt[2] + 0.012 and (
                    self.version < 2 or yaw_ok or gap < OPEN_GAP - 0.01):  # v2: close only at the grasp yaw
                self.phase = "grasp"
                goal = grasp_pt
                gripper = CLOSE
                dist = 0.05
            elif xy_err < 0.012 and yaw_ok and gap > OPEN_GAP - 0.01:
                self.phase = "descend"
                goal = grasp_pt
                dist = eef[2] - grasp_pt[2]
            else:
                self.phase = "reach"
                low = eef[2] < hover_z - 0.03 and xy_err > 0.03
                goal = np.array([eef[0], eef[1], hover_z]) if low else np.array([*grasp_pt[:2], hover_z])
                dist = xy_err + abs(hover_z - eef[2]) + abs(_wrap(yaw_goal - eef_yaw, 2 * np.pi)) * 0.05

        self._closing = self._closing + 1 if self.phase == "grasp" and not grasped else 0
        if self.version >= 2 and self._closing > REGRASP_STEPS:
            self._retry, self._closing = True, 0
        self._yaw_goal = yaw_goal
        self.subgoal_reached = dist < 0.01
        self.progress = self.stage + 0.9 * (1.0 - min(dist / 0.3, 1.0))
        action = np.zeros(7)
        action[:3] = np.clip((goal - eef) / 0.05, -1.0, 1.0)
        if fine:
            action[:2] = np.clip((goal - eef)[:2] / 0.02, -1.0, 1.0)
            action[2] = np.clip(action[2], -0.4, 0.4)
        # a pure reorientation may use the wrist's full torque: nothing else is asked of the arm then
        action[3:6] = _orientation_action(quat, yaw_goal, 1.0 if self.phase == "reorient" else ROT_MAX)
        action[6] = gripper
        return action.astype(np.float32)

    def grasp_point(self, o: dict[str, np.ndarray]) -> np.ndarray:
        """Where the fingertips close: the object's grasp site, raised by the plan's ``grasp_dz``."""
        return o["grasp_pos"] + np.array([0.0, 0.0, self.plan.grasp_dz])

    def _grasp_yaw(self, o: dict[str, np.ndarray]) -> float:
        """Gripper yaw for grasping: the object's yaw plus offset, modulo its symmetry."""
        p = self.plan
        if p.yaw_symmetry == 0.0:
            # round: any yaw grips it, but at yaw 0 the fingers close along y, so one lands on a y wall it
            # stands close to; v2 then closes along x, if x has more room
            cx, cy = o.get("wall_clearance", (np.inf, np.inf))
            return np.pi / 2 if self.version >= 2 and cy < WALL_CLEARANCE and cx > cy else 0.0
        # the equivalent yaw nearest to the arm's home yaw (0), not to the current one: this unwinds a wrist
        # that a policy has twisted, before the twist locks a joint
        return _wrap(_yaw(o["object_quat"]) + p.yaw_offset, p.yaw_symmetry)


def _object_yaw_error(yaws: tuple[float, ...], yaw: float) -> float:
    """Signed turn to the nearest allowed object yaw (0 when any yaw will do)."""
    if not yaws:
        return 0.0
    return min((_wrap(y - yaw, 2 * np.pi) for y in yaws), key=abs)


def make_oracle(task: str, version: int | None = None) -> Oracle:
    """The oracle for ``task`` at revision ``version`` (None: the current one, ``VERSION``)."""
    return Oracle(task, VERSION if version is None else version)
