"""Kill `apo-ray loop` at random moments in every stage kind and prove the resumed run equals an uninterrupted one.

``python -m apo_ray.bench.chaos --config configs/smoke.yaml --kills 20`` (``make chaos``):

1. runs the loop once uninterrupted (the reference), under ``ROOT/ref``;
2. runs it again under ``ROOT/chaos``, SIGKILLing the whole process group (driver, embedded Ray, rollout
   actors, train workers: a preempted node) ``--kills`` times. Kill *i* targets stage kind
   ``KINDS[i % 5]``: it waits until ``progress.json`` shows that kind in flight, then a random fraction of
   the reference's time for that stage. After each kill it checks the run dir's invariants, and the next
   start must come back without an error;
3. lets the last start finish and compares stages, episode files, dataset inputs and manifests, and
   evaluation results with the reference.

It prints ``kills survived / kills tried: S/T`` and exits non-zero unless every kill was survived and the
final run equals the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from apo_ray.journal import JOURNAL, PROGRESS, STAGE_FILE, WORK, Journal
from apo_ray.schema import column_to_numpy, read_table

KINDS = ("collect", "dataset", "train", "eval", "report")


# ------------------------------------------------------------------------------- run-dir fingerprints
def structure(run_dir: Path) -> dict[str, Any]:
    """What a kill must never change: the stages, and exactly one complete file per planned episode."""
    j = json.loads((run_dir / JOURNAL).read_text())
    episodes: dict[str, int] = {}
    for f in sorted(run_dir.rglob("episodes/*.parquet")):
        if WORK in f.relative_to(run_dir).parts:
            continue
        if f.name.startswith(".tmp-"):
            raise AssertionError(f"{f}: a temp file inside a completed stage")
        t = pq.read_table(f, columns=["episode_id", "t"])
        ids = set(t.column("episode_id").to_pylist())
        if ids != {f.stem}:
            raise AssertionError(f"{f}: holds steps of {ids}")
        if t.column("t").to_pylist() != list(range(t.num_rows)):
            raise AssertionError(f"{f}: steps missing or repeated")
        episodes[str(f.relative_to(run_dir))] = t.num_rows
    datasets = {}
    for key in j["order"]:
        if key.endswith("/dataset"):
            m = json.loads((run_dir / key / "manifest.json").read_text())
            datasets[key] = sorted(str(Path(i["path"]).relative_to(run_dir.resolve())) for i in m["inputs"])
    evals = {k: j["stages"][k]["result"]["episodes"] for k in j["order"] if "/eval/" in k}
    return {"order": j["order"], "episodes": sorted(episodes), "dataset_inputs": datasets, "eval_episodes": evals}


def content(run_dir: Path) -> dict[str, Any]:
    """Episode actions/labels, dataset shard hashes and evaluation results: equal only if every stage is
    deterministic per seed (the simulator, Ray Data's order, CPU training)."""
    j = json.loads((run_dir / JOURNAL).read_text())
    out: dict[str, Any] = {}
    for f in sorted(run_dir.rglob("episodes/*.parquet")):
        if WORK in f.relative_to(run_dir).parts:
            continue
        t = read_table(f, columns=["action", "c"])
        h = hashlib.sha256()
        for name in ("action", "c"):
            h.update(np.ascontiguousarray(column_to_numpy(t.column(name))).tobytes())
        out[str(f.relative_to(run_dir))] = h.hexdigest()
    for key in j["order"]:
        if key.endswith("/dataset"):
            m = json.loads((run_dir / key / "manifest.json").read_text())
            out[f"{key}/shards"] = [s["sha256"] for s in m["shards"]]
    out["eval"] = {k: j["stages"][k]["result"]["success_rate"] for k in j["order"] if "/eval/" in k}
    return out


def check_invariants(run_dir: Path) -> None:
    """After a kill: the journal loads, names only complete stage dirs, and no completed dir holds a temp file."""
    if not (run_dir / JOURNAL).exists():
        return
    j = Journal(run_dir)  # raises if it is unreadable or names a missing dir
    for key in j.order:
        d = run_dir / key
        if not (d / STAGE_FILE).is_file():
            raise AssertionError(f"journal names {key} but {STAGE_FILE} is missing")
        stray = [p for p in d.rglob(".tmp-*")]
        if stray:
            raise AssertionError(f"completed stage {key} holds a temp file {stray[0]}")


# ------------------------------------------------------------------------------------------- driver
def _loop_cmd(config: str, run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "apo_ray", "loop", "--config", config, "--run-dir", str(run_dir), "--no-progress",
            *overrides]


def _progress(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return {}


def _in_flight(run_dir: Path, pid: int) -> tuple[str | None, str | None]:
    """(kind, stage key) that process ``pid`` is running now; a killed process's stale entry does not count."""
    p = _progress(run_dir)
    if p.get("pid") != pid or not p.get("stage"):
        return None, None
    return p.get("kind"), p["stage"]


def _kind(key: str) -> str:
    return key.split("/")[2] if key.count("/") >= 2 else key


def _last_line(err_path: Path, proc: subprocess.Popen) -> str:
    lines = err_path.read_text().strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def _ahead(ref_order: list[str], run_dir: Path) -> set[str]:
    """The stage kinds still to run in ``run_dir`` (report always is: the loop writes one after every round)."""
    done = set(json.loads((run_dir / JOURNAL).read_text())["order"]) if (run_dir / JOURNAL).exists() else set()
    return {_kind(k) for k in ref_order if k not in done} | {"report"}


def _target(want: str, ref_order: list[str], run_dir: Path) -> str:
    """``want`` if a stage of that kind is still ahead, else the next kind still ahead."""
    ahead = _ahead(ref_order, run_dir)
    if want in ahead:
        return want
    i = KINDS.index(want)
    return next(k for k in KINDS[i + 1:] + KINDS[:i] if k in ahead)


def _stage_seconds(ref: Path) -> dict[str, float]:
    """The reference's seconds per stage key (report: a nominal 2 s)."""
    j = json.loads((ref / JOURNAL).read_text())
    return {"report": 2.0, **{key: float(st["seconds"]) for key, st in j["stages"].items()}}


def _pace(run_dir: Path, ref_secs: dict[str, float]) -> float:
    """How long this run's finished stages took against the reference's (1.0 before any): a box busier or
    quieter than during the reference would otherwise put most kill points past the end of their stage."""
    if not (run_dir / JOURNAL).exists():
        return 1.0
    stages = json.loads((run_dir / JOURNAL).read_text())["stages"]
    pairs = [(float(st["seconds"]), ref_secs[k]) for k, st in stages.items() if st.get("seconds") and k in ref_secs]
    ran, ref = sum(a for a, _ in pairs), sum(b for _, b in pairs)
    return min(5.0, max(0.2, ran / ref)) if ref > 0 else 1.0


def _wait_for_kill_point(run: Path, proc: subprocess.Popen, kind: str, ref_order: list[str],
                         secs: dict[str, float], rng: random.Random) -> None:
    """Return at a random moment inside a stage of ``kind`` (or when ``proc`` exits). The moment is a fraction
    of the reference's time for that stage, scaled by this run's pace; if the stage ends first, the next stage
    of the kind is the target, and once none is ahead the kill lands wherever the run is."""
    seen: object = object()  # the journal only grows when the in-flight stage changes: re-read it only then
    ahead: set[str] = set()
    while proc.poll() is None:
        k, key = _in_flight(run, proc.pid)
        if k != kind:
            if key != seen:
                seen, ahead = key, _ahead(ref_order, run)
            if kind not in ahead:
                return
            time.sleep(0.05)
            continue
        deadline = time.monotonic() + rng.uniform(0.0, 0.9) * secs.get(key, 5.0) * _pace(run, secs)
        while proc.poll() is None and time.monotonic() < deadline and _in_flight(run, proc.pid)[1] == key:
            time.sleep(0.05)
        if proc.poll() is not None or _in_flight(run, proc.pid)[1] == key:
            return


def run_chaos(config: str, root: Path, kills: int, seed: int, overrides: list[str], log=print) -> dict[str, Any]:
    rng = random.Random(seed)
    ref, run = root / "ref", root / "chaos"
    if not _progress(ref).get("finished"):
        log(f"reference run -> {ref}")
        r = subprocess.run(_loop_cmd(config, ref, overrides), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: the reference run failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    secs = _stage_seconds(ref)
    ref_order = json.loads((ref / JOURNAL).read_text())["order"]
    tried = survived = 0
    starts = 0
    kill_log: list[dict[str, Any]] = []
    while True:
        starts += 1
        err_path = root / f"start-{starts:02d}.stderr"  # a file, not a pipe: a full pipe would stall the loop
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(_loop_cmd(config, run, overrides), stdout=subprocess.DEVNULL, stderr=err_file,
                                    start_new_session=True)

        if tried >= kills:
            if proc.wait() != 0:
                raise SystemExit(f"error: the final resume failed: {_last_line(err_path, proc)} ({err_path})")
            break
        kind = _target(KINDS[tried % len(KINDS)], ref_order, run)
        _wait_for_kill_point(run, proc, kind, ref_order, secs, rng)
        if proc.poll() is not None:  # finished (or failed) before the kill point
            if proc.returncode != 0:
                raise SystemExit(f"error: a resumed run failed after {tried} kills: {_last_line(err_path, proc)} ({err_path})")
            if tried == 0:
                raise SystemExit("error: the run finished before the first kill; nothing was tested")
            log(f"run finished before kill {tried + 1} (no {kind} stage left); stopping at {tried} kills")
            break
        at = _in_flight(run, proc.pid)[1] or "between stages"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        tried += 1
        try:
            check_invariants(run)
            ok = True
        except Exception as e:  # noqa: BLE001 - any broken invariant is a kill not survived
            ok, at = False, f"{at}: {e}"
        survived += ok
        kill_log.append({"kill": tried, "target": kind, "in_flight": at, "on_target": _kind(at) == kind, "ok": ok})
        log(f"kill {tried}/{kills} (aimed at {kind}): SIGKILL during {at} -> {'ok' if ok else 'BROKEN'}")
    same_structure = structure(run) == structure(ref)
    same_content = content(run) == content(ref)
    if not same_structure:
        survived = 0  # a lost or duplicated episode/stage: the kills were not survived
    result = {"kills_tried": tried, "kills_survived": survived, "kills_on_target": sum(k["on_target"] for k in kill_log),
              "starts": starts, "same_structure": same_structure, "same_content": same_content, "kills": kill_log}
    (root / "chaos.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apo_ray.bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--root", default="runs/chaos", help="holds ref/ and chaos/ (chaos/ is wiped first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    a = p.parse_args(argv)
    root = Path(a.root)
    import shutil

    shutil.rmtree(root / "chaos", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    r = run_chaos(a.config, root, a.kills, a.seed, a.overrides, log=lambda m: print(m, flush=True))
    print(f"final run equals the uninterrupted one: stages/episodes/datasets "
          f"{'yes' if r['same_structure'] else 'NO'}, contents and eval results {'yes' if r['same_content'] else 'no'}")
    print(f"kills landed in the stage kind they aimed at: {r['kills_on_target']}/{r['kills_tried']}")
    print(f"kills survived / kills tried: {r['kills_survived']}/{r['kills_tried']}")
    return 0 if r["kills_survived"] == r["kills_tried"] and r["same_structure"] and r["same_content"] else 1


if __name__ == "__main__":
    sys.exit(main())
