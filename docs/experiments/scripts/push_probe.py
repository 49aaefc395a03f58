"""Where does APO's undesirable push land? (docs/FINDINGS.md §14)

Scores one round's checkpoint and the one before it on distinct states of one kind from that round's dataset.
It prints the change of the mean per-token log-prob of each state's own action tokens. Tokens are split by
whether the round's relabelled (c=0) steps use the same action bin in that dimension ("pushed" bins).

    python docs/experiments/scripts/push_probe.py runs/plw_uw5 2 apo --states c1 --n 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from apo_ray.loop import SHARED, train_key
from apo_ray.model import reference_logp_fn
from apo_ray.schema import column_to_numpy, read_table

KINDS = ("expert", "c0", "c1", "c2")
COLS = ("image", "proprio", "instruction", "action_tokens", "c", "is_expert", "episode_id", "t")


def load_rows(dataset: Path) -> dict:
    shards = sorted((dataset / "shards").glob("*.parquet"))
    if not shards:
        raise SystemExit(f"push_probe: no Parquet shards under {dataset}/shards; pass a run dir whose round has a dataset")
    parts: dict[str, list] = {k: [] for k in COLS}
    for s in shards:
        t = read_table(s, columns=list(COLS))
        for k in COLS:
            if k in ("instruction", "episode_id"):  # each row is one micro-batch of samples
                parts[k] += [str(x) for row in t.column(k).to_pylist() for x in row]
            else:
                a = column_to_numpy(t.column(k))
                parts[k].append(a.reshape(-1, *a.shape[2:]))
    return {k: v if k in ("instruction", "episode_id") else np.concatenate(v) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("round", type=int, help="round r >= 1: compares π(r-1) with π(r)")
    ap.add_argument("arm", help="the arm whose round r checkpoint and dataset to read, e.g. apo")
    ap.add_argument("--states", choices=KINDS, default="c1", help="which states to score (default c1)")
    ap.add_argument("--n", type=int, default=256, help="distinct states to sample (default 256)")
    a = ap.parse_args()
    if a.round < 1:
        raise SystemExit("push_probe: round must be >= 1 (round 0 has no previous policy)")
    own = a.run_dir / f"r{a.round}/{a.arm}/dataset"
    dataset = own if own.is_dir() else a.run_dir / f"r{a.round}/{SHARED}/dataset"  # loop.share_round1
    prev, cur = (a.run_dir / train_key(r, a.arm) / "checkpoint" for r in (a.round - 1, a.round))
    for ck in (prev, cur):
        if not ck.is_dir():
            raise SystemExit(f"push_probe: no checkpoint at {ck}; has that round's training finished?")

    d = load_rows(dataset)
    tok, c, ex = d["action_tokens"], d["c"].astype(int), d["is_expert"].astype(bool)
    pushed = np.zeros((7, int(tok.max()) + 1), bool)
    for j in range(7):
        pushed[j, np.unique(tok[c == 0, j])] = True
    select = {"expert": ex, "c0": c == 0, "c1": (c == 1) & ~ex, "c2": c == 2}[a.states]
    # balanced batches repeat rows: keep the first row of each (episode, step)
    keys = np.array([f"{e}/{t}" for e, t in zip(d["episode_id"], d["t"], strict=True)])
    _, first = np.unique(keys, return_index=True)
    idx = np.intersect1d(first, np.flatnonzero(select))
    idx = np.random.default_rng(0).choice(idx, size=min(a.n, len(idx)), replace=False)

    logp = {}
    for name, ck in (("prev", prev), ("cur", cur)):
        fn, out = reference_logp_fn(ck), []
        for i in range(0, len(idx), 32):
            b = idx[i:i + 32]
            mb = {"image": d["image"][b], "proprio": d["proprio"][b], "instruction": [d["instruction"][k] for k in b]}
            out.append(fn(mb, [tok[b]])[0][:, :7])
        logp[name] = np.concatenate(out)
    delta = logp["cur"] - logp["prev"]
    mask = np.stack([pushed[j, tok[idx, j]] for j in range(7)], axis=1)
    print(f"{a.run_dir} round {a.round} {a.arm}: {len(idx)} {a.states} states; pushed bins per dim {pushed.sum(1).tolist()}")
    for label, m in (("pushed bins", mask), ("other bins", ~mask)):
        if m.any():
            print(f"  {label:11s}: {m.mean():.2f} of tokens, mean dlogp/token {delta[m].mean():+.3f} "
                  f"(before {logp['prev'][m].mean():.2f})")


if __name__ == "__main__":
    main()
