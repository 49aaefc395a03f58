"""Custom-resource requests that follow cluster.yaml: ask for ``sim`` / ``trainer`` only where a node offers them.

On a laptop (embedded Ray, no custom resources) both helpers return ``{}``, so actors schedule on plain CPUs;
on the autoscaling cluster they return ``{"sim": 1}`` / ``{"trainer": 1}``, which also makes the autoscaler
launch the right worker type. While every `rollout`/`trainer` node is scaled down the cluster shows no such
resource, so set ``RAY_APO_SIM=1`` / ``RAY_APO_TRAINER=1`` in the job's runtime env to force the request
(``=0`` forces it off); docs/LOOP.md shows the submit command.
"""

from __future__ import annotations

import os

SIM = "sim"
TRAINER = "trainer"


def _wanted(resource: str, env: str) -> bool:
    forced = os.environ.get(env)
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    import ray

    if not ray.is_initialized():
        return False
    return ray.cluster_resources().get(resource, 0) > 0


def rollout_resources() -> dict[str, float]:
    """Extra ``resources=`` for one rollout actor: ``{"sim": 1}`` when the cluster has ``sim``, else ``{}``."""
    return {SIM: 1.0} if _wanted(SIM, "RAY_APO_SIM") else {}


def trainer_resources() -> dict[str, float]:
    """Extra ``resources_per_worker`` for one Ray Train worker: ``{"trainer": 1}`` when the cluster has it."""
    return {TRAINER: 1.0} if _wanted(TRAINER, "RAY_APO_TRAINER") else {}
