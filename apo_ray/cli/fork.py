"""apo-ray fork: start a variant of a lifelong run from another run's completed stages."""

from __future__ import annotations

import argparse
import json
import shlex


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fork", help="start a variant run from another run's reusable stages",
                       description="Create --run-dir from the completed stages of --from that the new config "
                                   "(--config + overrides) would produce identically: round 0 and the shared "
                                   "round-1 data, say, for a variant that changes only the refinement's training. "
                                   "Stage dirs are hard-linked. Then run `apo-ray loop` with the same --config, "
                                   "--run-dir and overrides.")
    p.add_argument("--from", dest="src", required=True, metavar="RUN_DIR", help="the run dir to fork")
    p.add_argument("--config", required=True, help="YAML file of overrides, e.g. configs/lift.yaml")
    p.add_argument("--run-dir", required=True, help="the new run dir (must not exist or be empty)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=5")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import config
    from apo_ray.fork import fork_run

    cfg = config.load(args.config, args.overrides)
    result = fork_run(args.src, cfg, args.run_dir)
    print(json.dumps(result))
    cmd = ["apo-ray", "loop", "--config", args.config, "--run-dir", args.run_dir, *args.overrides]
    print(f"kept {len(result['kept'])} of {result['stages']} stages; continue with: {shlex.join(cmd)}")
    return 0
