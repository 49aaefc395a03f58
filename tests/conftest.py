"""Shared fixtures: a real local Ray (one per xdist worker) and headless-rendering env vars."""

from __future__ import annotations

import os

import pytest

for _k, _v in {"MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def pytest_collection_modifyitems(config, items):
    # Ray-using tests share one xdist worker (``--dist loadgroup``) so two Ray instances never fight
    # over the 2 cores; pure tests run beside them on the other worker.
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray for the whole session, started as the product starts its own (2 CPUs, 2 ``sim``
    slots); stages reuse it instead of starting their own."""
    import ray

    from apo_ray.ray_utils import ray_session

    with ray_session(num_cpus=2):
        yield ray
