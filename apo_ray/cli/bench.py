"""apo-ray bench {data,rollout,train}: throughput benchmarks printing one JSON line.

Each benchmark lives in ``apo_ray/bench_<name>.py`` and is imported only when run. ``data`` has its flags here
and runs ``bench_data(args) -> dict``. ``rollout`` and ``train`` get their remaining arguments as
``args.options``: a module with ``add_arguments(parser)`` + ``run(ns)`` has them parsed by its own parser,
otherwise ``bench_<name>(args)`` parses them itself.
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
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is reported")
    d.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    d.set_defaults(func=run, bench_module="apo_ray.bench_data", bench_fn="bench_data")

    for name, what in (("rollout", "env steps/s of parallel rollout actors"),
                       ("train", "training samples/s")):
        s = bsub.add_parser(name, help=what)
        s.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark")
        s.set_defaults(func=run, bench_module=f"apo_ray.bench_{name}", bench_fn=f"bench_{name}")


def run(args: argparse.Namespace) -> int:
    from apo_ray.cli import usage_error

    try:
        mod = importlib.import_module(args.bench_module)
    except ModuleNotFoundError as e:
        if e.name != args.bench_module:
            raise
        raise usage_error(f"benchmark '{args.bench}' is not built yet ({args.bench_module} missing)") from None
    if args.bench != "data" and hasattr(mod, "add_arguments") and hasattr(mod, "run"):
        parser = argparse.ArgumentParser(prog=f"apo-ray bench {args.bench}")
        mod.add_arguments(parser)
        result = mod.run(parser.parse_args([o for o in args.options if o != "--"]))
    else:
        result = getattr(mod, args.bench_fn)(args)
    print(json.dumps(result))
    return 0
