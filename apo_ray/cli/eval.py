"""apo-ray eval: seeded success rate of a policy acting alone, with a Wilson 95% interval."""

from __future__ import annotations

import argparse
import json

from apo_ray.cli import add_config_args
from apo_ray.config import EvalConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a policy (no corrector) over seeded episodes",
                       description="Roll a policy out with no corrector on seeds S..S+N-1 and print "
                                   '{"success_rate","ci95":[lo,hi],"episodes",...} as the last stdout line.')
    p.add_argument("--policy", required=True, help="checkpoint directory, or oracle | random | noisy-oracle:<p> | dart-oracle:<sigma>")
    p.add_argument("--task", required=True, help="task name (see `apo-ray tasks`)")
    p.add_argument("--scenario", default="nominal", help="scenario or composition, e.g. position+texture")
    p.add_argument("--episodes", type=int, default=50, help="episodes, on seeds --seed .. --seed + N - 1")
    p.add_argument("--workers", type=int, default=2, help="parallel rollout actors")
    p.add_argument("--seed", type=int, default=100_000, help="first evaluation seed (held out from collection)")
    p.add_argument("--videos", type=int, default=0, help="write MP4s of the first N episodes")
    p.add_argument("--image-size", type=int, default=64,
                   help="agentview RGB size (64..224); a checkpoint policy must have been trained on it")
    p.add_argument("--wrist", action="store_true",
                   help="add the eye-in-hand view beside agentview (on by itself for a checkpoint trained with it)")
    p.add_argument("--horizon", type=int, default=0, help="max steps per episode (0 = task default)")
    p.add_argument("--out", required=True, help="output directory: episodes/, eval.json (new or empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="keep episodes already in OUT, run the missing ones")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPU share of each actor for a checkpoint policy, run in bf16 (e.g. 0.25); 0 = CPU")
    p.add_argument("--envs-per-worker", type=int, default=EvalConfig.envs_per_worker,
                   help="envs each actor steps while a checkpoint policy's actions come from the batched "
                        "inference service (inference.* in --config)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    add_config_args(p, ("inference",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.cli import load_config
    from apo_ray.evaluate import eval_seeds, evaluate
    from apo_ray.rollout import RolloutSpec, RunOptions

    fsio.refuse_source_tree(args.out, "--out")
    cfg = load_config(args, "eval")
    spec = RolloutSpec(args.task, args.scenario, args.policy, args.out, image_size=args.image_size,
                       horizon=args.horizon, wrist=args.wrist)
    run = RunOptions(workers=args.workers, envs_per_worker=args.envs_per_worker, gpus=args.gpus_per_worker,
                     inference=cfg.inference, address=args.address, videos=args.videos)
    result = evaluate(spec, eval_seeds(args.seed, args.episodes), run, resume=args.resume)
    print(json.dumps(result))
    return 0
