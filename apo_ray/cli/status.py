"""apo-ray status: where a lifelong run is (round, stage) and its latest metrics."""

from __future__ import annotations

import argparse
import json
import os
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the round, stage and last metrics of a loop run",
                       description="Read RUN_DIR's journal (never modifies it) and print progress.")
    p.add_argument("--run-dir", required=True, help="the run dir (or s3:// URI) given to apo-ray loop")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(run_dir: str) -> dict:
    from apo_ray.config import from_dict
    from apo_ray.errors import UserError
    from apo_ray.loop import plan
    from apo_ray.report import load_run, success_rows
    from apo_ray.storage import RunStorage

    st = RunStorage(run_dir)
    if st.remote:
        st.pull(["journal.json", "config.json", "progress.json"])
    if not (st.local / "config.json").exists():
        raise UserError("not an apo_ray loop run dir (no config.json)", run_dir, "pass the --run-dir of apo-ray loop")
    run = load_run(st.local)
    stages = plan(from_dict(run.config))
    done = [s for s in stages if s.key in run.stages]
    prog_path = st.local / "progress.json"
    prog = json.loads(prog_path.read_text()) if prog_path.exists() else {}
    in_flight = prog.get("stage")
    state = "finished" if len(done) == len(stages) else "not started" if not done else "stopped"
    if in_flight and prog.get("pid") and _alive(int(prog["pid"])) and not st.remote:
        state = "running"
    nxt = next((s for s in stages if s.key not in run.stages), None)
    current = in_flight if state == "running" else (nxt.key if nxt else None)
    rows = success_rows(run)
    last_round = max((r["round"] for r in rows), default=None)
    last_eval = [r for r in rows if r["round"] == last_round]
    last_train = None
    for key in reversed(run.order):
        if "/train" in key:
            last_train = {"stage": key, **{k: v for k, v in run.stages[key]["result"].items()
                                           if isinstance(v, int | float)}}
            break
    return {"run_dir": str(st.local), "state": state, "stages_done": len(done), "stages_total": len(stages),
            "round": (nxt.round if nxt else stages[-1].round), "rounds": from_dict(run.config).loop.rounds,
            "stage": current, "stage_since_s": round(time.time() - prog["since"], 1) if state == "running" else None,
            "last_completed": run.order[-1] if run.order else None, "last_eval": last_eval, "last_train": last_train}


def run(args: argparse.Namespace) -> int:
    s = status(args.run_dir)
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"run {s['run_dir']}: {s['state']}, round {s['round']}/{s['rounds']}, "
          f"{s['stages_done']}/{s['stages_total']} stages")
    if s["stage"]:
        since = f" for {s['stage_since_s']:.0f} s" if s["stage_since_s"] is not None else ""
        print(f"  {'running' if s['state'] == 'running' else 'next'}: {s['stage']}{since}")
    if s["last_completed"]:
        print(f"  last completed: {s['last_completed']}")
    for r in s["last_eval"]:
        lo, hi = r["ci95"]
        print(f"  eval r{r['round']} {r['arm']:>7} {r['scenario']:<12} success {100 * r['success_rate']:5.1f}% "
              f"[{100 * lo:.0f}–{100 * hi:.0f}] n={r['episodes']}")
    if s["last_train"]:
        t = s["last_train"]
        print("  train " + t["stage"] + ": " + ", ".join(f"{k} {v:.4g}" if isinstance(v, int | float) else f"{k} {v}"
                                                   for k, v in t.items() if k != "stage"))
    return 0
