"""Parallel corrected rollouts on Ray actors, written straight to Parquet.

``RolloutWorker`` is a plain class (usable without Ray, and in tests); ``collect`` wraps it with
``ray.remote`` at the call site. Each episode is a pure function of (task, scenario, seed, policy
version) and lands as ``episodes/<episode_id>.parquet`` via temp file + rename, so a restarted actor that
re-runs an episode rewrites the same bytes under the same name: nothing is lost or written twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from apo_ray import schema as S
from apo_ray.config import CorrectorConfig, DataConfig, InferenceConfig
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


@dataclass(frozen=True)
class RolloutSpec:
    """Everything an episode depends on besides its seed: what a :class:`RolloutWorker` rolls out."""

    task: str
    scenario: str
    policy: str  # a scripted policy's name or a checkpoint dir (apo_ray.policies)
    out_dir: str
    round_: int = 0
    corrector: CorrectorConfig | None = None  # None: the policy acts alone
    image_size: int = 64
    horizon: int = 0  # 0: the task's default
    cheap_render: bool = True
    wrist: bool = False
    oracle_version: int | None = None  # None: the current oracle
    service: bool = False  # a checkpoint policy acts through the inference service, not a copy in the worker

    def env_key(self) -> tuple:
        return (self.task, self.scenario, self.image_size, self.horizon, self.cheap_render, self.wrist)


@dataclass(frozen=True)
class RunOptions:
    """How a collection runs, as opposed to what it rolls out: the env runners, the policy's device, the inference
    service, the cluster, and what is shown or kept beside the episodes."""

    workers: int = 2
    envs_per_worker: int = 1  # envs stepped by each env runner (with the inference service)
    gpus: float = 0.0  # a checkpoint policy's GPU share (per actor, or per replica with the service)
    inference: InferenceConfig | None = None  # None: the service with its defaults
    address: str | None = None  # a Ray cluster; None: $RAY_ADDRESS, else an embedded Ray
    videos: int = 0  # MP4s of the first N episodes
    progress: bool = True
    label: str = "collect"


@dataclass
class _Slot:
    """One env of a worker and what watches it: the oracle, the corrector and a scripted policy's episode state."""

    env: Any
    policy: Any = None
    policy_key: tuple | None = None


class RolloutWorker:
    """An env runner: owns ``envs_per_worker`` envs (built as they are first needed), the oracle and corrector
    beside each, and the policy: a scripted one in-process, a checkpoint either through the batched inference
    service (:mod:`apo_ray.inference`, the ``service`` argument of :meth:`episode`) or as its own copy.

    What it rolls out is its :class:`RolloutSpec`. ``run_episode`` may carry the spec of the episode it
    asks for, and the worker rebuilds only what differs: a pooled actor (:func:`keep_actors`) then serves the
    next stage without a process start or the torch/robosuite imports, and a stage with the same policy keeps
    its weights loaded. An actor Ray restarts comes back with its constructor's spec and is put right by the
    next call's. On Ray it is an async actor: its episodes run as coroutines on one thread, and one whose
    policy is remote awaits its action while another steps its env."""

    def __init__(self, spec: RolloutSpec) -> None:
        self.spec: RolloutSpec | None = None
        self._free: list[_Slot] = []
        self._busy = 0
        self._vla: Any = None
        self._env_key: tuple | None = None
        self._policy_key: tuple | None = None
        self.reruns = 0
        self.retarget(spec, load=False)

    def retarget(self, spec: RolloutSpec, load: bool = True) -> None:
        """Roll out ``spec`` from now on, rebuilding the envs and the policy only where they differ. Envs are built
        on first use, in the thread that steps them (an EGL context cannot be current in two threads)."""
        if spec == self.spec:
            return
        task, scenario, policy, ov = spec.task, spec.scenario, spec.policy, spec.oracle_version
        env_key = spec.env_key()
        if env_key != self._env_key:
            if self._busy:
                raise RuntimeError("retarget with episodes in flight")
            for slot in self._free:
                slot.env.close()
            self._free = []
            self._env_key = env_key
        self._policy_key = (policy, task, ov, _weights_stamp(policy))
        if is_scripted(policy) or spec.service:
            self._vla = None
        elif load and (self._vla is None or self._vla[0] != self._policy_key):
            self._vla = None  # the old weights go before the next ones load
            self._vla = (self._policy_key, make_policy(policy, task, ov))
        corrector = spec.corrector
        self.corrector_cfg = corrector if corrector is not None and corrector.enabled else None
        self.task, self.scenario, self.round = task, scenario, spec.round_
        self.out_dir = Path(spec.out_dir)
        self.spec = spec

    def prepare(self, envs: int = 1) -> None:
        """Build up to ``envs`` envs (and a checkpoint policy's own copy) now, so a stage's step rate excludes them."""
        self._load_policy()
        slots = [self._slot() for _ in range(envs)]
        self._free.extend(slots)
        self._busy -= len(slots)

    def _load_policy(self) -> None:
        spec = self.spec
        if not is_scripted(spec.policy) and not spec.service and (self._vla is None
                                                                 or self._vla[0] != self._policy_key):
            self._vla = None
            self._vla = (self._policy_key, make_policy(spec.policy, spec.task, spec.oracle_version))

    def _slot(self) -> _Slot:
        import envs

        if self._free:
            slot = self._free.pop()
        else:
            spec = self.spec
            slot = _Slot(envs.TaskEnv(spec.task, spec.scenario, image_size=spec.image_size, camera=True,
                                      cheap_render=spec.cheap_render, horizon=spec.horizon, wrist=spec.wrist))
        if is_scripted(self.spec.policy) and slot.policy_key != self._policy_key:
            slot.policy = make_policy(self.spec.policy, self.task, self.spec.oracle_version)
            slot.policy_key = self._policy_key
        self._busy += 1
        return slot

    def _release(self, slot: _Slot) -> None:
        self._busy -= 1
        self._free.append(slot)

    def ping(self) -> str:
        """Ready; returns where the policy runs (``cpu``, ``cuda:0``; scripted policies: ``cpu``)."""
        return str(getattr(self._vla[1], "device", "cpu")) if self._vla is not None else "cpu"

    def run_episode(self, seed: int, video: bool = False, spec: RolloutSpec | None = None) -> EpisodeStats:
        """One episode, in-process (a scripted policy or the worker's own checkpoint copy)."""
        if spec is not None:
            self.retarget(spec)
        self._load_policy()
        slot = self._slot()
        try:
            policy = slot.policy if slot.policy is not None else self._vla[1]
            ep = self._episode(slot, seed, video, policy.version)
            obs = next(ep)
            policy.reset([seed])
            try:
                while True:
                    obs = ep.send(np.asarray(policy.act([obs])[0], np.float32))
            except StopIteration as stop:
                return stop.value
        finally:
            self._release(slot)

    def _episode(self, slot: _Slot, seed: int, video: bool, version: str) -> Iterator[dict]:
        """The episode as a generator: it yields each observation the policy must act on and is sent the policy's
        action back; it returns the :class:`EpisodeStats` of the file it wrote. Between a yield and the next send
        other episodes of this worker may step their envs: the global numpy RNG (robosuite draws from it) is this
        episode's own across that gap, so interleaving never changes an episode."""
        import envs

        env, ov = slot.env, self.spec.oracle_version
        oracle = envs.make_oracle(self.task, ov)
        corrector = envs.Corrector(self.task, self.corrector_cfg) if self.corrector_cfg is not None else None
        eid = episode_id(self.task, self.scenario, self.round, seed)
        steps: dict[str, list] = {k: [] for k in (S.T, S.IMAGE, S.PROPRIO, S.ACTION, S.ORACLE_ACTION, S.C,
                                                  S.INTERVENTION_ID, S.REWARD, S.DONE, S.STATE)}
        obs = env.reset(seed)
        obs["instruction"] = env.instruction
        oracle.reset()
        if corrector is not None:
            corrector.reset(seed)
        done, t = False, 0
        while not done:
            _maybe_fault(seed, t, self.out_dir)
            oracle_action = np.asarray(oracle.act(obs["privileged"]), np.float32)
            rng = np.random.get_state()
            policy_action = yield obs
            np.random.set_state(rng)
            if corrector is None:
                action, c, iid = policy_action, S.C_POLICY, S.NO_INTERVENTION
            else:
                action, c, iid = corrector.decide(policy_action, oracle_action, obs["privileged"], oracle)
            steps[S.T].append(t)
            steps[S.IMAGE].append(obs["image"])
            steps[S.PROPRIO].append(obs["proprio"])
            steps[S.ACTION].append(np.clip(action, -1.0, 1.0))
            steps[S.ORACLE_ACTION].append(oracle_action)
            steps[S.C].append(c)
            steps[S.INTERVENTION_ID].append(iid)
            steps[S.STATE].append(env.get_state())
            obs, reward, done, _ = env.step(np.clip(action, -1.0, 1.0))
            obs["instruction"] = env.instruction
            steps[S.REWARD].append(reward)
            steps[S.DONE].append(done)
            t += 1
        success = bool(env.is_success())
        steps.update({
            S.EPISODE_ID: eid, S.ROUND: self.round, S.TASK: self.task, S.SCENARIO: self.scenario,
            S.SEED: seed, S.SUCCESS: success, S.INSTRUCTION: env.instruction, S.POLICY_VERSION: version,
        })
        table = S.episode_table(steps, env.env_meta)
        if video:
            from apo_ray.video import write_mp4

            write_mp4(self.out_dir / VIDEOS_DIR / f"{eid}.mp4", np.stack(steps[S.IMAGE]), np.asarray(steps[S.C]))
        write_parquet(self.out_dir / EPISODES_DIR / f"{eid}.parquet", table)
        return EpisodeStats.of_table(table)

    def close(self) -> None:
        for slot in self._free:
            slot.env.close()
        self._free = []

    # ---- on Ray: an async actor, every entry point below a coroutine on the actor's one event-loop thread, where
    # its envs are built and stepped

    async def setup(self, spec: RolloutSpec, envs: int) -> dict[str, Any]:
        """Retarget and build ``envs`` envs; returns the policy's device and the episodes re-run so far."""
        self.retarget(spec)
        self.prepare(envs)
        return {"device": self.ping(), "reruns": self.reruns}

    async def episode(self, seed: int, video: bool, spec: RolloutSpec,
                      service: dict[str, Any] | None = None) -> EpisodeStats:
        """One episode; with ``service`` its actions come from the inference replicas. If a replica dies while
        this episode waits on it, the episode starts over from its seed (the replica comes back: max_restarts)."""
        if service is None:
            return self.run_episode(seed, video, spec)
        import ray

        from apo_ray.inference import MAX_RESTARTS, ServiceClient

        self.retarget(spec)
        for attempt in range(MAX_RESTARTS + 1):
            slot = self._slot()
            client = ServiceClient(service, seed)
            ep = self._episode(slot, seed, video, client.version)
            opened = False
            try:
                obs = next(ep)  # the env reset, before the replica counts this episode as one to batch with
                await client.open()
                opened = True
                while True:
                    obs = ep.send(await client.act(obs))
            except StopIteration as stop:
                return stop.value
            except ray.exceptions.RayActorError:
                if attempt == MAX_RESTARTS:
                    raise
                self.reruns += 1
                print(f"inference replica died during seed {seed}: the episode starts over", file=sys.stderr)
            finally:
                if opened:
                    await client.close()
                ep.close()
                self._release(slot)
            await client.wait_back()
        raise AssertionError("unreachable")

EnvRunner = RolloutWorker
"""The name of the Ray actor's role: an env runner."""


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


def validate_request(task: str, scenario: str, policy: str, episodes: int, workers: int, gpus: float = 0.0,
                     envs_per_worker: int = 1) -> None:
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
    if envs_per_worker < 1:
        raise UserError(f"envs_per_worker must be >= 1, got {envs_per_worker}", "collect/eval envs_per_worker",
                        "use 1 or more envs per rollout actor")


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


def collect(spec: RolloutSpec, seeds: Sequence[int], run: RunOptions = RunOptions(), *,
            resume: bool = False) -> dict[str, Any]:
    """Roll ``spec`` out once per seed on ``run.workers`` Ray actors; write one Parquet file per episode.

    With ``resume``, episodes already on disk are kept and only the missing ones run. A checkpoint trained on
    agentview + wrist turns ``spec.wrist`` on itself. A checkpoint policy acts through the batched inference
    service (:mod:`apo_ray.inference`) unless ``run.inference.enabled`` is false; ``run.gpus`` is then each
    replica's GPU share (unless ``inference.gpus_per_replica`` says), else each actor's. Returns the summary
    dict (also written to ``spec.out_dir/collect.json``), with ``policy_device``: where this call's actors ran
    the policy (None if every episode was already on disk).
    """
    seeds = list(seeds)
    validate_request(spec.task, spec.scenario, spec.policy, len(seeds), run.workers, run.gpus, run.envs_per_worker)
    inference = run.inference if run.inference is not None else InferenceConfig()
    views = policy_views(spec.policy)
    if spec.wrist and views == 1 and not is_scripted(spec.policy):
        raise UserError("the policy checkpoint takes agentview alone; the wrist camera would change its images",
                        spec.policy, "drop --wrist (env.wrist) for this checkpoint")
    out = Path(spec.out_dir)
    _check_out_dir(out, resume)
    (out / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
    sweep_tmp(out / EPISODES_DIR)
    done: dict[int, EpisodeStats] = {}
    for i, s in enumerate(seeds):
        path = out / EPISODES_DIR / f"{episode_id(spec.task, spec.scenario, spec.round_, s)}.parquet"
        if path.exists():
            done[i] = read_episode_stats(path)
    todo = [i for i in range(len(seeds)) if i not in done]
    result = _Run(0, 0.0, None, 0)
    if todo:
        service = inference.enabled and not is_scripted(spec.policy)
        spec = dataclasses.replace(spec, out_dir=str(out), wrist=spec.wrist or views > 1, service=service)
        run = dataclasses.replace(run, envs_per_worker=run.envs_per_worker if service else 1,
                                  gpus=0.0 if is_scripted(spec.policy) else run.gpus,
                                  inference=inference if service else None)
        result = _run_parallel(spec, run, seeds, todo, done)
    stats = [done[i] for i in range(len(seeds))]
    summary = {**summarize(stats, result.wall, result.steps), "policy_device": result.device}
    if result.inference is not None:  # the service's decodes of this call (a restarted replica's counts start over)
        summary["inference"] = result.inference
        summary["inference_reruns"] = result.reruns
    write_json(out / "collect.json", {"task": spec.task, "scenario": spec.scenario, "policy": spec.policy,
                                      "round": spec.round_, "seeds": seeds, **summary})
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
    # one that claims nothing (an embedded CPU replica) fits any number of times
    return int(min((cluster.get(k, 0.0) // v for k, v in need.items() if v > 0), default=1 << 30))


_pool: dict[str, list[Any]] | None = None
"""Idle rollout actors by placement, while :func:`keep_actors` is open; None: each call kills its own."""
_services: dict[str, Any] = {}
"""Idle inference services (:class:`apo_ray.inference.InferenceService`) by placement and config, likewise."""


@contextlib.contextmanager
def keep_actors() -> Iterator[None]:
    """Within this block (inside one Ray session) :func:`collect` hands its CPU actors and its inference service
    back instead of killing them, and the next call retargets them: a lifelong loop's evaluations and the next
    round's deployments then skip the actor start, the torch and robosuite imports and, with the same policy, its
    load. An idle actor on a ``sim`` slot holds memory only; one that holds a CPU or a GPU (a cluster without
    ``sim``, an inference replica) must go before a stage that needs them: call ``release_actors(cpu_only=True)``
    before a dataset build or a training run."""
    global _pool
    _pool = {}
    try:
        yield
    finally:
        release_actors()
        _pool = None


def release_actors(cpu_only: bool = False) -> None:
    """Kill the idle pooled actors and inference services (with ``cpu_only``, those whose placement claims CPUs;
    an inference service that claims none drops its weights and keeps its processes)."""
    for key in list(_services):
        holds_cpu = json.loads(key)["placement"].get("num_cpus", 0) > 0
        if cpu_only and not holds_cpu and _services[key].unload():
            continue
        _services.pop(key).kill()
    if not _pool:
        return
    import ray

    for key in [k for k in _pool if not cpu_only or json.loads(k).get("num_cpus", 0) > 0]:
        for a in _pool.pop(key):
            ray.kill(a)


@dataclass(frozen=True)
class _Run:
    steps: int
    wall: float
    device: str | None
    reruns: int
    inference: dict[str, Any] | None = None


def _start_service(policy: str, inference: InferenceConfig, gpus: float, offers: dict[str, float],
                   label: str) -> tuple[Any, str | None, dict[str, float]]:
    """The stage's inference service (a pooled one retargeted, or new), its pool key, and what the cluster
    offers the env runners beside it."""
    from apo_ray.inference import InferenceService, replica_placement
    from apo_ray.ray_utils import embedded

    share = inference.gpus_per_replica or gpus
    placement = replica_placement(share, offers, embedded())
    if share > 0 and "num_gpus" not in placement:
        print(f"[{label}] inference replicas asked for {share:g} GPU but the cluster has no GPU: the policy runs "
              "on CPU", file=sys.stderr)
    cap = actor_capacity(placement, offers)
    if cap < 1:
        raise UserError(f"the cluster cannot hold one inference replica ({placement})", "inference.replicas",
                        "add a node with a CPU (and the GPU share asked for), or start Ray with more CPUs")
    n = min(inference.replicas, cap)
    if n < inference.replicas:
        print(f"[{label}] {inference.replicas} inference replicas but the cluster holds {cap}: using {n}",
              file=sys.stderr)
    key = json.dumps({"placement": placement, "config": dataclasses.asdict(inference), "n": n}, sort_keys=True)
    svc = _services.pop(key, None) if _pool is not None else None
    if svc is not None:
        svc.load(policy)
    else:
        svc = InferenceService.start(policy, inference, placement, n)
    rest = dict(offers)
    rest["CPU"] = rest.get("CPU", 0.0) - n * placement.get("num_cpus", 0)
    rest["GPU"] = rest.get("GPU", 0.0) - n * placement.get("num_gpus", 0)
    return svc, (key if _pool is not None else None), rest


def _run_parallel(spec: RolloutSpec, run: RunOptions, seeds: list[int], todo: list[int],
                  done: dict[int, EpisodeStats]) -> _Run:
    """Run the episodes ``todo`` (indices into ``seeds``) on ``run.workers`` actors; fill ``done``."""
    import ray

    from apo_ray.ray_utils import cluster_offers, ray_session

    workers, gpus, inference, label = run.workers, run.gpus, run.inference, run.label
    with ray_session(run.address):
        offers = cluster_offers()
        service, service_key = None, None
        runner_gpus = 0.0 if inference is not None else gpus  # with the service, runners hold no model
        placement = actor_placement(runner_gpus, offers)
        if runner_gpus > 0 and "num_gpus" not in placement:
            print(f"[{label}] gpus_per_worker {gpus} but the cluster has no GPU: the policy runs on CPU",
                  file=sys.stderr)
        # GPU shares are never pooled: an idle actor's share would keep the trainer off that GPU
        pool_key = json.dumps(placement, sort_keys=True) if _pool is not None and "num_gpus" not in placement else None
        actors: list[Any] = []
        ok = False
        try:
            if inference is not None:
                service, service_key, offers = _start_service(spec.policy, inference, gpus, offers, label)
            cap = actor_capacity(placement, offers)
            if cap < 1:
                raise UserError(f"the cluster cannot hold one rollout actor ({placement})", "collect/eval workers",
                                "add a node with a CPU (and the GPU share asked for), or start Ray with more CPUs")
            if workers > cap:  # the rest would wait for a slot forever: their first call blocks the stage
                print(f"[{label}] {workers} workers but the cluster holds {cap} rollout actors at once: using {cap}",
                      file=sys.stderr)
            n = min(workers, -(-len(todo) // run.envs_per_worker), cap)
            actors = _pool.pop(pool_key, []) if pool_key is not None else []
            for a in actors[n:]:
                ray.kill(a)
            actors = actors[:n]
            actor_cls = ray.remote(EnvRunner).options(max_restarts=3, max_task_retries=3, **placement)
            actors += [actor_cls.remote(spec) for _ in range(n - len(actors))]
            result = _drive(actors, spec, seeds, todo, done, min(run.envs_per_worker, -(-len(todo) // n)), run,
                            service)
            ok = True
        finally:
            if ok and pool_key is not None and _pool is not None:
                _pool[pool_key] = actors
            else:
                for a in actors:
                    ray.kill(a)
            if service is not None:
                if ok and service_key is not None and _pool is not None:
                    _services[service_key] = service
                else:
                    service.kill()
    return result


def _drive(actors: list[Any], spec: RolloutSpec, seeds: list[int], todo: list[int], done: dict[int, EpisodeStats],
           per_actor: int, run: RunOptions, service: Any) -> _Run:
    """Keep ``per_actor`` episodes in flight on every actor until ``todo`` is done; fill ``done``."""
    import ray

    # env construction (or a pooled actor's retargeting) is not part of the step rate
    ready = ray.get([a.setup.remote(spec, per_actor) for a in actors])
    device = service.device if service is not None else ",".join(sorted({r["device"] for r in ready}))
    clients = [service.client(j) if service is not None else None for j in range(len(actors))]
    counts0 = service.counts() if service is not None else (0, 0)
    bar = _Progress(len(todo), run.label, run.progress)
    queue = list(todo)
    pending: dict[Any, tuple[int, int]] = {}
    steps = 0

    def submit(j: int) -> None:
        i = queue.pop(0)
        pending[actors[j].episode.remote(seeds[i], i < run.videos, spec, clients[j])] = (i, j)

    try:
        t0 = time.monotonic()
        for _ in range(per_actor):
            for j in range(len(actors)):
                if queue:
                    submit(j)
        while pending:
            got, _ = ray.wait(list(pending), num_returns=1)
            i, j = pending.pop(got[0])
            st = ray.get(got[0])
            done[i] = st
            steps += st.steps
            bar.update(st, steps)
            if queue:
                submit(j)
        wall = time.monotonic() - t0
    finally:
        bar.close()
    after = ray.get([a.setup.remote(spec, 0) for a in actors])
    reruns = sum(a["reruns"] - b["reruns"] for a, b in zip(after, ready, strict=True))
    batches = None
    if service is not None:
        decodes, rows = (b - a for a, b in zip(counts0, service.counts(), strict=True))
        batches = {"decodes": decodes, "rows": rows, "mean_rows": round(rows / decodes, 3) if decodes > 0 else 0.0}
    return _Run(steps, wall, device, max(reruns, 0), batches)
