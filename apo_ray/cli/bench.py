"""apo-ray bench {data,rollout,train}: throughput benchmarks printing one JSON line.

Each benchmark lives in ``apo_ray/bench/<name>.py`` and is imported only when run; its flags are declared
here (so ``--help`` imports nothing heavy) and it runs as ``bench_<name>(args) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput benchmarks (data, rollout, train)",
                       description="Run one benchmark; prints its JSON result as the last stdout line.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    d = bsub.add_parser("data", help="dataset pipeline rows/s vs raw pyarrow read->write of the same files")
    d.add_argument("--episodes", metavar="DIR", help="episode dir to use (default: synthesize episodes)")
    d.add_argument("--n-episodes", type=int, default=100, help="synthesized episodes")
    d.add_argument("--steps", type=int, default=60, help="steps per synthesized episode")
    d.add_argument("--image-size", type=int, default=64, help="synthesized image size")
    d.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is reported")
    d.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    d.set_defaults(func=run, bench_module="apo_ray.bench.data", bench_fn="bench_data")

    r = bsub.add_parser("rollout", help="collection steps/s (1 and 2 actors; 1 actor with the tiny VLA) vs the raw robosuite step rate")
    r.add_argument("--task", default="lift", help="task name (see `apo-ray tasks`)")
    r.add_argument("--image-size", type=int, default=64, help="agentview RGB size")
    r.add_argument("--episodes-per-worker", type=int, default=8, help="episodes each actor runs")
    r.add_argument("--horizon", type=int, default=100, help="steps per episode (a random policy never ends early)")
    r.set_defaults(func=run, bench_module="apo_ray.bench.rollout", bench_fn="bench_rollout")

    t = bsub.add_parser("train", help="APO step: cached vs live reference, and ours vs the paper's step")
    t.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch (the paper's 8)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    t.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    t.add_argument("--hidden", type=int, default=128, help="tiny VLA width (model.hidden_size)")
    t.add_argument("--layers", type=int, default=4, help="tiny VLA layers (model.num_layers)")
    t.add_argument("--image-size", type=int, default=64, help="synthesized image size")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    t.add_argument("--lora-r", type=int, default=0,
                   help="wrap the policy in rank-R LoRA adapters (frozen base), as model.kind hf trains; 0 = full")
    t.add_argument("--variants", default="cached,live,paper", help="comma-separated variants to time")
    t.set_defaults(func=run, bench_module="apo_ray.bench.train", bench_fn="bench_train")


def run(args: argparse.Namespace) -> int:
    from apo_ray.cli import usage_error

    try:
        mod = importlib.import_module(args.bench_module)
    except ModuleNotFoundError as e:
        if e.name != args.bench_module:
            raise
        raise usage_error(f"benchmark '{args.bench}' is not built yet ({args.bench_module} missing)") from None
    result = getattr(mod, args.bench_fn)(args)
    print(json.dumps(result))
    return 0
