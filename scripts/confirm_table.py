"""Print §16's confirmatory table from runs/confirm/<arm>/<scenario>/ (see docs/experiments/scripts/confirm_lift.sh), or with
``RUN_DIR ROUND`` the same table for one round of a loop run (apo against the other arms, each arm against π0).

The decision rule (FINDINGS §16) uses the Newcombe interval, which treats the two cells as independent. Both are
scored on the same seeds, so the paired count (which seeds only one of them solves) and its exact McNemar p-value
are printed beside it as a supplement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from apo_ray.report import BASE_ARM, load_run
from apo_ray.rollout import EPISODES_DIR, read_episode_stats
from apo_ray.stats import mcnemar_exact_p, newcombe_interval


def per_seed(eval_dir: Path) -> dict[int, bool]:
    """Seed -> success, read the way the evaluation counted it."""
    stats = (read_episode_stats(f) for f in sorted((eval_dir / EPISODES_DIR).glob("*.parquet")))
    return {s.seed: s.success for s in stats}


def confirm_cells(root: Path) -> dict[tuple[str, str], Path]:
    """(policy, scenario) -> eval dir of runs/confirm/<policy>/<scenario>/."""
    return {(p.parent.parent.name, p.parent.name): p.parent for p in sorted(root.glob("*/*/eval.json"))}


def loop_cells(run: Path, rnd: int) -> dict[tuple[str, str], Path]:
    """(policy, scenario) -> eval dir of a loop run dir's round ``rnd`` per arm, and of π0 as ``pi0``: the
    journal's completed evals, read the way `apo-ray report` reads them."""
    return {("pi0" if k["arm"] == BASE_ARM else k["arm"], k["scenario"]): run / k["key"]
            for k, _ in load_run(run).of("eval") if k["round"] in (0, rnd)}


def main(cells: dict[tuple[str, str], Path], pairs: list[tuple[str, str]]) -> None:
    res = {key: json.loads((d / "eval.json").read_text()) for key, d in cells.items()}
    print("| policy | scenario | seeds | success % [Wilson 95%] |\n|---|---|---|---|")
    for (name, sc), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lo, hi = r["ci95"]  # the evaluation's own Wilson interval
        print(f"| {name} | {sc} | {r['seeds'][0]}–{r['seeds'][1]} | {r['successes']}/{r['episodes']} = "
              f"{100 * r['success_rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}] |")
    print("\n| difference | scenario | points [Newcombe 95%] | common seeds | only A | only B | McNemar p |\n"
          "|---|---|---|---|---|---|---|")
    for sc in sorted({sc for _, sc in res}):
        for arm, other in pairs:
            a, b = res.get((arm, sc)), res.get((other, sc))
            if not (a and b):
                continue
            lo, hi = newcombe_interval(a["successes"], a["episodes"], b["successes"], b["episodes"])
            sa, sb = per_seed(cells[(arm, sc)]), per_seed(cells[(other, sc)])
            common = sorted(set(sa) & set(sb))
            only_a = sum(sa[s] and not sb[s] for s in common)
            only_b = sum(sb[s] and not sa[s] for s in common)
            print(f"| {arm} − {other} | {sc} | {100 * (a['success_rate'] - b['success_rate']):+.1f} "
                  f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {len(common)} | {only_a} | {only_b} | "
                  f"{mcnemar_exact_p(only_a, only_b):.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3:  # RUN_DIR ROUND: a loop run's round against its π0, apo against the other arms
        cells = loop_cells(Path(sys.argv[1]), int(sys.argv[2]))
        arms = sorted({n for n, _ in cells} - {"apo", "pi0"})
        main(cells, [("apo", a) for a in arms] + [(a, "pi0") for a in ["apo", *arms]])
    else:
        main(confirm_cells(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/confirm")),
             [("apo_floor_r3", "dagger_r3"), ("apo_floor_r3", "pi0")])
