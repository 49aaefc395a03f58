"""apo-ray collect: corrected, labelled rollouts on parallel Ray actors, to Parquet."""

from __future__ import annotations

import argparse
import json

from apo_ray.cli import add_config_args, add_recipe_arg
from apo_ray.config import CollectConfig
from envs.oracle import VERSIONS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="run policy + oracle corrector rollouts and save episodes as Parquet",
                       description="Run rollouts on parallel Ray actors; writes OUT/episodes/*.parquet and "
                                   "prints a JSON summary as the last stdout line.")
    p.add_argument("--task", required=True, help="task name (see `apo-ray tasks`)")
    p.add_argument("--scenario", default="nominal", help="scenario or composition, e.g. position+texture")
    p.add_argument("--policy", default="oracle",
                   help="oracle | random | noisy-oracle:<p> | dart-oracle:<sigma> | a trained checkpoint directory")
    p.add_argument("--episodes", type=int, default=8, help="episodes to run")
    p.add_argument("--workers", type=int, default=2, help="parallel rollout actors")
    p.add_argument("--seed", type=int, default=0, help="episode i uses seed + i")
    p.add_argument("--round", type=int, default=0, dest="round_", help="round number recorded in every row")
    p.add_argument("--out", required=True, help="output directory (new or empty unless --resume)")
    p.add_argument("--videos", type=int, default=0, help="write MP4s of the first N episodes")
    p.add_argument("--image-size", type=int, default=64, help="agentview RGB size (64..224)")
    p.add_argument("--wrist", action="store_true",
                   help="add the eye-in-hand view beside agentview (on by itself for a checkpoint trained with it)")
    p.add_argument("--horizon", type=int, default=0, help="max steps per episode (0 = task default)")
    p.add_argument("--oracle-version", type=int, choices=VERSIONS, default=None,
                   help="scripted oracle revision for demos, corrections and labels (default: the current, 2)")
    p.add_argument("--no-corrector", action="store_true", help="let the policy act alone (c=1 everywhere)")
    p.add_argument("--resume", action="store_true", help="keep episodes already in OUT, run the missing ones")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPU share of each actor for a checkpoint policy, run in bf16 (e.g. 0.25); 0 = CPU")
    p.add_argument("--envs-per-worker", type=int, default=CollectConfig.envs_per_worker,
                   help="envs each actor steps while a checkpoint policy's actions come from the batched "
                        "inference service (inference.* in --config)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    add_config_args(p, ("corrector", "inference"))
    add_recipe_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.cli import load_config, usage_error
    from apo_ray.config import recipe
    from apo_ray.rollout import RolloutSpec, RunOptions, collect

    fsio.refuse_source_tree(args.out, "--out")
    if not 64 <= args.image_size <= 224:
        raise usage_error(f"--image-size {args.image_size} out of range", "use 64..224")
    if args.no_corrector and (args.config or args.overrides):
        raise usage_error("--no-corrector conflicts with --config (which configures the corrector)",
                          "drop one of them, or set corrector.enabled=false in the config")
    cfg = load_config(args, "collect")
    corrector = None if args.no_corrector else cfg.corrector
    spec = RolloutSpec(args.task, args.scenario, args.policy, args.out, round_=args.round_, corrector=corrector,
                       image_size=args.image_size, horizon=args.horizon,
                       wrist=args.wrist or bool(recipe(args.recipe, ("env",)).get("env", {}).get("wrist")),
                       oracle_version=args.oracle_version)
    run = RunOptions(workers=args.workers, envs_per_worker=args.envs_per_worker, gpus=args.gpus_per_worker,
                     inference=cfg.inference, address=args.address, videos=args.videos)
    summary = collect(spec, range(args.seed, args.seed + args.episodes), run, resume=args.resume)
    print(json.dumps(summary))
    return 0
