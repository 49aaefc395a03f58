"""Print §16's confirmatory table from runs/confirm/<arm>/<scenario>/ (see scripts/confirm_lift.sh).

The decision rule (FINDINGS §16) uses the Newcombe interval, which treats the two cells as independent. Both are
scored on the same seeds, so the paired count (which seeds only one of them solves) and its exact McNemar p-value
are printed beside it as a supplement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from apo_ray.rollout import EPISODES_DIR, read_episode_stats
from apo_ray.stats import mcnemar_exact_p, newcombe_interval


def per_seed(eval_dir: Path) -> dict[int, bool]:
    """Seed -> success, read the way the evaluation counted it."""
    stats = (read_episode_stats(f) for f in sorted((eval_dir / EPISODES_DIR).glob("*.parquet")))
    return {s.seed: s.success for s in stats}


def main(root: Path, arm: str = "apo_floor_r3", others: tuple[str, ...] = ("dagger_r3", "pi0")) -> None:
    res = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text())
           for p in sorted(root.glob("*/*/eval.json"))}
    print("| policy | scenario | seeds | success % [Wilson 95%] |\n|---|---|---|---|")
    for (name, sc), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lo, hi = r["ci95"]  # the evaluation's own Wilson interval
        print(f"| {name} | {sc} | {r['seeds'][0]}–{r['seeds'][1]} | {r['successes']}/{r['episodes']} = "
              f"{100 * r['success_rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}] |")
    print("\n| difference | scenario | points [Newcombe 95%] | common seeds | only A | only B | McNemar p |\n"
          "|---|---|---|---|---|---|---|")
    for sc in sorted({sc for _, sc in res}):
        a = res.get((arm, sc))
        for other in others:
            b = res.get((other, sc))
            if not (a and b):
                continue
            lo, hi = newcombe_interval(a["successes"], a["episodes"], b["successes"], b["episodes"])
            sa, sb = per_seed(root / arm / sc), per_seed(root / other / sc)
            common = sorted(set(sa) & set(sb))
            only_a = sum(sa[s] and not sb[s] for s in common)
            only_b = sum(sb[s] and not sa[s] for s in common)
            print(f"| {arm} − {other} | {sc} | {100 * (a['success_rate'] - b['success_rate']):+.1f} "
                  f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {len(common)} | {only_a} | {only_b} | "
                  f"{mcnemar_exact_p(only_a, only_b):.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/confirm"))
