"""apo-ray dataset: episodes (+ expert demos) -> balanced, tokenized APO training set (Ray Data)."""

from __future__ import annotations

import argparse
import json
import re

from apo_ray.cli import add_config_args, add_recipe_arg

OVERRIDE_RE = re.compile(r"^[a-z_]+\.[a-z_]+=")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="filter, relabel, tokenize and balance episodes into a training set",
                       description="Build DIR/shards/*.parquet (one row = one balanced micro-batch) and "
                                   "DIR/manifest.json with Ray Data. Prints a JSON summary as the last stdout "
                                   "line: rows (kept steps), desirable, undesirable, pools, dropped (per filter), "
                                   "shards, rows_per_s (input steps per second). Same inputs + config: skipped.")
    p.add_argument("--episodes", nargs="+", default=[], metavar="DIR",
                   help="episode dirs from apo-ray collect (any mix of rounds)")
    p.add_argument("--demos", nargs="+", default=[], metavar="DIR_OR_HDF5",
                   help="expert demonstrations: episode dirs or robomimic .hdf5 files")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset dir (replaced atomically)")
    p.add_argument("--k", type=int, help="policy steps before each intervention relabelled c=0 (default: config)")
    p.add_argument("--vocab-size", type=int,
                   help="model vocabulary size; action tokens are its last 256 ids (default: the reference "
                        "checkpoint's, else the config's model: the tiny VLA's or model.path's tokenizer)")
    p.add_argument("--ref-checkpoint", metavar="DIR",
                   help="frozen reference checkpoint: adds ref_logp* columns so training needs no reference pass")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    add_config_args(p, ("data", "model"))
    add_recipe_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from apo_ray import fsio
    from apo_ray.checkpoint import token_layout
    from apo_ray.cli import load_config, usage_error
    from apo_ray.data import build_dataset

    fsio.refuse_source_tree(args.out, "--out")
    if not args.episodes and not args.demos:
        raise usage_error("no inputs", "pass --episodes DIR and/or --demos DIR")
    # `--episodes A B data.k=3`: nargs="+" swallows the trailing overrides; a dir is never named like a key=value
    for name in ("episodes", "demos"):
        items = getattr(args, name)
        args.overrides = [*(i for i in items if OVERRIDE_RE.match(i)), *args.overrides]
        setattr(args, name, [i for i in items if not OVERRIDE_RE.match(i)])
    cfg = load_config(args, "dataset")
    data_cfg = cfg.data
    if args.k is not None:
        if args.k < 0:
            raise usage_error(f"--k {args.k} is negative", "pass K >= 0")
        data_cfg = dataclasses.replace(data_cfg, k=args.k)
    layout = token_layout(cfg.model, args.ref_checkpoint)
    if args.vocab_size:
        layout["vocab_size"] = args.vocab_size
    summary = build_dataset(args.episodes, args.demos, args.out, data_cfg, ref_checkpoint=args.ref_checkpoint,
                            **layout, address=args.address)
    keys = ("rows", "desirable", "undesirable", "pools", "dropped", "shards", "rows_per_s")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0
