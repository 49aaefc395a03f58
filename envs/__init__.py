"""Simulation tasks, disruption scenarios, scripted oracle experts and the corrector.

Imports nothing from apo_ray (the layer above; tests/test_layering.py checks), nor torch or ray;
robosuite/robomimic load when a ``TaskEnv`` is built.
"""

from envs.corrector import Corrector
from envs.env import TaskEnv
from envs.oracle import Oracle, make_oracle
from envs.scenarios import SCENARIOS, ScenarioSpec, compose, parse_scenario
from envs.tasks import TASKS, TaskSpec, get_task

__all__ = ["SCENARIOS", "TASKS", "Corrector", "Oracle", "ScenarioSpec", "TaskEnv", "TaskSpec", "compose",
           "get_task", "make_oracle", "parse_scenario"]
