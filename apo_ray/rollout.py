"""Parallel corrected rollouts on Ray actors, written straight to Parquet.

``RolloutWorker`` is a plain class (usable without Ray, and in tests); ``collect`` wraps it with
``ray.remote`` at the call site. Each episode is a pure function of (task, scenario, seed, policy
version) and lands as ``episodes/<episode_id>.parquet`` via temp file + rename, so a restarted actor that
re-runs an episode rewrites the same bytes under the same name: nothing is lost or written twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from apo_ray import schema as S
from apo_ray.config import CorrectorConfig, DataConfig
from apo_ray.errors import UserError
from apo_ray.fsio import sweep_tmp, write_json, write_parquet
from apo_ray.policies import check_policy_spec, is_scripted, make_policy, policy_views

EPISODES_DIR = "episodes"
VIDEOS_DIR = "videos"
STALL_STEPS = 20
"""A failed episode whose last STALL_STEPS actions are all near-idle stalled (froze) rather than erred."""
IDLE_MOTION = DataConfig.idle_threshold
"""Σ|a[:6]| below which an action is near-idle: the dataset's default idle filter."""


def stalled(actions: np.ndarray, success: bool) -> bool:
    """True for a failure that ends frozen: its last STALL_STEPS actions move (Σ|a[:6]|) less than IDLE_MOTION."""
    tail = np.asarray(actions)[-STALL_STEPS:]
    return (not success and len(tail) == STALL_STEPS
            and bool((np.abs(tail[:, :6]).sum(axis=1) < IDLE_MOTION).all()))


def episode_id(task: str, scenario: str, round_: int, seed: int) -> str:
    return f"{task}-{scenario}-r{round_}-s{seed:06d}"


@dataclass(frozen=True)
class EpisodeStats:
    episode_id: str
    seed: int
    steps: int
    success: bool
    intervention_steps: int
    interventions: int
    stalled: bool = False

    @staticmethod
    def of_table(table: Any) -> EpisodeStats:
        c = table.column(S.C).to_numpy()
        iid = table.column(S.INTERVENTION_ID).to_numpy()
        n = table.num_rows
        success = bool(table.column(S.SUCCESS)[0].as_py()) if n else False
        return EpisodeStats(
            episode_id=table.column(S.EPISODE_ID)[0].as_py() if n else "",
            seed=int(table.column(S.SEED)[0].as_py()) if n else -1,
            steps=n,
            success=success,
            intervention_steps=int((c == S.C_CORRECTOR).sum()),
            interventions=len(set(iid[iid >= 0].tolist())),
            stalled=(n > 0 and S.ACTION in table.column_names
                     and stalled(S.column_to_numpy(table.column(S.ACTION)), success)),
        )


def _maybe_fault(seed: int, t: int, out_dir: Path) -> None:
    """Fault injection for tests/chaos: APO_RAY_FAULT_KILL_ACTOR="<seed>:<step>" SIGKILLs this actor
    process once (a marker file makes it one-shot), exactly like a node dying mid-episode."""
    spec = os.environ.get("APO_RAY_FAULT_KILL_ACTOR")
    if not spec or spec != f"{seed}:{t}":
        return
    marker = out_dir / f".fault-killed-{seed}-{t}"
    if marker.exists():
        return
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)


class RolloutWorker:
    """Owns one env, one policy copy, and (optionally) the oracle corrector watching it.

    What it rolls out is its spec (:func:`rollout_spec`). ``run_episode`` may carry the spec of the episode it
    asks for, and the worker rebuilds only what differs: a pooled actor (:func:`keep_actors`) then serves the
    next stage without a process start or the torch/robosuite imports, and a stage with the same policy keeps
    its weights loaded. An actor Ray restarts comes back with its constructor's spec and is put right by the
    next call's."""

    def __init__(self, task: str, scenario: str, policy: str, out_dir: str, **options: Any) -> None:
        """``options``: the keyword arguments of :func:`rollout_spec`, which holds their defaults."""
        self.spec: dict[str, Any] | None = None
        self.env: Any = None
        self.policy: Any = None
        self._env_key: tuple | None = None
        self._policy_key: tuple | None = None
        self.retarget(rollout_spec(task, scenario, policy, out_dir, **options))

    def retarget(self, spec: dict[str, Any]) -> None:
        """Roll out ``spec`` from now on, rebuilding the env and the policy only where they differ."""
        if spec == self.spec:
            return
        import envs

        task, scenario, policy, ov = spec["task"], spec["scenario"], spec["policy"], spec["oracle_version"]
        env_key = (task, scenario, spec["image_size"], spec["horizon"], spec["cheap_render"], spec["wrist"])
        if env_key != self._env_key:
            if self.env is not None:
                self.env.close()
            self.env = envs.TaskEnv(task, scenario, image_size=spec["image_size"], camera=True,
                                    cheap_render=spec["cheap_render"], horizon=spec["horizon"], wrist=spec["wrist"])
            self._env_key = env_key
        policy_key = (policy, task, ov, _weights_stamp(policy))
        if policy_key != self._policy_key:
            self.policy = None  # the old weights go before the next ones load
            self.policy = make_policy(policy, task, ov)
            self._policy_key = policy_key
        corrector = spec["corrector"]
        self.oracle = envs.make_oracle(task, ov)
        self.corrector = envs.Corrector(task, corrector) if corrector is not None and corrector.enabled else None
        self.task, self.scenario, self.round = task, scenario, spec["round_"]
        self.out_dir = Path(spec["out_dir"])
        self.spec = spec

    def ping(self) -> str:
        """Ready; returns where the policy runs (``cpu``, ``cuda:0``; scripted policies: ``cpu``)."""
        return str(getattr(self.policy, "device", "cpu"))

    def run_episode(self, seed: int, video: bool = False, spec: dict[str, Any] | None = None) -> EpisodeStats:
        if spec is not None:
            self.retarget(spec)
        eid = episode_id(self.task, self.scenario, self.round, seed)
        steps: dict[str, list] = {k: [] for k in (S.T, S.IMAGE, S.PROPRIO, S.ACTION, S.ORACLE_ACTION, S.C,
                                                  S.INTERVENTION_ID, S.REWARD, S.DONE, S.STATE)}
        obs = self.env.reset(seed)
        obs["instruction"] = self.env.instruction
        self.policy.reset([seed])
        self.oracle.reset()
        if self.corrector is not None:
            self.corrector.reset(seed)
        done, t = False, 0
        while not done:
            _maybe_fault(seed, t, self.out_dir)
            oracle_action = np.asarray(self.oracle.act(obs["privileged"]), np.float32)
            policy_action = np.asarray(self.policy.act([obs])[0], np.float32)
            if self.corrector is None:
                action, c, iid = policy_action, S.C_POLICY, S.NO_INTERVENTION
            else:
                action, c, iid = self.corrector.decide(policy_action, oracle_action, obs["privileged"], self.oracle)
            steps[S.T].append(t)
            steps[S.IMAGE].append(obs["image"])
            steps[S.PROPRIO].append(obs["proprio"])
            steps[S.ACTION].append(np.clip(action, -1.0, 1.0))
            steps[S.ORACLE_ACTION].append(oracle_action)
            steps[S.C].append(c)
            steps[S.INTERVENTION_ID].append(iid)
            steps[S.STATE].append(self.env.get_state())
            obs, reward, done, _ = self.env.step(np.clip(action, -1.0, 1.0))
            obs["instruction"] = self.env.instruction
            steps[S.REWARD].append(reward)
            steps[S.DONE].append(done)
            t += 1
        success = bool(self.env.is_success())
        steps.update({
            S.EPISODE_ID: eid, S.ROUND: self.round, S.TASK: self.task, S.SCENARIO: self.scenario,
            S.SEED: seed, S.SUCCESS: success, S.INSTRUCTION: self.env.instruction,
            S.POLICY_VERSION: self.policy.version,
        })
        table = S.episode_table(steps, self.env.env_meta)
        if video:
            from apo_ray.video import write_mp4

            write_mp4(self.out_dir / VIDEOS_DIR / f"{eid}.mp4", np.stack(steps[S.IMAGE]), np.asarray(steps[S.C]))
        write_parquet(self.out_dir / EPISODES_DIR / f"{eid}.parquet", table)
        return EpisodeStats.of_table(table)

    def close(self) -> None:
        self.env.close()


def rollout_spec(task: str, scenario: str, policy: str, out_dir: str | os.PathLike[str], *, round_: int = 0,
                 corrector: CorrectorConfig | None = None, image_size: int = 64, horizon: int = 0,
                 cheap_render: bool = True, wrist: bool = False, oracle_version: int | None = None) -> dict[str, Any]:
    """Everything an episode depends on besides its seed: a :class:`RolloutWorker`'s constructor arguments."""
    return {"task": task, "scenario": scenario, "policy": policy, "out_dir": str(out_dir), "round_": round_,
            "corrector": corrector, "image_size": image_size, "horizon": horizon, "cheap_render": cheap_render,
            "wrist": wrist, "oracle_version": oracle_version}


def _weights_stamp(policy: str) -> int | None:
    """When a checkpoint policy's files last changed, so a path retrained in place is loaded again."""
    if is_scripted(policy):
        return None
    from apo_ray.checkpoint import checkpoint_dir

    d = checkpoint_dir(policy)
    return d.stat().st_mtime_ns if d.exists() else None


def _check_out_dir(out_dir: Path, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"out dir is a file: {out_dir}", "--out", "pass a directory path")
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise UserError(f"out dir is not empty: {out_dir}", "--out", "pass a new or empty directory, or --resume")
    probe = out_dir if out_dir.exists() else next(p for p in out_dir.parents if p.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"out dir is not writable: {out_dir}", "--out", "choose a directory you can write to")


def validate_request(task: str, scenario: str, policy: str, episodes: int, workers: int, gpus: float = 0.0) -> None:
    """Every check that needs no env and no Ray, so bad input fails before anything is created."""
    import envs

    envs.get_task(task)
    envs.parse_scenario(scenario)
    check_policy_spec(policy)
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}", "--episodes", "ask for at least one episode")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}", "--workers", "use at least one worker")
    if gpus < 0:
        raise UserError(f"--gpus-per-worker {gpus} is negative", "--gpus-per-worker", "use 0 (CPU) or a share, e.g. 0.25")


def read_episode_stats(path: Path) -> EpisodeStats:
    cols = [S.EPISODE_ID, S.SEED, S.C, S.INTERVENTION_ID, S.SUCCESS, S.ACTION]
    return EpisodeStats.of_table(pq.read_table(path, columns=cols))


def summarize(stats: list[EpisodeStats], wall_s: float, new_steps: int) -> dict[str, Any]:
    n = len(stats)
    successes = sum(s.success for s in stats)
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n if n else 0.0,
        "steps": sum(s.steps for s in stats),
        "intervention_episodes": sum(s.interventions > 0 for s in stats),
        "intervention_steps": sum(s.intervention_steps for s in stats),
        "interventions": sum(s.interventions for s in stats),
        "env_steps_per_s": round(new_steps / wall_s, 2) if wall_s > 0 else 0.0,
        "mean_length": sum(s.steps for s in stats) / n if n else 0.0,
        "mean_success_length": (sum(s.steps for s in stats if s.success) / successes) if successes else None,
        "stalled_failures": sum(s.stalled for s in stats),
    }


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled and sys.stderr.isatty()
        self.done = self.ok = 0
        self.t0 = time.monotonic()

    def update(self, s: EpisodeStats, steps_total: int) -> None:
        self.done += 1
        self.ok += s.success
        if self.enabled:
            rate = steps_total / max(time.monotonic() - self.t0, 1e-9)
            sys.stderr.write(f"\r[{self.label}] {self.done}/{self.total} episodes, {self.ok} successes, "
                             f"{rate:.1f} steps/s ")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def collect(task: str, scenario: str, policy: str, episodes: int, workers: int, seed: int,
            out_dir: str | os.PathLike[str], *, round_: int = 0, corrector: CorrectorConfig | None = None,
            image_size: int = 64, horizon: int = 0, videos: int = 0, address: str | None = None,
            seeds: list[int] | None = None, resume: bool = False, progress: bool = True,
            label: str = "collect", wrist: bool = False, oracle_version: int | None = None,
            gpus: float = 0.0) -> dict[str, Any]:
    """Run ``episodes`` rollouts on ``workers`` Ray actors; write one Parquet file per episode.

    Seeds are ``seed + i`` unless given. With ``resume``, episodes already on disk are kept and only the
    missing ones run. ``wrist`` adds the eye-in-hand view beside agentview; a checkpoint trained on both views
    turns it on itself. ``oracle_version`` pins the scripted oracle's revision (demos, corrector and the
    ``oracle_action`` labels; None: the current one). ``gpus`` is each actor's GPU share for a checkpoint policy,
    used where the cluster has GPUs. Returns the summary dict (also written to ``out_dir/collect.json``), with
    ``policy_device``: where this call's actors ran the policy (None if every episode was already on disk).
    """
    validate_request(task, scenario, policy, episodes, workers, gpus)
    views = policy_views(policy)
    if wrist and views == 1 and not is_scripted(policy):
        raise UserError("the policy checkpoint takes agentview alone; the wrist camera would change its images",
                        policy, "drop --wrist (env.wrist) for this checkpoint")
    wrist = wrist or views > 1
    out = Path(out_dir)
    _check_out_dir(out, resume)
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(episodes)]
    (out / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
    sweep_tmp(out / EPISODES_DIR)
    done: dict[int, EpisodeStats] = {}
    for i, s in enumerate(seeds):
        path = out / EPISODES_DIR / f"{episode_id(task, scenario, round_, s)}.parquet"
        if path.exists():
            done[i] = read_episode_stats(path)
    todo = [i for i in range(len(seeds)) if i not in done]
    new_steps, wall, device = 0, 0.0, None
    if todo:
        new_steps, wall, device = _run_parallel(task, scenario, policy, out, round_, corrector, image_size,
                                                horizon, videos, address, seeds, todo, done, workers, progress,
                                                label, wrist, oracle_version, 0.0 if is_scripted(policy) else gpus)
    stats = [done[i] for i in range(len(seeds))]
    summary = {**summarize(stats, wall, new_steps), "policy_device": device}
    write_json(out / "collect.json", {"task": task, "scenario": scenario, "policy": policy,
                                      "round": round_, "seeds": seeds, **summary})
    return summary


def actor_placement(gpus: float, cluster: dict[str, float]) -> dict[str, Any]:
    """Ray options for a rollout actor, given what the cluster offers (``ray_utils.cluster_offers``): a GPU share
    where asked for and the cluster has or can add GPUs (the policy then runs there in bf16), else a ``sim``
    slot where the cluster has them (rollout nodes, and the embedded node: one per core) and else a CPU. A
    ``sim`` slot stands for the simulator's core, so the actor claims no CPU beside it: one kept idle between
    stages (:func:`keep_actors`) does not block a dataset build or a training run."""
    if gpus > 0 and cluster.get("GPU", 0) > 0:
        return {"num_cpus": 1, "num_gpus": gpus}
    if cluster.get("sim", 0) > 0:
        return {"num_cpus": 0, "resources": {"sim": 1}}
    return {"num_cpus": 1}


def actor_capacity(placement: dict[str, Any], cluster: dict[str, float]) -> int:
    """How many actors with ``placement`` the cluster can hold at once (under an autoscaler, at its most)."""
    need = {"CPU": placement.get("num_cpus", 0), "GPU": placement.get("num_gpus", 0), **placement.get("resources", {})}
    return int(min((cluster.get(k, 0.0) // v for k, v in need.items() if v > 0), default=0))


_pool: dict[str, list[Any]] | None = None
"""Idle rollout actors by placement, while :func:`keep_actors` is open; None: each call kills its own."""


@contextlib.contextmanager
def keep_actors() -> Iterator[None]:
    """Within this block (inside one Ray session) :func:`collect` hands its CPU actors back instead of killing
    them, and the next call retargets them: a lifelong loop's evaluations and the next round's deployments then
    skip the actor start, the torch and robosuite imports and, with the same policy, its load. An idle actor
    on a ``sim`` slot holds memory only; one that holds a CPU (a cluster without ``sim``) must go before a stage
    that needs the CPUs: call ``release_actors(cpu_only=True)`` before a dataset build or a training run."""
    global _pool
    _pool = {}
    try:
        yield
    finally:
        release_actors()
        _pool = None


def release_actors(cpu_only: bool = False) -> None:
    """Kill the idle pooled actors (with ``cpu_only``, those whose placement claims CPUs)."""
    if not _pool:
        return
    import ray

    for key in [k for k in _pool if not cpu_only or json.loads(k).get("num_cpus", 0) > 0]:
        for a in _pool.pop(key):
            ray.kill(a)


def _run_parallel(task, scenario, policy, out, round_, corrector, image_size, horizon, videos, address, seeds,
                  todo, done, workers, progress, label, wrist, oracle_version, gpus) -> tuple[int, float, str]:
    import ray

    from apo_ray.ray_utils import cluster_offers, ray_session

    with ray_session(address):
        placement = actor_placement(gpus, offers := cluster_offers())
        if gpus > 0 and "num_gpus" not in placement:
            print(f"[{label}] gpus_per_worker {gpus} but the cluster has no GPU: the policy runs on CPU",
                  file=sys.stderr)
        spec = rollout_spec(task, scenario, policy, out, round_=round_, corrector=corrector, image_size=image_size,
                            horizon=horizon, wrist=wrist, oracle_version=oracle_version)
        # GPU shares are never pooled: an idle actor's share would keep the trainer off that GPU
        pool_key = json.dumps(placement, sort_keys=True) if _pool is not None and "num_gpus" not in placement else None
        cap = actor_capacity(placement, offers)
        if cap < 1:
            raise UserError(f"the cluster cannot hold one rollout actor ({placement})", "collect/eval workers",
                            "add a node with a CPU (and the GPU share asked for), or start Ray with more CPUs")
        if workers > cap:  # the rest would wait for a slot forever: their first call blocks the stage
            print(f"[{label}] {workers} workers but the cluster holds {cap} rollout actors at once: using {cap}",
                  file=sys.stderr)
        n = min(workers, len(todo), cap)
        actors = _pool.pop(pool_key, []) if pool_key is not None else []
        for a in actors[n:]:
            ray.kill(a)
        actors = actors[:n]
        actor_cls = ray.remote(RolloutWorker).options(max_restarts=3, max_task_retries=3, **placement)
        actors += [actor_cls.remote(**spec) for _ in range(n - len(actors))]
        bar = _Progress(len(todo), label, progress)
        queue = list(todo)
        pending: dict[Any, tuple[int, Any]] = {}
        steps, ok = 0, False

        def submit(actor: Any) -> None:
            i = queue.pop(0)
            pending[actor.run_episode.remote(seeds[i], i < videos, spec)] = (i, actor)

        try:
            # env construction (or a pooled actor's retargeting) is not part of the step rate
            ray.get([a.retarget.remote(spec) for a in actors])
            device = ",".join(sorted(set(ray.get([a.ping.remote() for a in actors]))))
            t0 = time.monotonic()
            for a in actors:
                if queue:
                    submit(a)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i, actor = pending.pop(ready[0])
                st = ray.get(ready[0])
                done[i] = st
                steps += st.steps
                bar.update(st, steps)
                if queue:
                    submit(actor)
            wall, ok = time.monotonic() - t0, True
        finally:
            bar.close()
            if ok and pool_key is not None and _pool is not None:
                _pool[pool_key] = actors
            else:
                for a in actors:
                    ray.kill(a)
    return steps, wall, device
