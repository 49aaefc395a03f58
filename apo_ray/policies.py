"""Policies behind one interface, so rollout actors never care what is acting.

``act(obs_batch) -> actions`` takes a list of observation dicts (see ``envs.TaskEnv.reset``) and returns a
(B, 7) float32 array. ``reset(seeds)`` starts new episodes; any randomness is drawn from generators seeded
by the episode seed, so an episode is a pure function of (task, scenario, seed, policy version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from apo_ray.errors import UserError
from apo_ray.schema import ACTION_DIM

POLICY_SPECS = ("oracle, random, noisy-oracle:<p> (0<=p<=1), dart-oracle:<sigma> (0<=sigma<=1), or a trained "
                "checkpoint directory")


class Policy(Protocol):
    version: str

    def reset(self, seeds: list[int]) -> None: ...

    def act(self, obs_batch: list[dict]) -> np.ndarray: ...


class RandomPolicy:
    """Uniform actions in [-1, 1]; the sanity floor of every table."""

    version = "random"

    def __init__(self) -> None:
        self._rngs: list[np.random.Generator] = []

    def reset(self, seeds: list[int]) -> None:
        self._rngs = [np.random.default_rng([s, 0xA11]) for s in seeds]

    def act(self, obs_batch: list[dict]) -> np.ndarray:
        return np.stack([r.uniform(-1, 1, ACTION_DIM) for r in self._rngs[: len(obs_batch)]]).astype(np.float32)


class OraclePolicy:
    """The scripted expert acting from privileged state (expert-demo mode)."""

    def __init__(self, task: str, oracle_version: int | None = None) -> None:
        import envs

        self._make = lambda: envs.make_oracle(task, oracle_version)
        self._oracles: list = []
        self.version = "oracle"

    def reset(self, seeds: list[int]) -> None:
        self._oracles = [self._make() for _ in seeds]
        for o in self._oracles:
            o.reset()

    def act(self, obs_batch: list[dict]) -> np.ndarray:
        return np.stack([o.act(ob["privileged"]) for o, ob in zip(self._oracles, obs_batch, strict=False)]).astype(np.float32)


class NoisyOraclePolicy(OraclePolicy):
    """A degraded oracle that really fails: with probability ``p`` per step it starts a lapse, a run of
    6-15 steps in which it holds one wrong random translation and gripper command (drifting off, opening
    the gripper), the way a weak policy heads the wrong way for a while. Rotation stays the oracle's: random
    wrist torques wind the Panda into poses OSC cannot leave, which no corrector could fix in time."""

    def __init__(self, task: str, p: float, oracle_version: int | None = None) -> None:
        super().__init__(task, oracle_version)
        self.p = p
        self.version = f"noisy-oracle:{p:g}"
        self._rngs: list[np.random.Generator] = []
        self._lapse: list[tuple[int, np.ndarray]] = []

    def reset(self, seeds: list[int]) -> None:
        super().reset(seeds)
        self._rngs = [np.random.default_rng([s, 0x0015E]) for s in seeds]
        self._lapse = [(0, np.zeros(ACTION_DIM, np.float32)) for _ in seeds]

    def act(self, obs_batch: list[dict]) -> np.ndarray:
        clean = super().act(obs_batch)
        out = clean.copy()
        for i, rng in enumerate(self._rngs[: len(obs_batch)]):
            left, wrong = self._lapse[i]
            if left == 0 and rng.random() < self.p:
                wrong = rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)
                wrong[6] = -1.0 if rng.random() < 0.5 else wrong[6]
                left = int(rng.integers(6, 16))
            if left > 0:
                out[i, :3], out[i, 6] = wrong[:3], wrong[6]
                left -= 1
            self._lapse[i] = (left, wrong)
        return out


class DartOraclePolicy(OraclePolicy):
    """The oracle with Gaussian noise of std ``sigma`` on its executed translation (DART, Laskey et al. 2017).

    The rollout records the clean oracle action beside the executed one, so demos collected this way visit the
    small off-course states a learned policy drifts into, labelled with the expert's way back
    (``data.demo_label: oracle``). Rotation and gripper stay clean, as in ``NoisyOraclePolicy``.
    """

    def __init__(self, task: str, sigma: float, oracle_version: int | None = None) -> None:
        super().__init__(task, oracle_version)
        self.sigma = sigma
        self.version = f"dart-oracle:{sigma:g}"
        self._rngs: list[np.random.Generator] = []

    def reset(self, seeds: list[int]) -> None:
        super().reset(seeds)
        self._rngs = [np.random.default_rng([s, 0xDA27]) for s in seeds]

    def act(self, obs_batch: list[dict]) -> np.ndarray:
        out = super().act(obs_batch)
        for i, rng in enumerate(self._rngs[: len(obs_batch)]):
            out[i, :3] = np.clip(out[i, :3] + rng.normal(0.0, self.sigma, 3), -1.0, 1.0)
        return out


NOISY_KINDS = {"noisy-oracle": (NoisyOraclePolicy, "p", 0.1), "dart-oracle": (DartOraclePolicy, "sigma", 0.3)}


def _noise_level(spec: str) -> float:
    kind, _, p = spec.partition(":")
    name, example = NOISY_KINDS[kind][1:]
    try:
        level = float(p)
    except ValueError:
        level = -1.0
    if not 0.0 <= level <= 1.0:
        raise UserError(f"bad policy spec '{spec}'", "--policy",
                        f"write {kind}:<{name}> with 0<={name}<=1, e.g. {kind}:{example}")
    return level


def check_policy_spec(spec: str) -> None:
    """Validate a spec on the driver before any actor starts, so a bad one fails here with one line instead
    of inside an actor (a checkpoint dir is checked with ``model.check_checkpoint``)."""
    s = spec.strip()
    if s in ("oracle", "random"):
        return
    if s.partition(":")[0] in NOISY_KINDS:
        _noise_level(s)
        return
    if not Path(s).is_dir():
        raise UserError(f"unknown policy '{spec}'", "--policy", f"use one of: {POLICY_SPECS}")
    from apo_ray.model import check_checkpoint

    check_checkpoint(s)


def is_scripted(spec: str) -> bool:
    """True for the oracle-based and random policies, False for a checkpoint directory."""
    s = spec.strip()
    return s in ("oracle", "random") or s.partition(":")[0] in NOISY_KINDS


def policy_views(spec: str) -> int:
    """Camera views a policy's images tile: a checkpoint's own count (its metadata only), 1 for scripted ones."""
    s = spec.strip()
    if is_scripted(s):
        return 1
    from apo_ray.checkpoint import read_meta

    return int(read_meta(s).get("image_views", 1))


def make_policy(spec: str, task: str, oracle_version: int | None = None) -> Policy:
    """Build the policy a spec names (validated with ``check_policy_spec``); the scripted ones act as the given
    oracle revision (None: the current one)."""
    s = spec.strip()
    check_policy_spec(s)
    if s == "oracle":
        return OraclePolicy(task, oracle_version)
    if s == "random":
        return RandomPolicy()
    kind = s.partition(":")[0]
    if kind in NOISY_KINDS:
        return NOISY_KINDS[kind][0](task, _noise_level(s), oracle_version)
    from apo_ray.vla_policy import VLAPolicy

    return VLAPolicy(Path(s))
