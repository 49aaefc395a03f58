"""Shared by the ``jobs/*.py`` entry points: run one ``apo-ray`` subcommand on the job's Ray cluster.

Under ``ray job submit`` the supervisor sets ``RAY_ADDRESS``; passing it on as ``--address`` makes every stage
join that cluster instead of starting an embedded Ray (which is what the same script does on a laptop).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir, if not pip-installed


def run(command: str, argv: list[str], address_flag: bool = True) -> int:
    from apo_ray.cli import main

    args = [command, *argv]
    if address_flag and os.environ.get("RAY_ADDRESS") and "--address" not in argv:
        args += ["--address", os.environ["RAY_ADDRESS"]]
    return main(args)
