"""report.html from a synthetic run dir: every section is drawn from the files, and the numbers match them."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.tensorboard import SummaryWriter

from apo_ray.journal import Journal
from apo_ray.report import load_run, results_markdown, success_rows, train_curves, write_report
from apo_ray.stats import mcnemar_exact_p, newcombe_interval

PNG = b"\x89PNG\r\n\x1a\n"


def _make_run(root: Path, rng: random.Random) -> dict:
    """A 2-round, 2-arm run's journal and files, with random numbers the assertions recompute."""
    j = Journal(root)
    truth: dict = {"eval": {}, "collect": {}, "c": {}}

    def rec(key: str, result: dict) -> None:
        (root / key).mkdir(parents=True, exist_ok=True)
        j.record(key, result, 1.0)

    def ev(key: str, sc: str) -> None:
        n = 20
        k = rng.randint(0, n)
        res = {"success_rate": k / n, "ci95": [max(0, k / n - 0.2), min(1, k / n + 0.2)], "episodes": n,
               "successes": k, "mean_length": 50.0, "scenario": sc}
        truth["eval"][key] = res
        rec(key, res)
        # one episode file per seed (the same held-out seeds in every cell), k of them successes
        seeds = list(range(100_000, 100_000 + n))
        won = set(rng.sample(seeds, k))
        truth.setdefault("outcomes", {})[key] = {s: s in won for s in seeds}
        (root / key / "episodes").mkdir(parents=True)
        for s in seeds:
            steps = rng.randint(1, 4)
            pq.write_table(pa.table({"seed": pa.array([s] * steps, pa.int64()),
                                     "success": pa.array([s in won] * steps, pa.bool_())}),
                           root / key / "episodes" / f"lift-{s}.parquet")

    (root / "config.json").write_text(json.dumps({"env": {"task": "lift", "scenario": "nominal"},
                                                  "loop": {"arms": ["apo", "dagger"], "scenarios": ["position"]}}))
    rec("r0/demos/collect/nominal", {"episodes": 4, "steps": 120, "intervention_episodes": 0})
    rec("r0/base/dataset", {"counts": {"per_class": {"1": 120}}})
    rec("r0/base/train", {"steps": 10})
    for sc in ("position", "nominal"):
        ev(f"r0/base/eval/{sc}", sc)
    for r in (1, 2):
        for arm in ("apo", "dagger"):
            eps, steps = 6, rng.randint(200, 400)
            ie, isteps = rng.randint(1, eps), rng.randint(10, 150)
            key = f"r{r}/{arm}/collect/position"
            res = {"episodes": eps, "steps": steps, "intervention_episodes": ie, "intervention_steps": isteps,
                   "interventions": ie + 1, "success_rate": 1.0}
            truth["collect"][key] = res
            rec(key, res)
            c = {str(i): rng.randint(0, 500) for i in range(3)}
            truth["c"][(r, arm)] = c
            rec(f"r{r}/{arm}/dataset", {"counts": {"per_class": c, "rows": 3}})
            rec(f"r{r}/{arm}/train", {"steps": 5})
            writer = SummaryWriter(str(root / f"r{r}/{arm}/train/tb"))  # what the trainer writes
            for s in range(1, 6):
                for name in ("loss", "kl", "sum_lambda_D", "sum_lambda_U"):
                    v = rng.random() * (-1 if name == "kl" else 1)
                    truth.setdefault("tb", {})[(r, arm, s, name)] = v
                    writer.add_scalar(f"train/{name}", v, s)
            writer.close()
            for sc in ("position", "nominal"):
                ev(f"r{r}/{arm}/eval/{sc}", sc)
    import imageio.v2 as imageio

    (root / "r2/apo/collect/position/videos").mkdir(parents=True)
    imageio.mimwrite(root / "r2/apo/collect/position/videos/ep0.mp4", np.zeros((6, 64, 64, 3), np.uint8),
                     fps=20, macro_block_size=1)
    return truth


def test_report_sections_and_numbers(tmp_path: Path) -> None:
    truth = _make_run(tmp_path, random.Random(7))
    path = write_report(tmp_path)
    text = path.read_text()
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(pngs) == 4, "success, interventions, c-mix and training plots"
    assert all(base64.b64decode(p).startswith(PNG) for p in pngs)
    videos = re.findall(r"data:video/mp4;base64,([A-Za-z0-9+/=]+)", text)
    assert len(videos) == 1 and base64.b64decode(videos[0])[4:8] == b"ftyp"
    # the intervention table holds the journal's numbers
    for key, res in truth["collect"].items():
        r, arm = key.split("/")[:2]
        rate = res["intervention_steps"] / res["steps"]
        assert f"<td>{r[1:]}</td><td>{arm}</td><td>position</td><td>{res['episodes']}</td>" in text
        assert f"<td>{rate:.3f}</td>" in text
    for (r, arm), c in truth["c"].items():
        assert f"<td>{r}</td><td>{arm}</td><td>{c['0']}</td><td>{c['1']}</td><td>{c['2']}</td>" in text
    # results.md: one cell per (arm, scenario, round), round 0 from the base policy
    md = (tmp_path / "report/results.md").read_text()
    base_pos = truth["eval"]["r0/base/eval/position"]
    apo_r2 = truth["eval"]["r2/apo/eval/position"]
    row = next(line for line in md.splitlines() if line.startswith("| apo | position |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert cells[0].startswith(f"{100 * base_pos['success_rate']:.0f} [")
    assert cells[2].startswith(f"{100 * apo_r2['success_rate']:.0f} [")
    data = json.loads((tmp_path / "report/results.json").read_text())
    assert len(data["success"]) == len(truth["eval"])
    # differences: per round and scenario, each arm minus the base and apo minus dagger; sign and pairing checked
    # against the journal (the interval itself is checked against published values in test_stats.py)
    assert len(data["differences"]) == 2 * 2 * 3
    dag_r2 = truth["eval"]["r2/dagger/eval/position"]
    row = next(line for line in md.splitlines() if line.startswith("| apo − dagger | position |"))
    cell = [c.strip() for c in row.strip("|").split("|")][3]  # round 2
    lo, hi = newcombe_interval(apo_r2["successes"], 20, dag_r2["successes"], 20)
    # beside it the paired McNemar test, its discordant seeds counted here from the episode files' outcomes
    oa, ob = truth["outcomes"]["r2/apo/eval/position"], truth["outcomes"]["r2/dagger/eval/position"]
    only_a, only_b = sum(oa[s] and not ob[s] for s in oa), sum(ob[s] and not oa[s] for s in oa)
    p = mcnemar_exact_p(only_a, only_b)
    assert cell == (f"{100 * (apo_r2['success_rate'] - dag_r2['success_rate']):+.0f} [{100 * lo:+.0f}, "
                    f"{100 * hi:+.0f}] p={p:.2g}")
    d = next(d for d in data["differences"] if (d["arm"], d["minus"], d["scenario"], d["round"]) ==
             ("apo", "dagger", "position", 2))
    assert (d["discordant"], d["paired"], d["mcnemar_p"]) == ([only_a, only_b], 20, p)
    assert all(d["paired"] == 20 and d["mcnemar_p"] is not None for d in data["differences"])
    # the report shows both tables as HTML tables, the McNemar column beside Newcombe's
    assert "<pre>" not in text and "<table><tr><th>arm</th><th>scenario</th><th>round 0</th>" in text
    assert "<th>McNemar p (discordant)</th>" in text
    assert f"<td>{p:.2g} ({only_a} vs {only_b} of 20)</td>" in text
    row = next(line for line in md.splitlines() if line.startswith("| dagger − base | nominal |"))
    d = truth["eval"]["r1/dagger/eval/nominal"]["successes"] - truth["eval"]["r0/base/eval/nominal"]["successes"]
    assert [c.strip() for c in row.strip("|").split("|")][2].startswith(f"{100 * d / 20:+.0f} [")


def test_report_on_an_empty_or_partial_run(tmp_path: Path) -> None:
    path = write_report(tmp_path)  # nothing ran yet: no crash, every section says so
    text = path.read_text()
    assert "no success curves yet" in text and "no training curves yet" in text
    assert results_markdown(success_rows(load_run(tmp_path))).startswith("_no evaluation")


def test_training_curves_come_from_the_trainers_tensorboard(tmp_path: Path) -> None:
    truth = _make_run(tmp_path, random.Random(3))
    curves = train_curves(load_run(tmp_path))
    assert sorted(curves) == ["apo", "dagger"]
    for arm, pts in curves.items():
        assert [p["gstep"] for p in pts] == list(range(1, 11))  # round 2 continues after round 1's 5 steps
        for p in pts:
            assert p["kl"] == pytest.approx(truth["tb"][(p["round"], arm, p["step"], "kl")], rel=1e-6)
