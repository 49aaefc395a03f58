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
from typing import Any

from apo_ray.errors import UserError

# module names under apo_ray.cli, in --help order
COMMANDS = ("tasks", "collect", "dataset", "export_hdf5", "export_hf", "train", "eval", "loop", "fork", "status",
            "report", "config", "bench")
EXIT_CODES = "exit codes: 0 ok; 1 internal error (traceback in a log file); 2 bad input or usage; 3 output " \
             "filesystem full, read-only or unwritable; 130 interrupted"


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, where it has one worth showing (not None, False or [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or default is None or default is False
                or default == argparse.SUPPRESS or default == [] or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("apo_ray")
    except Exception:  # noqa: BLE001 - running from a checkout that was never installed
        from apo_ray import __version__

        return __version__


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out += _all_parsers(child)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apo-ray",
        description="Refine VLA robot policies from corrector interventions with Action Preference Optimization.",
        epilog="Run `apo-ray COMMAND --help` for a command's flags. " + EXIT_CODES + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"apo_ray.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"apo_ray.cli.{name}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    for p in _all_parsers(parser):
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `apo-ray` asks what it can do: the help, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    # Ray Data logs to its session file only: a failure ends in our one line, not in its console tracebacks
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).resolve().parents[1] / "ray_data_logging.yaml"))
    from apo_ray.quiet import drop_noise

    try:
        with drop_noise():
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
        if isinstance(e, PermissionError) and e.filename:  # a path the user can fix, not a bug of ours
            print(UserError(f"permission denied: {e.filename}", "file system",
                            "make it readable/writable for this user, or choose another path").line(), file=sys.stderr)
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


def add_config_args(p: argparse.ArgumentParser, sections: tuple[str, ...] | None, required: bool = False) -> None:
    """``--config FILE`` and trailing ``key=value`` overrides; ``sections``: the config sections the command reads
    (None: all of them)."""
    reads = f"; this command reads only its {'/'.join(sections)} section" + ("s" if len(sections) > 1 else "") \
        if sections else ""
    p.add_argument("--config", required=required, metavar="FILE",
                   help=f"YAML file of overrides of the defaults{reads} (keys: apo-ray config --keys)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides applied on top of --config, e.g. train.lr=3e-4")
    p.set_defaults(config_sections=sections)


def add_recipe_arg(p: argparse.ArgumentParser) -> None:
    """``--recipe NAME``: a named config layer under --config (apo_ray.config.RECIPES)."""
    from apo_ray.config import RECIPES

    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="named settings under --config and the flags; base-policy: the recipe that meets the "
                        "learnability bar (docs/experiments/base_policy.md)")


def load_config(args: argparse.Namespace, command: str, flag_overrides: tuple[str, ...] = ()) -> Any:
    """The config of ``--recipe`` <- ``--config`` <- overrides <- the command's own flags (as ``key=value``); a key
    of a section the command does not read is refused."""
    from apo_ray import config

    return config.load(args.config, [*args.overrides, *flag_overrides], sections=args.config_sections,
                       command=f"apo-ray {command}", recipe_name=getattr(args, "recipe", None))


