"""Print §16's confirmatory table from runs/confirm/<arm>/<scenario>/eval.json (see scripts/confirm_lift.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from apo_ray.stats import newcombe_interval, wilson_interval


def main(root: Path, arm: str = "apo_floor_r3", others: tuple[str, ...] = ("dagger_r3", "pi0")) -> None:
    res = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text())
           for p in sorted(root.glob("*/*/eval.json"))}
    print("| policy | scenario | seeds | success % [Wilson 95%] |\n|---|---|---|---|")
    for (name, sc), r in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lo, hi = wilson_interval(r["successes"], r["episodes"])
        print(f"| {name} | {sc} | {r['seeds'][0]}–{r['seeds'][1]} | {r['successes']}/{r['episodes']} = "
              f"{100 * r['success_rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}] |")
    print("\n| difference | scenario | points [Newcombe 95%] |\n|---|---|---|")
    for sc in sorted({sc for _, sc in res}):
        a = res.get((arm, sc))
        for other in others:
            b = res.get((other, sc))
            if a and b:
                lo, hi = newcombe_interval(a["successes"], a["episodes"], b["successes"], b["episodes"])
                print(f"| {arm} − {other} | {sc} | {100 * (a['success_rate'] - b['success_rate']):+.1f} "
                      f"[{100 * lo:+.1f}, {100 * hi:+.1f}] |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/confirm"))
