"""The corrector: a scripted stand-in for the human who watches the policy and takes over.

Each step the rollout computes ``oracle_action = oracle.act(privileged)`` and asks ``decide`` who acts.
Triggers (any one fires a takeover after ``reaction_delay`` steps, like a human's reaction time):

- ``deviation``: mean |a_policy - a_oracle| over the translation dims above ``deviation_threshold`` for
  ``deviation_steps`` consecutive steps while the oracle is in a critical phase (descend, grasp, lower, release);
- ``dropped``: the object was held and is no longer, away from its target;
- ``knocked``: the object moves fast while nobody holds it;
- ``empty_grasp``: the gripper closed on nothing;
- ``tilted``: the gripper points far from down (a twisted wrist soon locks the arm in a joint limit);
- ``off_target``: an empty hand down at grasp height but more than ``OFF_XY`` beside the grasp point for
  ``off_target_steps`` steps (it will miss or push the object; pressing on along the table then stretches the
  arm into its shoulder and elbow limits, a posture the oracle's reach motion cannot leave);
- ``no_progress``: the oracle's progress signal has not improved for ``no_progress_steps`` steps.

While in control it executes the oracle's action (c=2, intervention_id = index of the intervention in the
episode). It hands back (c=1, intervention_id=-1) once the subgoal of the phase it took over in holds, i.e. the
oracle has moved past that phase (or the task succeeded), after at least ``min_control_steps`` steps. The
``finish_after``-th takeover of an episode never hands back: like a human who stops trusting a policy that keeps
failing, the corrector then drives the episode to success (the paper's deployments all end in success).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.labels import C_CORRECTOR, C_POLICY, NO_INTERVENTION
from envs.oracle import EMPTY_GAP, MAX_TILT, Oracle, tilt
from envs.tasks import get_task

KNOCK_SPEED = 0.25
"""Object speed (m/s) that counts as knocked when nobody holds it."""
PROGRESS_EPS = 0.01
OFF_XY = 0.025
"""Horizontal distance (m) from the grasp point that counts as beside it, for a hand at grasp height."""
LOW_Z = 0.02
"""Height (m) above the grasp point below which the hand is at grasp height."""
AWAY = 0.1
"""Object distance (m, horizontal) from its target beyond which letting go of it is a drop, not a release."""


@dataclass(frozen=True)
class CorrectorConfig:
    """The corrector's triggers: the ``corrector`` section of apo_ray's config."""

    enabled: bool = True
    """Let the scripted corrector take over from a deviating policy (false: the policy acts alone)."""
    deviation_threshold: float = 0.6
    """Mean |a_policy - a_oracle| over the 3 translation dims that counts as deviating."""
    deviation_steps: int = 6
    """Consecutive deviating steps inside a critical phase before the corrector takes over."""
    off_target_steps: int = 3
    """Steps an empty hand spends at grasp height beside the grasp point before taking over (0 = off)."""
    no_progress_steps: int = 25
    """Steps without progress towards the current subgoal before taking over."""
    reaction_delay: int = 2
    """Steps between a trigger firing and the corrector acting, like a human's reaction time."""
    min_control_steps: int = 8
    """Shortest takeover before control may be handed back."""
    max_interventions: int = 8
    """Most takeovers in one episode."""
    finish_after: int = 3
    """The corrector keeps control to the end from this takeover of an episode on (0 = always hand back)."""


class Corrector:
    def __init__(self, oracle_task: str, cfg: CorrectorConfig | None = None) -> None:
        self.task = get_task(oracle_task).name
        self.cfg = cfg or CorrectorConfig()
        self.reset(0)

    def reset(self, seed: int = 0) -> None:
        self.seed = seed  # the corrector is deterministic; kept for provenance
        self.in_control = False
        self.interventions = 0
        self.reason = ""
        self.events: list[tuple[int, str, str]] = []
        """(step, "trigger" | "takeover" | "handback", reason): what happened when, for logs and tests."""
        self._t = -1
        self._pending = -1  # steps left before a fired trigger takes over; -1 = none pending
        self._intervention_id = NO_INTERVENTION
        self._control_steps = 0
        self._takeover_stage = 0
        self._deviating = 0
        self._empty = 0
        self._off = 0
        self._held = 0
        self._best = -np.inf
        self._stalled = 0

    def decide(self, policy_action: np.ndarray, oracle_action: np.ndarray, privileged: dict[str, np.ndarray],
               oracle: Oracle) -> tuple[np.ndarray, int, int]:
        """(action to execute, c, intervention_id); ``oracle`` has already acted on ``privileged``."""
        if not self.cfg.enabled:
            return np.asarray(policy_action, np.float32), C_POLICY, NO_INTERVENTION
        self._t += 1
        success = bool(privileged["success"])
        if self.in_control:
            self._control_steps += 1
            done = oracle.stage > self._takeover_stage or success
            finishing = 0 < self.cfg.finish_after <= self.interventions
            if finishing or not (done and self._control_steps > self.cfg.min_control_steps):
                return np.asarray(oracle_action, np.float32), C_CORRECTOR, self._intervention_id
            self._hand_back(oracle)
        trigger = self._trigger(policy_action, oracle_action, privileged, oracle, success)
        if trigger and self._pending < 0 and self.interventions < self.cfg.max_interventions:
            self.reason = trigger
            self._pending = self.cfg.reaction_delay
            self.events.append((self._t, "trigger", trigger))
        if self._pending == 0:
            self._take_over(oracle)
            return np.asarray(oracle_action, np.float32), C_CORRECTOR, self._intervention_id
        if self._pending > 0:
            self._pending -= 1
        return np.asarray(policy_action, np.float32), C_POLICY, NO_INTERVENTION

    # ------------------------------------------------------------------------------------------------
    def _trigger(self, policy_action: np.ndarray, oracle_action: np.ndarray, o: dict[str, np.ndarray],
                 oracle: Oracle, success: bool) -> str:
        cfg = self.cfg
        grasped = bool(o["grasped"])
        was_held = self._held >= 3
        self._held = self._held + 1 if grasped else 0
        if success:
            self._deviating = self._stalled = 0
            return ""
        dev = float(np.mean(np.abs(np.asarray(policy_action)[:3] - np.asarray(oracle_action)[:3])))
        self._deviating = self._deviating + 1 if (dev > cfg.deviation_threshold and oracle.critical) else 0
        gap = float(o["gripper_qpos"][0] - o["gripper_qpos"][1])
        self._empty = self._empty + 1 if (gap < EMPTY_GAP and not grasped) else 0
        if oracle.progress > self._best + PROGRESS_EPS:
            self._best, self._stalled = oracle.progress, 0
        else:
            self._stalled += 1
        away = np.linalg.norm(o["object_pos"][:2] - o["target_pos"][:2]) > AWAY
        if was_held and not grasped and away:
            return "dropped"
        if not grasped and away and np.linalg.norm(o["object_vel"]) > KNOCK_SPEED:
            return "knocked"
        grasp_pt = oracle.grasp_point(o)
        beside = float(np.linalg.norm(o["eef_pos"][:2] - grasp_pt[:2])) > OFF_XY
        low = float(o["eef_pos"][2]) < grasp_pt[2] + LOW_Z
        self._off = self._off + 1 if (not grasped and low and beside and oracle.phase in ("reach", "descend")) else 0
        if self._empty >= 3:
            return "empty_grasp"
        if 0 < cfg.off_target_steps <= self._off:
            return "off_target"
        if tilt(o["eef_quat"]) > MAX_TILT:
            return "tilted"
        if self._deviating >= cfg.deviation_steps:
            return "deviation"
        if self._stalled >= cfg.no_progress_steps:
            return "no_progress"
        return ""

    def _take_over(self, oracle: Oracle) -> None:
        self.in_control = True
        self._pending = -1
        self._intervention_id = self.interventions
        self.interventions += 1
        self._control_steps = 1
        self._takeover_stage = oracle.stage
        self.events.append((self._t, "takeover", self.reason))

    def _hand_back(self, oracle: Oracle) -> None:
        self.in_control = False
        self._intervention_id = NO_INTERVENTION
        self.events.append((self._t, "handback", oracle.phase))
        self._deviating = self._empty = self._stalled = self._off = 0
        self._best = oracle.progress  # the policy gets a fresh no-progress window
