"""The corrector on real episodes: silent for a perfect policy, takes over a degraded one and hands back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import envs
from apo_ray.config import CorrectorConfig
from apo_ray.schema import C_CORRECTOR, C_POLICY, NO_INTERVENTION
from envs.oracle_eval import run_episode


class Lapses:
    """A noisy-oracle-like stream: with probability p per step, hold one random action for 6-15 steps."""

    def __init__(self, p: float, seed: int) -> None:
        self.p, self.rng, self.left, self.wrong = p, np.random.default_rng(seed), 0, np.zeros(7)

    def __call__(self, obs: dict, oracle_action: np.ndarray) -> np.ndarray:
        if self.left == 0 and self.rng.random() < self.p:
            self.left, self.wrong = int(self.rng.integers(6, 16)), self.rng.uniform(-1, 1, 7)
        if self.left:
            self.left -= 1
            return self.wrong.astype(np.float32)
        return oracle_action


def _episode(env, task, policy, cfg, seed):
    oracle, corrector = envs.make_oracle(task), envs.Corrector(task, cfg)
    result = run_episode(env, oracle, seed, policy, corrector)
    return result, corrector


def _check_labels(result, corrector, cfg):
    cs = np.array(result["c"])
    takeovers = [t for t, kind, _ in corrector.events if kind == "takeover"]
    triggers = [t for t, kind, _ in corrector.events if kind == "trigger"]
    handbacks = [t for t, kind, _ in corrector.events if kind == "handback"]
    assert len(takeovers) == corrector.interventions <= cfg.max_interventions
    for trig, take in zip(triggers, takeovers, strict=False):
        assert take - trig == cfg.reaction_delay  # a human's reaction time
        assert cs[take] == C_CORRECTOR and (take == 0 or cs[take - 1] == C_POLICY)
    for take, back in zip(takeovers, handbacks, strict=False):
        assert back - take >= cfg.min_control_steps and cs[back] == C_POLICY
        assert np.all(cs[take:back] == C_CORRECTOR)
    if 0 < cfg.finish_after <= len(takeovers):  # the finishing takeover keeps control to the end
        assert len(handbacks) == cfg.finish_after - 1 and np.all(cs[takeovers[cfg.finish_after - 1]:] == C_CORRECTOR)
    else:
        assert len(handbacks) == len(takeovers) or (len(handbacks) == len(takeovers) - 1 and cs[-1] == C_CORRECTOR)
    assert set(cs.tolist()) <= {C_POLICY, C_CORRECTOR}


@pytest.fixture(scope="module")
def lift_env():
    env = envs.TaskEnv("lift", camera=False)
    yield env
    env.close()


def test_perfect_policy_never_triggers(lift_env):
    cfg = CorrectorConfig()
    for seed in (0, 1):
        result, corrector = _episode(lift_env, "lift", lambda obs, oa: oa, cfg, seed)
        assert result["success"] and corrector.interventions == 0 and corrector.events == []
        assert set(result["c"]) == {C_POLICY}
    stack = envs.TaskEnv("stack", camera=False)
    try:
        result, corrector = _episode(stack, "stack", lambda obs, oa: oa, cfg, 0)
        assert result["success"] and corrector.interventions == 0
    finally:
        stack.close()


def test_deviation_in_critical_phase_triggers_takeover_and_handback(lift_env):
    """A policy that refuses to descend onto the cube: the oracle is in a critical phase, so the deviation
    trigger fires after deviation_steps, the corrector grasps and hands back once the grasp holds."""
    cfg = CorrectorConfig()
    oracle_probe = {}

    def refuses_to_descend(obs, oracle_action):
        a = oracle_action.copy()
        if oracle_probe["oracle"].phase == "descend":
            a[2] = 1.0
        return a

    oracle, corrector = envs.make_oracle("lift"), envs.Corrector("lift", cfg)
    oracle_probe["oracle"] = oracle
    result = run_episode(lift_env, oracle, 0, refuses_to_descend, corrector)
    assert corrector.events[0][1:] == ("trigger", "deviation")
    assert corrector.interventions >= 1 and result["success"]
    _check_labels(result, corrector, cfg)
    assert any(kind == "handback" for _, kind, _ in corrector.events)


def test_a_hand_lowered_beside_the_cube_triggers_off_target(lift_env):
    """A policy that goes down 5 cm beside the cube: once the empty hand is at grasp height there for
    off_target_steps steps the corrector takes over (before the hand pushes on into the arm's joint limits) and
    the episode succeeds; with the trigger off, only the slower no-progress trigger would catch it."""
    cfg = CorrectorConfig()

    def beside(obs, oracle_action):
        p = obs["privileged"]
        goal = p["grasp_pos"] + np.array([0.05, 0.0, 0.0])
        return np.array([*np.clip((goal - p["eef_pos"]) / 0.05, -1, 1), 0, 0, 0, -1], np.float32)

    result, corrector = _episode(lift_env, "lift", beside, cfg, 0)
    assert corrector.events[0][1:] == ("trigger", "off_target"), corrector.events
    assert result["success"]
    _check_labels(result, corrector, cfg)
    _, off = _episode(lift_env, "lift", beside, dataclasses.replace(cfg, off_target_steps=0), 0)
    assert off.events and "off_target" not in {r for _, _, r in off.events}
    assert off.events[0][0] > corrector.events[0][0] + 5


def test_degraded_stream_is_corrected_and_succeeds(lift_env):
    """Lapses tilt the gripper, close it on nothing or stall it: the corrector takes over and the episode
    still succeeds (docs/oracle_success.md gives rates over more seeds and stronger noise)."""
    cfg = CorrectorConfig()
    for seed in (0, 1):
        result, corrector = _episode(lift_env, "lift", Lapses(0.03, seed), cfg, seed)
        assert corrector.interventions >= 1 and result["success"], (seed, corrector.events)
        _check_labels(result, corrector, cfg)


def test_a_policy_that_keeps_failing_is_finished_by_the_corrector(lift_env):
    """Uniformly random actions never lift the cube; the corrector takes over, hands back twice, and from its
    third takeover on keeps control until the episode succeeds."""
    cfg = CorrectorConfig()
    rng = np.random.default_rng(0)
    result, corrector = _episode(lift_env, "lift", lambda obs, a: rng.uniform(-1, 1, 7).astype(np.float32), cfg, 3)
    assert result["success"] and corrector.interventions == cfg.finish_after, corrector.events
    _check_labels(result, corrector, cfg)
    never = dataclasses.replace(cfg, finish_after=0)
    result, corrector = _episode(lift_env, "lift", lambda obs, a: rng.uniform(-1, 1, 7).astype(np.float32), never, 3)
    assert corrector.interventions > cfg.finish_after
    _check_labels(result, corrector, never)


def test_disabled_and_capped():
    env = envs.TaskEnv("lift", camera=False)
    try:
        off = dataclasses.replace(CorrectorConfig(), enabled=False)
        result, corrector = _episode(env, "lift", Lapses(0.2, 1), off, 1)
        assert set(result["c"]) == {C_POLICY} and corrector.interventions == 0
        capped = dataclasses.replace(CorrectorConfig(), max_interventions=1)
        result, corrector = _episode(env, "lift", Lapses(0.2, 1), capped, 1)
        assert corrector.interventions <= 1
        _check_labels(result, corrector, capped)
        oracle = envs.make_oracle("lift")
        c = envs.Corrector("lift", capped)
        obs = env.reset(0)
        action, label, iid = c.decide(np.zeros(7), oracle.act(obs["privileged"]), obs["privileged"], oracle)
        assert label == C_POLICY and iid == NO_INTERVENTION
    finally:
        env.close()
