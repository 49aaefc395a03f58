"""The journal runs each stage once, adopts complete outputs, and survives SIGKILL at any moment."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apo_ray.errors import UserError
from apo_ray.journal import STAGE_FILE, WORK, Journal, run_lock, run_stage, work_name
from apo_ray.storage import RunStorage


def _writer(n: int):
    def fn(work: Path) -> dict:
        for i in range(n):
            (work / f"f{i}.txt").write_text(str(i))
        return {"files": n}
    return fn


def test_stage_runs_once_and_is_recorded(tmp_path: Path) -> None:
    calls = []
    j = Journal(tmp_path)

    def fn(work: Path) -> dict:
        calls.append(1)
        return _writer(3)(work)

    assert run_stage(j, "r0/demos/collect", fn) == {"files": 3}
    assert run_stage(j, "r0/demos/collect", fn) == {"files": 3}
    assert len(calls) == 1
    j2 = Journal(tmp_path)  # reread from disk
    assert j2.done("r0/demos/collect") and j2.order == ["r0/demos/collect"]
    assert sorted(p.name for p in (tmp_path / "r0/demos/collect").iterdir()) == [STAGE_FILE, "f0.txt", "f1.txt",
                                                                                 "f2.txt"]


def test_failed_stage_leaves_no_output_and_reruns_clean(tmp_path: Path) -> None:
    j = Journal(tmp_path)

    def broken(work: Path) -> dict:
        (work / "half.txt").write_text("x")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        run_stage(j, "r1/apo/train", broken)
    assert not (tmp_path / "r1/apo/train").exists() and not j.done("r1/apo/train")
    assert run_stage(j, "r1/apo/train", _writer(1)) == {"files": 1}
    assert not (tmp_path / "r1/apo/train/half.txt").exists()  # the killed attempt's file is gone


def test_resumable_stage_keeps_its_work(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    seen = []

    def step(work: Path) -> dict:
        seen.append(sorted(p.name for p in work.iterdir()))
        (work / "ckpt").write_text("step 5")
        if len(seen) == 1:
            raise RuntimeError("preempted")
        return {"ok": True}

    with pytest.raises(RuntimeError):
        run_stage(j, "r1/apo/train", step, resumable=True)
    run_stage(j, "r1/apo/train", step, resumable=True)
    assert seen == [[], ["ckpt"]]


def test_complete_output_without_journal_entry_is_adopted(tmp_path: Path) -> None:
    """A kill between the rename and the journal write: the finished stage is adopted, not rerun."""
    j = Journal(tmp_path)
    run_stage(j, "a", _writer(2))
    (tmp_path / "journal.json").unlink()  # as if killed just before the journal write
    j = Journal(tmp_path)
    assert run_stage(j, "a", lambda w: pytest.fail("must not rerun")) == {"files": 2}
    assert Journal(tmp_path).done("a")


def test_journal_naming_a_missing_output_is_an_error(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    run_stage(j, "a", _writer(1))
    os.rename(tmp_path / "a", tmp_path / "moved")
    with pytest.raises(UserError, match="missing"):
        Journal(tmp_path)


def test_run_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    with run_lock(tmp_path), pytest.raises(UserError, match="another"), run_lock(tmp_path):
        pass


def test_the_lock_holder_sweeps_a_killed_journal_write(tmp_path: Path) -> None:
    """A SIGKILL inside the journal's atomic write leaves its temp file in the run dir's root (CI hit it once
    with 3 xdist workers). A reader leaves it, since a live loop may be mid-write; the next writer sweeps it."""
    run_stage(Journal(tmp_path), "a", _writer(1))
    litter = tmp_path / ".tmp-journal.x1y2z3.json"
    litter.write_text('{"order": [')
    assert Journal(tmp_path).done("a") and litter.exists()
    with run_lock(tmp_path):
        assert not litter.exists() and Journal(tmp_path).done("a") and (tmp_path / "a" / "f0.txt").exists()


WORKLOAD = r"""
import sys, time
from pathlib import Path
from apo_ray.journal import Journal, run_lock, run_stage
run_dir = Path(sys.argv[1])
with run_lock(run_dir):  # as the loop writes: under the run dir's lock
    j = Journal(run_dir)
    for s in range(6):
        def fn(work, s=s):
            for i in range(20):
                (work / f"part-{i}").write_text(f"{s}-{i}" * 100)
                time.sleep(0.01)
            return {"stage": s, "parts": 20}
        run_stage(j, f"r{s // 3}/arm/stage{s % 3}", fn)
"""


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and WORK not in p.parts and p.name not in (".lock", "journal.json")}


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", WORKLOAD, str(ref)], check=True, env=env)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(40):
        p = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(run)], env=env)
        time.sleep(rng.uniform(0.1, 0.9))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        if Journal(run).order and len(Journal(run).order) == 6:
            break
    subprocess.run([sys.executable, "-c", WORKLOAD, str(run)], check=True, env=env)
    assert kills >= 2, "the workload finished before any kill landed; the test proved nothing"
    assert _tree(run) == _tree(ref)
    jr, jk = json.loads((ref / "journal.json").read_text()), json.loads((run / "journal.json").read_text())
    assert jr["order"] == jk["order"]
    assert [jr["stages"][k]["result"] for k in jr["order"]] == [jk["stages"][k]["result"] for k in jk["order"]]


def test_storage_mirrors_a_run_dir_through_a_uri(tmp_path: Path) -> None:
    """The same code path as s3://, on pyarrow's local filesystem via a file:// URI."""
    uri = (tmp_path / "bucket" / "run").as_uri()
    st = RunStorage(uri, local_dir=tmp_path / "work1")
    assert st.remote
    j = Journal(st.local)
    run_stage(j, "r0/demos/collect", _writer(3), on_done=st.push)
    st.push("journal.json")
    assert (tmp_path / "bucket/run/r0/demos/collect/f2.txt").read_text() == "2"
    st2 = RunStorage(uri, local_dir=tmp_path / "work2")  # a fresh node resuming the run
    st2.pull()
    assert Journal(st2.local).done("r0/demos/collect")
    assert (st2.local / "r0/demos/collect/f1.txt").read_text() == "1"
    assert work_name("r1/apo/x") == "r1__apo__x"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    """Atomic writes get the modes a plain open()/mkdir would, not mkstemp's 0600 / mkdtemp's 0700, so a report or
    a checkpoint on a shared filesystem is readable by whom the user's umask allows (in a child process: the umask
    is process-wide)."""
    code = f"""
import os, sys
from pathlib import Path
from apo_ray.fsio import atomic_dir, write_json
os.umask({umask})
out = Path(sys.argv[1])
write_json(out / "a.json", {{"x": 1}})
with atomic_dir(out / "ckpt") as d:
    (d / "w.bin").write_bytes(b"0")
print(oct(os.stat(out / "a.json").st_mode & 0o777), oct(os.stat(out / "ckpt").st_mode & 0o777))
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert r.stdout.split() == [oct(file_mode), oct(dir_mode)]
