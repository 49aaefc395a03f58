"""The policy-inference service: checkpoint policies decoded in shared, batched replicas instead of one model
copy per rollout actor.

Env runners (:class:`apo_ray.rollout.RolloutWorker` on Ray) send each observation they need an action for
(image, proprio, instruction: never the privileged state) to a replica, an async Ray actor. A replica gathers
requests from every runner until it holds ``max_batch`` of them, or one from every episode open on it (no more
can come: runners open and close their episodes on the replica), or the oldest has waited ``max_wait_ms``, and
decodes them greedily with the KV cache in one forward pass per token, on a worker thread, so the event loop
keeps gathering the next batch meanwhile.

Determinism: every decode runs exactly ``max_batch`` rows (fewer requests are padded with copies of the first),
and a row of a fixed-shape batch is bitwise independent of the other rows' values (tests/test_inference.py
checks it). So an episode's actions do not depend on which episodes share its batches, how many runners or
replicas there are, or how long a replica waits: an episode stays a pure function of (task, scenario, seed,
policy). Requests of different instructions never share a batch (their prompts would pad to another length).

Faults: a replica killed mid-episode is restarted by Ray (``max_restarts``); the requests it held fail, and
the runner re-runs the affected episodes from their seeds (same bytes, same file names: none lost, none twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apo_ray.config import InferenceConfig

MAX_RESTARTS = 3
"""Ray restarts of a dead replica (each reloads the policy) before the stage fails."""
RESTART_WAIT_S = 600.0
"""How long a runner waits for a dead replica to come back before its episode fails."""


def policy_key(policy: str) -> tuple[str, int | None]:
    """A checkpoint policy and when its files last changed: a path retrained in place is a new key."""
    from apo_ray.checkpoint import checkpoint_dir

    d = checkpoint_dir(policy.strip())
    return policy.strip(), (d.stat().st_mtime_ns if d.exists() else None)


def replica_placement(gpus: float, cluster: dict[str, float], embedded: bool = False) -> dict[str, Any]:
    """Ray options of one replica: a GPU (share) where asked for and the cluster has or can add GPUs (the trainer
    nodes; one replica per GPU holds one model copy there), else one CPU for its decoding thread. On the embedded
    node a CPU replica claims no CPU: its decode shares the cores with the env runners just as a copy in each
    runner would, and a loop can then keep its process (torch imported) through dataset builds and trainings
    instead of starting a new one for every rollout stage (``rollout.release_actors``)."""
    if gpus > 0 and cluster.get("GPU", 0) > 0:
        return {"num_cpus": 1, "num_gpus": gpus}
    return {"num_cpus": 0} if embedded else {"num_cpus": 1}


def _maybe_fault(decodes: int) -> None:
    """Fault injection for tests/chaos: APO_RAY_FAULT_KILL_INFERENCE="<n>:<marker file>" makes a replica exit hard
    at its n-th decode, once (the marker file makes it one-shot), as a replica whose node dies mid-episode."""
    spec = os.environ.get("APO_RAY_FAULT_KILL_INFERENCE")
    if not spec:
        return
    n, _, marker = spec.partition(":")
    if int(n) != decodes or Path(marker).exists():
        return
    Path(marker).touch()
    os._exit(1)


class InferenceReplica:
    """One model copy serving every env runner (a Ray async actor; see the module docstring)."""

    def __init__(self, policy: str, key: tuple, max_batch: int, max_wait_ms: float, threads: int) -> None:
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.threads = threads
        self._queue: list[tuple[tuple, str, dict, asyncio.Future]] = []
        self._arrived: list[float] = []
        self._more = asyncio.Event()
        self._serving: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="decode")  # decoding leaves the event loop free
        self.policy: Any = None
        self.key: tuple | None = None
        self.decodes = self.rows = 0
        self._open = 0  # episodes that may still send a request
        self._load(policy, tuple(key))

    def _load(self, policy: str, key: tuple) -> None:
        from apo_ray.vla_policy import VLAPolicy

        if key == self.key:
            return
        self.policy = None  # the old weights go before the next ones load
        self.policy = VLAPolicy(Path(policy), threads=self.threads or None)
        self.key = key

    async def load(self, policy: str, key: Sequence) -> dict[str, str]:
        """Serve ``policy`` from now on (a no-op for the loaded one); returns its device and version. A stage
        starts here with no episode open (one a killed runner left open is forgotten)."""
        self._open = 0
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load, policy, tuple(key))
        return {"device": str(self.policy.device), "version": self.policy.version}

    async def unload(self) -> None:
        """Drop the weights (an idle replica kept through a training holds its process, not a model copy); on the
        decode thread, so it follows any decode still running."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self._unload)

    def _unload(self) -> None:
        import gc

        self.policy, self.key = None, None
        gc.collect()

    def _full(self) -> bool:
        """A batch is ready: ``max_batch`` requests, or one from every open episode (none can come meanwhile)."""
        return len(self._queue) >= min(self.max_batch, max(1, self._open))

    async def open(self) -> None:
        """An episode starts sending requests here."""
        self._open += 1

    async def close(self) -> None:
        """An episode ended (or starts over): the batch no longer waits for it."""
        self._open = max(0, self._open - 1)
        if self._full():
            self._more.set()

    async def act(self, key: Sequence, obs: dict[str, Any]) -> np.ndarray:
        """The (7,) action for one observation (``image``, ``proprio``, ``instruction``) of policy ``key``."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((tuple(key), obs.get("instruction") or "", obs, fut))
        self._arrived.append(time.monotonic())
        if self._full():
            self._more.set()
        if self._serving is None or self._serving.done():
            self._serving = asyncio.ensure_future(self._serve())
        return await fut

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            wait = self.max_wait - (time.monotonic() - self._arrived[0])
            if not self._full() and wait > 0:
                self._more.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more.wait(), wait)
            # one policy and one instruction per batch, in arrival order
            k, instr = self._queue[0][0], self._queue[0][1]
            take = [i for i, q in enumerate(self._queue) if q[0] == k and q[1] == instr][: self.max_batch]
            batch = [self._queue[i] for i in take]
            for i in reversed(take):
                del self._queue[i], self._arrived[i]
            try:
                actions = await loop.run_in_executor(self._pool, self._decode, k, [b[2] for b in batch])
            except Exception as e:  # every waiting request learns why, the replica goes on serving
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(e)
                continue
            for b, a in zip(batch, actions, strict=False):
                if not b[3].done():
                    b[3].set_result(a)

    def _decode(self, key: tuple, rows: list[dict]) -> np.ndarray:
        if key != self.key:  # a replica Ray restarted comes back with its constructor's policy
            self._load(key[0], key)
        self.decodes += 1
        self.rows += len(rows)
        _maybe_fault(self.decodes)
        padded = rows + [rows[0]] * (self.max_batch - len(rows))  # the fixed shape (module docstring)
        return self.policy.act(padded)[: len(rows)]

    def ping(self) -> str:
        return str(self.policy.device) if self.policy is not None else "unloaded"

    def counts(self) -> tuple[int, int]:
        """Decodes run and the real (unpadded) rows they held, since this replica (re)started."""
        return self.decodes, self.rows


@dataclass
class InferenceService:
    """The replicas of one stage (or of a loop's consecutive rollout stages, kept by ``rollout.keep_actors``)."""

    replicas: list[Any]
    placement: dict[str, Any]
    config: InferenceConfig
    key: tuple = ()
    version: str = ""
    device: str = ""

    @staticmethod
    def start(policy: str, config: InferenceConfig, placement: dict[str, Any], replicas: int) -> InferenceService:
        import ray

        key = policy_key(policy)
        cls = ray.remote(InferenceReplica).options(max_restarts=MAX_RESTARTS, max_task_retries=0,
                                                   max_concurrency=1000, **placement)
        handles = [cls.remote(policy, key, config.max_batch, config.max_wait_ms, config.threads)
                   for _ in range(replicas)]
        svc = InferenceService(handles, placement, config)
        svc.load(policy)
        return svc

    def load(self, policy: str) -> None:
        """Point every replica at ``policy`` (and wait for them: the model load is not part of the step rate)."""
        import ray

        self.key = policy_key(policy)
        got = ray.get([r.load.remote(policy, self.key) for r in self.replicas])
        self.device = ",".join(sorted({g["device"] for g in got}))
        self.version = got[0]["version"]

    def client(self, runner: int) -> dict[str, Any]:
        """What an env runner needs to ask for actions: the replicas (its own first, so the load spreads)."""
        n = len(self.replicas)
        order = [self.replicas[(runner + i) % n] for i in range(n)]
        return {"replicas": order, "key": list(self.key), "version": self.version}

    def counts(self) -> tuple[int, int]:
        import ray

        got = ray.get([r.counts.remote() for r in self.replicas])
        return sum(g[0] for g in got), sum(g[1] for g in got)

    def unload(self) -> bool:
        """Drop every replica's weights, keeping the processes; False if a replica could not (then kill it all)."""
        import ray

        self.key, self.version, self.device = (), "", ""
        try:
            ray.get([r.unload.remote() for r in self.replicas], timeout=RESTART_WAIT_S)
        except ray.exceptions.RayError:  # a dead replica, or a timeout
            return False
        return True

    def kill(self) -> None:
        import ray

        for r in self.replicas:
            ray.kill(r)
        self.replicas = []


class ServiceClient:
    """An env runner's side: one request per observation to its replica, awaited (so the runner's other envs step
    meanwhile). Only the fields the policy reads leave the runner."""

    def __init__(self, client: dict[str, Any], slot: int) -> None:
        reps = client["replicas"]
        self.replica = reps[slot % len(reps)]
        self.key = client["key"]
        self.version = client["version"]

    async def act(self, obs: dict[str, Any]) -> np.ndarray:
        row = {"image": obs["image"], "proprio": obs["proprio"], "instruction": obs.get("instruction")}
        return np.asarray(await self.replica.act.remote(self.key, row), np.float32)

    async def open(self) -> None:
        await self.replica.open.remote()

    async def close(self) -> None:
        """Best effort: a dead replica's count went with it."""
        import ray

        with contextlib.suppress(ray.exceptions.RayActorError):
            await self.replica.close.remote()

    async def wait_back(self, timeout_s: float = RESTART_WAIT_S) -> None:
        """Wait until the replica answers again (Ray is restarting it); raise if it does not within ``timeout_s``
        (its restarts are spent, or it cannot be placed)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.replica.ping.remote()
                return
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
