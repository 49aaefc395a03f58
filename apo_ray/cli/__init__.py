"""``apo-ray`` command line: thin argparse front-ends over the package's stage functions.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; heavy imports (torch, ray,
robosuite) happen inside the command, so ``apo-ray --help`` stays fast. Errors from bad input print one
line and exit 2; a full or unwritable output disk prints one line and exits 3; unexpected errors print one line, keep the traceback in a log file, and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from pathlib import Path

from apo_ray.errors import UserError

# module names under apo_ray.cli, in --help order
COMMANDS = ("tasks", "collect", "dataset", "export_hdf5", "export_hf", "train", "eval", "loop", "fork", "status", "report", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apo-ray",
        description="Refine VLA robot policies from corrector interventions with Action Preference Optimization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"apo_ray.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"apo_ray.cli.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Ray Data logs to its session file only: a failure ends in our one line, not in its console tracebacks
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).resolve().parents[1] / "ray_data_logging.yaml"))
    try:
        rc = args.func(args)
        return int(rc or 0)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line, full traceback kept in a file
        from apo_ray.fsio import disk_error

        disk = disk_error(e)
        if disk:  # finished work is intact (atomic writes, journal): the same command resumes
            print(UserError(f"the output filesystem failed: {disk}", "output dir",
                            "free space there (or remount it writable), then rerun the same command "
                            "(add --resume for collect/eval)").line(), file=sys.stderr)
            return 3
        if os.environ.get("APO_RAY_DEBUG"):
            raise
        fd, path = tempfile.mkstemp(prefix="apo-ray-crash-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: internal error {type(e).__name__}: {first} (traceback in {path}); "
              f"fix: rerun with APO_RAY_DEBUG=1 and report it", file=sys.stderr)
        return 1


def usage_error(msg: str, fix: str = "") -> UserError:
    """A command-line usage error (conflicting or invalid flags)."""
    return UserError(msg, "command line", fix or "see apo-ray COMMAND --help")


