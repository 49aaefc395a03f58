"""``report.html`` for a lifelong run: the intervention dashboard.

Everything is read back from the run dir, never from memory, so ``apo-ray report`` on a finished, killed or
half-done run draws the same thing the loop drew:

* ``journal.json`` stage results: evaluation (``r<R>/<arm>/eval/<scenario>``), deployment
  (``r<R>/<arm|shared>/collect/<scenario>``) and dataset (``r<R>/<arm|shared>/dataset``) summaries;
* the trainer's per-step metrics, TensorBoard scalars ``train/<metric>`` in ``r<R>/<arm>/train/tb/``;
* MP4s under ``*/videos/``.

Outputs beside ``report.html``: ``results.md`` (the success table with Wilson 95% CIs, for the README) and
``results.json`` (the same rows, machine-readable). Plots are PNGs (matplotlib Agg) embedded as data URIs, and
a few MP4s are embedded too, so the HTML is one self-contained file that can be copied off a cluster.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apo_ray import fsio
from apo_ray.stats import mcnemar_exact_p, newcombe_interval

KEY_RE = re.compile(r"^r(?P<round>\d+)/(?P<arm>[^/]+)/(?P<stage>collect|dataset|train|eval)(?:/(?P<scenario>.+))?$")
BASE_ARM = "base"
SHARED_ARM = "shared"
TRAIN_METRICS = ("loss", "kl", "sum_lambda_D", "sum_lambda_U", "r_D", "r_U", "kl_at_clamp", "token_acc", "acc_c2")
MAX_VIDEOS = 4


@dataclass
class Run:
    run_dir: Path
    config: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    order: list[str]
    in_flight: str | None = None
    parsed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of(self, stage: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(parsed key, result) for every completed stage of one kind, in journal order."""
        return [(self.parsed[k], self.stages[k]["result"]) for k in self.order
                if k in self.parsed and self.parsed[k]["stage"] == stage]


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    run_dir = Path(run_dir)
    journal = run_dir / "journal.json"
    data = json.loads(journal.read_text()) if journal.exists() else {"stages": {}, "order": []}
    cfg_path = run_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    prog = run_dir / "progress.json"
    in_flight = json.loads(prog.read_text()).get("stage") if prog.exists() else None
    run = Run(run_dir, config, data["stages"], data["order"], in_flight)
    for key in run.order:
        m = KEY_RE.match(key)
        if m:
            d = m.groupdict()
            run.parsed[key] = {**d, "round": int(d["round"]), "key": key}
    return run


# ---------------------------------------------------------------- tables


def success_rows(run: Run) -> list[dict[str, Any]]:
    """One row per (arm, scenario, round). The base policy's round-0 result opens every arm's curve."""
    rows = []
    for k, res in run.of("eval"):
        rows.append({"key": k["key"], "round": k["round"], "arm": k["arm"], "scenario": k["scenario"],
                     "success_rate": float(res["success_rate"]), "ci95": list(res.get("ci95", [math.nan] * 2)),
                     "episodes": int(res["episodes"]), "successes": int(res.get("successes", 0)),
                     "mean_length": res.get("mean_length")})
    return rows


def eval_outcomes(run_dir: Path, key: str) -> dict[int, bool]:
    """Seed -> success of each episode an eval stage wrote (``<key>/episodes/*.parquet``), for paired tests."""
    import pyarrow.parquet as pq

    out: dict[int, bool] = {}
    for f in sorted((run_dir / key / "episodes").glob("*.parquet")):
        if f.name.startswith(fsio.TMP_PREFIX):
            continue
        t = pq.read_table(f, columns=["seed", "success"])
        if t.num_rows:
            out[int(t.column("seed")[0].as_py())] = bool(t.column("success")[0].as_py())
    return out


def intervention_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for k, res in run.of("collect"):
        if k["round"] == 0:
            continue  # expert demos: no corrector
        eps, steps = int(res.get("episodes", 0)), int(res.get("steps", 0))
        rows.append({"round": k["round"], "arm": k["arm"], "scenario": k["scenario"], "episodes": eps,
                     "intervention_episodes": int(res.get("intervention_episodes", 0)),
                     "interventions": int(res.get("interventions", 0)),
                     "intervention_steps": int(res.get("intervention_steps", 0)), "steps": steps,
                     "episode_rate": res.get("intervention_episodes", 0) / eps if eps else math.nan,
                     "step_rate": res.get("intervention_steps", 0) / steps if steps else math.nan,
                     "deploy_success_rate": res.get("success_rate")})
    return rows


def _c_counts(res: dict[str, Any]) -> dict[str, int] | None:
    """c=0/1/2 step counts from a dataset stage's result (``counts.per_class`` of its manifest)."""
    counts = res.get("counts")
    c = counts.get("per_class") if isinstance(counts, dict) else None
    if not isinstance(c, dict):
        return None
    return {str(k): int(v) for k, v in c.items()}


def cmix_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    for k, res in run.of("dataset"):
        c = _c_counts(res)
        if c is not None:
            rows.append({"round": k["round"], "arm": k["arm"], **{f"c{i}": c.get(str(i), 0) for i in range(3)}})
    return rows


def read_tb_scalars(tb_dir: Path) -> list[dict[str, Any]]:
    """The trainer's TensorBoard scalars (``train/<metric>``) as one dict per step, in step order."""
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.*")):
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    by_step: dict[int, dict[str, Any]] = defaultdict(dict)
    for tag in acc.Tags().get("scalars", []):
        name = tag.split("/", 1)[-1]
        for ev in acc.Scalars(tag):
            by_step[int(ev.step)][name] = float(ev.value)
    return [{"step": s, **by_step[s]} for s in sorted(by_step)]


def train_curves(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Per arm: the per-step metrics of all its train stages, steps made cumulative across rounds."""
    curves: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, _res in run.of("train"):
        offset = curves[k["arm"]][-1]["gstep"] if curves[k["arm"]] else 0
        for rec in read_tb_scalars(run.run_dir / k["key"] / "tb"):
            curves[k["arm"]].append({**rec, "gstep": offset + rec["step"], "round": k["round"]})
    return {arm: pts for arm, pts in curves.items() if pts}


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """Success % with 95% CI per arm and scenario (columns = rounds)."""
    if not rows:
        return "_no evaluation finished yet_\n"
    rounds = sorted({r["round"] for r in rows})
    base = {r["scenario"]: r for r in rows if r["arm"] == BASE_ARM}
    arms = sorted({r["arm"] for r in rows if r["arm"] != BASE_ARM})
    cell = {(r["arm"], r["scenario"], r["round"]): r for r in rows}
    lines = ["| arm | scenario | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "|---|---|" + "---|" * len(rounds)]
    for arm in arms or [BASE_ARM]:
        for sc in sorted({r["scenario"] for r in rows}):
            vals = []
            for rd in rounds:
                r = cell.get((arm, sc, rd)) or (base.get(sc) if rd == 0 else None)
                vals.append(_fmt_rate(r) if r else "–")
            lines.append(f"| {arm} | {sc} | " + " | ".join(vals) + " |")
    n = sorted({r["episodes"] for r in rows})
    lines.append("")
    lines.append(f"Success % (Wilson 95% CI), {', '.join(map(str, n))} held-out episodes per cell; "
                 "round 0 is the BC base policy shared by all arms.")
    return "\n".join(lines) + "\n"


def difference_rows(rows: list[dict[str, Any]], outcomes: dict[str, dict[int, bool]] | None = None
                    ) -> list[dict[str, Any]]:
    """Success differences, in the same round and scenario: each arm minus the base policy, and each pair of arms.

    The 95% interval is Newcombe's hybrid score interval. It treats the two cells as independent; for cells scored
    on the same seeds that is conservative whenever their outcomes correlate positively, as they usually do. The
    design is paired (every arm is evaluated on the same seeds), so where ``outcomes`` (eval key -> seed ->
    success) holds both cells, the exact McNemar test on the seeds they share goes beside it: ``discordant`` =
    [seeds only ``arm`` solved, seeds only ``minus`` solved], ``mcnemar_p`` its two-sided p-value.
    """
    outcomes = outcomes or {}
    base = {r["scenario"]: r for r in rows if r["arm"] == BASE_ARM}
    cell = {(r["arm"], r["scenario"], r["round"]): r for r in rows if r["arm"] != BASE_ARM}
    arms = sorted({a for a, _, _ in cell})
    out = []
    for (arm, sc, rd), x in sorted(cell.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        for b in [BASE_ARM, *(o for o in arms if o > arm)]:  # each unordered pair once
            y = base.get(sc) if b == BASE_ARM else cell.get((b, sc, rd))
            if y is None:
                continue
            lo, hi = newcombe_interval(x["successes"], x["episodes"], y["successes"], y["episodes"])
            d = {"scenario": sc, "round": rd, "arm": arm, "minus": b,
                 "difference": x["success_rate"] - y["success_rate"], "ci95": [lo, hi],
                 "paired": 0, "discordant": None, "mcnemar_p": None}
            ox, oy = outcomes.get(x.get("key", "")), outcomes.get(y.get("key", ""))
            if ox and oy and (common := sorted(set(ox) & set(oy))):
                only_a = sum(ox[s] and not oy[s] for s in common)
                only_b = sum(oy[s] and not ox[s] for s in common)
                d.update(paired=len(common), discordant=[only_a, only_b], mcnemar_p=mcnemar_exact_p(only_a, only_b))
            out.append(d)
    return out


def differences_markdown(diffs: list[dict[str, Any]]) -> str:
    """Percentage-point differences (columns = rounds), with the Newcombe 95% interval."""
    if not diffs:
        return ""
    rounds = sorted({d["round"] for d in diffs})
    cell = {(d["arm"], d["minus"], d["scenario"], d["round"]): d for d in diffs}
    lines = ["| difference | scenario | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "|---|---|" + "---|" * len(rounds)]
    for a, b, sc in sorted({(d["arm"], d["minus"], d["scenario"]) for d in diffs}, key=lambda t: (t[2], t[1], t[0])):
        vals = []
        for rd in rounds:
            d = cell.get((a, b, sc, rd))
            vals.append(_fmt_diff(d) + (f" p={d['mcnemar_p']:.2g}" if d and d["mcnemar_p"] is not None else "")
                        if d else "–")
        lines.append(f"| {a} − {b} | {sc} | " + " | ".join(vals) + " |")
    lines += ["", DIFF_NOTE]
    return "\n".join(lines) + "\n"


DIFF_NOTE = ("Success difference in percentage points (Newcombe 95% CI; an interval that excludes 0 separates the "
             "two arms), and p: the exact McNemar test on the seeds both were evaluated on (paired design; the "
             "seeds only one of them solved decide it).")


def _fmt_diff(d: dict[str, Any]) -> str:
    return f"{100 * d['difference']:+.0f} [{100 * d['ci95'][0]:+.0f}, {100 * d['ci95'][1]:+.0f}]"


def results_html(rows: list[dict[str, Any]]) -> str:
    """The success table (results_markdown's cells) as an HTML table."""
    if not rows:
        return "<p><i>no evaluation finished yet</i></p>"
    rounds = sorted({r["round"] for r in rows})
    base = {r["scenario"]: r for r in rows if r["arm"] == BASE_ARM}
    arms = sorted({r["arm"] for r in rows if r["arm"] != BASE_ARM}) or [BASE_ARM]
    cell = {(r["arm"], r["scenario"], r["round"]): r for r in rows}
    head = "<tr><th>arm</th><th>scenario</th>" + "".join(f"<th>round {r}</th>" for r in rounds) + "</tr>"
    body = []
    for arm in arms:
        for sc in sorted({r["scenario"] for r in rows}):
            tds = []
            for rd in rounds:
                r = cell.get((arm, sc, rd)) or (base.get(sc) if rd == 0 else None)
                tds.append(f"<td>{html.escape(_fmt_rate(r)) if r else '–'}</td>")
            body.append(f"<tr><td class='l'>{html.escape(arm)}</td><td class='l'>{html.escape(sc)}</td>"
                        + "".join(tds) + "</tr>")
    n = ", ".join(map(str, sorted({r["episodes"] for r in rows})))
    return (f"<table>{head}{''.join(body)}</table><p class='note'>Success % (Wilson 95% CI), {n} held-out episodes "
            "per cell; round 0 is the BC base policy shared by all arms.</p>")


def differences_html(diffs: list[dict[str, Any]]) -> str:
    """Each pair's difference with its Newcombe interval, and beside it the paired McNemar test."""
    if not diffs:
        return ""
    rounds = sorted({d["round"] for d in diffs})
    cell = {(d["arm"], d["minus"], d["scenario"], d["round"]): d for d in diffs}
    head = ("<tr><th rowspan='2'>difference</th><th rowspan='2'>scenario</th>"
            + "".join(f"<th colspan='2'>round {r}</th>" for r in rounds) + "</tr><tr>"
            + "<th>Δ pp [Newcombe 95% CI]</th><th>McNemar p (discordant)</th>" * len(rounds) + "</tr>")
    body = []
    for a, b, sc in sorted({(d["arm"], d["minus"], d["scenario"]) for d in diffs}, key=lambda t: (t[2], t[1], t[0])):
        tds = []
        for rd in rounds:
            d = cell.get((a, b, sc, rd))
            if d is None:
                tds.append("<td>–</td><td>–</td>")
                continue
            p = "–" if d["mcnemar_p"] is None else \
                f"{d['mcnemar_p']:.2g} ({d['discordant'][0]} vs {d['discordant'][1]} of {d['paired']})"
            tds.append(f"<td>{html.escape(_fmt_diff(d))}</td><td>{html.escape(p)}</td>")
        body.append(f"<tr><td class='l'>{html.escape(a)} − {html.escape(b)}</td><td class='l'>{html.escape(sc)}</td>"
                    + "".join(tds) + "</tr>")
    return f"<table>{head}{''.join(body)}</table><p class='note'>{html.escape(DIFF_NOTE)}</p>"


def _fmt_rate(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['success_rate']:.0f} [{100 * lo:.0f}–{100 * hi:.0f}]"


# ---------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_success(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    plt = _plt()
    scenarios = sorted({r["scenario"] for r in rows})
    base = {r["scenario"]: r for r in rows if r["arm"] == BASE_ARM}
    arms = sorted({r["arm"] for r in rows if r["arm"] != BASE_ARM}) or [BASE_ARM]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.4), squeeze=False)
    for ax, sc in zip(axes[0], scenarios, strict=True):
        for arm in arms:
            pts = sorted([r for r in rows if r["arm"] == arm and r["scenario"] == sc], key=lambda r: r["round"])
            if arm != BASE_ARM and sc in base:
                pts = [base[sc], *pts]
            if not pts:
                continue
            x = [p["round"] for p in pts]
            y = [100 * p["success_rate"] for p in pts]
            err = [[100 * (p["success_rate"] - p["ci95"][0]) for p in pts],
                   [100 * (p["ci95"][1] - p["success_rate"]) for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        ax.set_title(sc)
        ax.set_xlabel("round")
        ax.set_ylabel("success % (95% CI)")
        ax.set_ylim(-3, 103)
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def plot_interventions(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    series = sorted({(r["arm"], r["scenario"]) for r in rows})
    for arm, sc in series:
        pts = sorted([r for r in rows if r["arm"] == arm and r["scenario"] == sc], key=lambda r: r["round"])
        x = [p["round"] for p in pts]
        axes[0].plot(x, [100 * p["episode_rate"] for p in pts], marker="o", label=f"{arm} / {sc}")
        axes[1].plot(x, [100 * p["step_rate"] for p in pts], marker="o", label=f"{arm} / {sc}")
    axes[0].set_ylabel("% episodes with an intervention")
    axes[1].set_ylabel("% steps under the corrector")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_cmix(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.2))
    labels = [f"r{r['round']}\n{r['arm']}" for r in rows]
    bottom = [0] * len(rows)
    names = {0: "c=0 undesirable", 1: "c=1 policy", 2: "c=2 corrector"}
    for c in range(3):
        vals = [r[f"c{c}"] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=names[c])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("training steps")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_train(curves: dict[str, list[dict[str, Any]]]) -> str | None:
    metrics = [m for m in TRAIN_METRICS if any(m in rec for pts in curves.values() for rec in pts)]
    if not metrics:
        return None
    plt = _plt()
    cols = min(3, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.9 * rows_n), squeeze=False)
    for ax, m in zip([a for row in axes for a in row], metrics, strict=False):
        for arm, pts in sorted(curves.items()):
            xs = [p["gstep"] for p in pts if _finite(p.get(m))]
            ys = [p[m] for p in pts if _finite(p.get(m))]
            if xs:
                ax.plot(xs, ys, lw=1, label=arm)
        for arm_pts in curves.values():  # round boundaries
            for a, b in zip(arm_pts, arm_pts[1:], strict=False):
                if b["round"] != a["round"]:
                    ax.axvline(a["gstep"], color="grey", lw=0.5, ls=":")
        ax.set_title(m)
        ax.set_xlabel("optimizer step (cumulative)")
        ax.grid(alpha=0.3)
    for ax in [a for row in axes for a in row][len(metrics):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=8)
    return _png(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def pick_videos(run: Run, limit: int = MAX_VIDEOS) -> list[Path]:
    """Latest round first: deployment clips (corrector border visible), then evaluation clips."""
    found = sorted(run.run_dir.glob("r*/*/*/*/videos/*.mp4")) + sorted(run.run_dir.glob("r*/*/*/videos/*.mp4"))
    found = [p for p in found if ".work" not in p.parts]
    found.sort(key=lambda p: (-int(p.relative_to(run.run_dir).parts[0][1:]), "eval" in p.parts, str(p)))
    return found[:limit]


# ---------------------------------------------------------------- html


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "<p><i>no data yet</i></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.3f}" if math.isfinite(v) else "–"
            elif isinstance(v, list):
                v = "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
            cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f"<p><i>no {html.escape(alt)} yet</i></p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.html``, ``results.md`` and ``results.json`` into ``run_dir/report/``; return the HTML path."""
    run = load_run(run_dir)
    succ, inter, cmix = success_rows(run), intervention_rows(run), cmix_rows(run)
    curves = train_curves(run)
    videos = pick_videos(run)
    out = run.run_dir / "report"
    diffs = difference_rows(succ, {r["key"]: eval_outcomes(run.run_dir, r["key"]) for r in succ})
    md = results_markdown(succ)
    dmd = differences_markdown(diffs)
    fsio.write_bytes(out / "results.md", (md + ("\n" + dmd if dmd else "")).encode())
    fsio.write_json(out / "results.json", {"success": succ, "differences": diffs, "interventions": inter,
                                           "cmix": cmix})

    loop = run.config.get("loop", {})
    env = run.config.get("env", {})
    last_train = {}
    for arm, pts in curves.items():
        if pts:
            last_train[arm] = {m: pts[-1][m] for m in TRAIN_METRICS if _finite(pts[-1].get(m))}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>apo_ray report</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px} table{border-collapse:collapse;"
        "margin:.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:right}"
        " img{max-width:100%} video{width:256px;margin:4px;image-rendering:pixelated} code{background:#eee}"
        " th{background:#f3f3f3} td.l{text-align:left} p.note{font-size:12px;color:#555}",
        "</style></head><body>",
        f"<h1>apo_ray lifelong run: {html.escape(env.get('task', '?'))}</h1>",
        f"<p>run dir <code>{html.escape(str(run.run_dir))}</code>; {len(run.order)} stages complete"
        + (f"; in flight: <code>{html.escape(run.in_flight)}</code>" if run.in_flight else "")
        + f"; arms {html.escape(', '.join(loop.get('arms', [])))}; disruption scenarios "
          f"{html.escape(', '.join(loop.get('scenarios', [])))}; original scenario "
          f"{html.escape(env.get('scenario', '?'))}.</p>",
        "<h2>Success per round (held-out seeds, no corrector)</h2>", _img(plot_success(succ), "success curves"),
        results_html(succ),
        *(["<h3>Differences between arms</h3>", differences_html(diffs)] if diffs else []),
        "<h2>Interventions during deployment</h2>", _img(plot_interventions(inter), "intervention plot"),
        _table(inter, ["round", "arm", "scenario", "episodes", "intervention_episodes", "interventions",
                       "intervention_steps", "steps", "episode_rate", "step_rate", "deploy_success_rate"]),
        "<h2>c-mix of each training set</h2>", _img(plot_cmix(cmix), "c-mix plot"),
        _table(cmix, ["round", "arm", "c0", "c1", "c2"]),
        "<h2>Training curves</h2>", _img(plot_train(curves), "training curves"),
        _table([{"arm": a, **m} for a, m in sorted(last_train.items())],
               ["arm", *[m for m in TRAIN_METRICS if any(m in v for v in last_train.values())]]),
        "<h2>Episodes</h2>",
    ]
    if videos:
        for v in videos:
            rel = v.relative_to(run.run_dir)
            b64 = base64.b64encode(v.read_bytes()).decode()
            parts.append(f"<figure style='display:inline-block'><video controls loop muted "
                         f"src='data:video/mp4;base64,{b64}'></video><figcaption>{html.escape(str(rel))}"
                         f"</figcaption></figure>")
    else:
        parts.append("<p><i>no videos recorded (set eval.videos / collect.videos)</i></p>")
    parts.append("</body></html>")
    path = out / "report.html"
    fsio.write_bytes(path, "\n".join(parts).encode())
    return path
