"""apo-ray loop: the lifelong-learning loop (round 0 BC base, then deploy → dataset → train → eval rounds)."""

from __future__ import annotations

import argparse
import json

from apo_ray.cli import usage_error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop", help="run or resume the lifelong-learning loop",
                       description="Run the rounds of configs/<name>.yaml in --run-dir. Rerunning the same "
                                   "command (or adding --resume) continues after the last completed stage; "
                                   "report/report.html is rewritten after every round.")
    p.add_argument("--config", required=True, help="YAML file of overrides, e.g. configs/smoke.yaml")
    p.add_argument("--run-dir", help="local dir or s3:// URI (default: loop.storage from the config)")
    p.add_argument("--resume", action="store_true", help="require an existing run to continue")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, as `ray job submit` sets "
                                     "it, else an embedded Ray)")
    p.add_argument("--no-progress", action="store_true", help="no live progress lines")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. loop.rounds=3")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import config
    from apo_ray.loop import run_loop

    cfg = config.load(args.config, args.overrides)
    if not args.run_dir and not cfg.loop.storage:
        raise usage_error("no run dir: pass --run-dir DIR or set loop.storage", "add --run-dir runs/<name>")
    if args.run_dir and cfg.loop.storage and args.run_dir != cfg.loop.storage:
        raise usage_error(f"--run-dir {args.run_dir} conflicts with loop.storage {cfg.loop.storage}",
                          "pass only one of them")
    result = run_loop(cfg, args.run_dir, resume=args.resume, address=args.address,
                      progress=not args.no_progress)
    print(json.dumps(result))
    print(f"report: {result['report']}")  # the last line: where to look
    return 0
