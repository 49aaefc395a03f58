"""apo-ray train: fine-tune (or train from scratch) the VLA with one objective on a built training set."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from apo_ray.cli import add_config_args, add_recipe_arg

if TYPE_CHECKING:
    from apo_ray.config import Config


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the VLA (apo, kto, dagger, sirius, dpo, bc) with Ray Train + DeepSpeed",
                       description="Writes OUT/checkpoint/ (HF format), OUT/metrics.json and TensorBoard events in "
                                   "OUT/tb/; prints the final metrics as JSON on the last stdout line.")
    p.add_argument("--data", required=True, help="training-set dir written by apo-ray dataset")
    p.add_argument("--init", required=True, help="checkpoint dir to start from, or 'scratch'")
    p.add_argument("--objective", choices=("apo", "kto", "dagger", "sirius", "dpo", "bc"),
                   help="training objective (train.objective; default: the config's, apo)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (train.zero_stage)")
    p.add_argument("--epochs", type=int, help="passes over the training set (train.epochs)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    add_config_args(p, ("train", "model"))
    add_recipe_arg(p)
    p.set_defaults(func=run)


def resolved_config(args: argparse.Namespace) -> Config:
    """The flags folded into the overrides (a flag and a differing override of the same key are refused)."""
    from apo_ray.cli import load_config, usage_error

    flags = {"objective": args.objective, "workers": args.workers, "zero_stage": args.zero, "epochs": args.epochs}
    given = {o.split("=", 1)[0].strip(): o.split("=", 1)[1].strip() for o in args.overrides if "=" in o}
    for k, v in flags.items():
        if v is not None and f"train.{k}" in given and given[f"train.{k}"] != str(v):
            flag = "--zero" if k == "zero_stage" else f"--{k}"
            raise usage_error(f"{flag} {v} conflicts with the override train.{k}={given[f'train.{k}']}",
                              "give the value once, either as the flag or as the override")
    return load_config(args, "train", tuple(f"train.{k}={v}" for k, v in flags.items() if v is not None))


def run(args: argparse.Namespace) -> int:
    from apo_ray import fsio
    from apo_ray.cli import usage_error
    from apo_ray.trainer import train

    cfg = resolved_config(args)
    if cfg.train.workers < 1:
        raise usage_error("--workers must be at least 1")
    if cfg.train.epochs < 1 and not cfg.train.max_steps:
        raise usage_error("--epochs must be at least 1 (or set train.max_steps)")
    fsio.refuse_source_tree(args.out, "--out")
    metrics = train(args.data, args.init, args.out, cfg, address=args.address)
    print(json.dumps(metrics))
    return 0
