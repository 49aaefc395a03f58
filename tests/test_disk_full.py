"""A really full disk: a size-limited tmpfs mounted as the output dir (needs root, as on this box and CI; skipped
where mounting is not allowed). The run stops with one clear line, finished work stays intact, and the same
command completes once space returns."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from apo_ray.fsio import disk_error
from apo_ray.journal import Journal, run_stage


@pytest.fixture
def tmpfs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _resize(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def _fill(mnt: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_journal_stage_on_a_full_disk_keeps_the_last_good_stage(tmpfs: Path) -> None:
    run = tmpfs / "run"
    j = Journal(run)

    def write(n: int):
        def fn(work: Path) -> dict:
            (work / "blob.bin").write_bytes(os.urandom(n))
            return {"bytes": n}
        return fn

    run_stage(j, "r0/a", write(100_000))
    good = (run / "r0/a/blob.bin").read_bytes()
    with pytest.raises(OSError) as e:
        run_stage(j, "r0/b", write(8_000_000))  # twice the filesystem
    assert e.value.errno == errno.ENOSPC
    assert Journal(run).order == ["r0/a"] and not (run / "r0/b").exists()
    assert (run / "r0/a/blob.bin").read_bytes() == good
    _resize(tmpfs, "32m")
    j = Journal(run)
    assert run_stage(j, "r0/b", write(8_000_000)) == {"bytes": 8_000_000}
    assert Journal(run).order == ["r0/a", "r0/b"] and (run / "r0/a/blob.bin").read_bytes() == good
    # the filesystem turns read-only (a failing disk, a lost mount): same story, and the CLI names it
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        with pytest.raises(OSError) as e:
            run_stage(Journal(run), "r0/c", write(10))
        assert e.value.errno == errno.EROFS and disk_error(RuntimeError("training failed")) is None
        wrapped = RuntimeError("stage failed")
        wrapped.__cause__ = e.value
        assert disk_error(wrapped).startswith("Read-only file system")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert Journal(run).order == ["r0/a", "r0/b"]
    run_stage(Journal(run), "r0/c", write(10))
    assert Journal(run).order == ["r0/a", "r0/b", "r0/c"]


@pytest.mark.ray
def test_collect_on_a_full_disk_stops_cleanly_and_resumes(tmpfs: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "APO_RAY_DEBUG"}
        return subprocess.run([sys.executable, "-m", "apo_ray", "collect", "--task", "lift", "--workers", "1",
                               "--horizon", "60", *args], capture_output=True, text=True, env=env, timeout=600)

    probe = cli("--episodes", "1", "--out", str(tmp_path / "probe"))
    assert probe.returncode == 0, probe.stderr[-2000:]
    size = next((tmp_path / "probe" / "episodes").glob("*.parquet")).stat().st_size
    _resize(tmpfs, "64m")
    filler = _fill(tmpfs, leave=int(size * 1.5))  # room for the first episode, not the second
    out = tmpfs / "eps"
    r = cli("--episodes", "3", "--out", str(out))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 3, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: the output filesystem failed: No space left on device")
    assert "--resume" in lines[0] and "Traceback" not in r.stderr
    kept = sorted((out / "episodes").glob("*.parquet"))
    assert [p.name for p in kept] == ["lift-nominal-r0-s000000.parquet"]  # complete, readable, no temp files
    first = kept[0].read_bytes()
    assert pq.read_table(kept[0]).num_rows > 0 and not list((out / "episodes").glob(".tmp-*"))
    filler.unlink()  # space returns
    r = cli("--episodes", "3", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["episodes"] == 3
    files = sorted(p.name for p in (out / "episodes").glob("*.parquet"))
    assert files == [f"lift-nominal-r0-s00000{i}.parquet" for i in range(3)]
    assert (out / "episodes" / files[0]).read_bytes() == first  # the finished episode was not rewritten


def test_outputs_on_a_read_only_filesystem_fail_in_one_line_before_any_work(tmpfs: Path) -> None:
    _resize(tmpfs, "4m")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "APO_RAY_DEBUG"}
    root = Path(__file__).resolve().parents[1]
    for argv in (["export-hdf5", "--episodes", str(tmpfs), "--out", str(tmpfs / "x.hdf5")],
                 ["loop", "--config", str(root / "configs" / "smoke.yaml"), "--run-dir", str(tmpfs / "run")],
                 ["collect", "--task", "lift", "--out", str(tmpfs / "deeper" / "eps")]):
        r = subprocess.run([sys.executable, "-m", "apo_ray", *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 3, r.stderr[-2000:]
        assert len(lines) == 1 and f"Read-only file system writing {tmpfs}" in lines[0], lines
