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
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, print the stage plan (marking stages the run dir has done) and exit; "
                        "runs nothing and writes nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. loop.rounds=3")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apo_ray import config
    from apo_ray.loop import run_loop

    cfg = config.load(args.config, args.overrides)
    if args.dry_run:
        print_plan(cfg, args.run_dir or cfg.loop.storage)
        return 0
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


def describe(cfg, st) -> str:  # noqa: ANN001 - Config and Stage, imported lazily
    """What one stage does, in a few words."""
    from apo_ray.loop import stage_train_config

    lp = cfg.loop
    if st.kind == "collect" and st.round == 0:
        return f"{lp.demos} expert demos ({lp.demo_policy}) in {st.scenario}"
    if st.kind == "collect":
        who = "pi0" if st.round == 1 else f"{st.arm}'s pi{st.round - 1}"
        return f"deploy {who} with the corrector: {lp.rollouts_per_round} episodes in {st.scenario}"
    if st.kind == "dataset":
        return "BC training set from the demos" if st.round == 0 else \
            f"training set: demos + {st.arm}'s round{' 1' if st.round == 1 else f's 1..{st.round}'} " \
            "deployments, reference log-probs"
    if st.kind == "train":
        tc = stage_train_config(cfg, st)
        init = "from scratch" if st.round == 0 else f"from pi{st.round - 1}"
        budget = f"{tc.max_steps} steps" if tc.max_steps else f"{tc.epochs} epoch{'s' if tc.epochs != 1 else ''}"
        return f"{tc.objective} {init}, {budget}"
    return f"{cfg.eval.episodes} held-out episodes in {st.scenario}, no corrector"


def print_plan(cfg, run_dir: str) -> None:  # noqa: ANN001
    """The stages ``apo-ray loop`` would run, in order; those a local run dir's journal has finished are marked."""
    import os

    from apo_ray.loop import check_config, plan

    check_config(cfg)
    stages = plan(cfg)
    done: set[str] = set()
    journal = os.path.join(run_dir or "", "journal.json")
    if run_dir and "://" not in run_dir and os.path.isfile(journal):
        with open(journal) as f:
            done = set(json.load(f).get("stages", {}))
    width = max(len(s.key) for s in stages)
    print(f"{len(stages)} stages, {len(done & {s.key for s in stages})} done"
          + (f" in {run_dir}" if done else "") + f"; task {cfg.env.task}, arms {', '.join(cfg.loop.arms)}")
    for i, st in enumerate(stages, 1):
        mark = "done" if st.key in done else "    "
        print(f"{i:3d} {mark} {st.key:<{width}}  {describe(cfg, st)}")
