"""The run journal: which stages of a lifelong run are complete, written so that SIGKILL loses and duplicates nothing.

A stage ``key`` (e.g. ``r1/apo/collect/position``) owns one output directory ``run_dir/<key>``. It runs as:

1. work in ``run_dir/.work/<key with / -> __>`` (wiped first unless the stage is resumable, e.g. training that
   continues from its own checkpoints);
2. write the stage's result into the work dir as ``_stage.json``;
3. ``rename`` the work dir onto ``run_dir/<key>`` (atomic on POSIX, then the parent dir is fsynced);
4. record ``key`` in ``journal.json`` (atomic replace).

A kill before (3) leaves only the work dir: the stage reruns. A kill between (3) and (4) leaves a complete
output dir with its ``_stage.json``: the journal adopts it without rerunning. So the journal never names an
incomplete output, and no stage's outputs ever appear twice. ``journal.json`` holds only keys whose dirs exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from apo_ray import fsio
from apo_ray.errors import UserError

JOURNAL = "journal.json"
PROGRESS = "progress.json"
STAGE_FILE = "_stage.json"
WORK = ".work"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def work_name(key: str) -> str:
    return key.replace("/", "__")


class Journal:
    """``journal.json``: ``{"version", "stages": {key: {"result", "seconds", "finished"}}, "order": [key, ...]}``."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / JOURNAL
        self.stages: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.stages, self.order = dict(data["stages"]), list(data["order"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"journal is unreadable ({type(e).__name__})", str(self.path),
                                "restore it from storage or start a new run dir") from None
            missing = [k for k in self.order if not (self.run_dir / k).is_dir()]
            if missing:
                raise UserError(f"journal names stage output that is missing: {missing[0]}", str(self.path),
                                "restore the run dir from storage or start a new run dir")

    def done(self, key: str) -> bool:
        return key in self.stages

    def result(self, key: str) -> dict[str, Any]:
        return self.stages[key]["result"]

    def record(self, key: str, result: dict[str, Any], seconds: float) -> None:
        self.stages[key] = {"result": result, "seconds": round(seconds, 3), "finished": time.time()}
        if key not in self.order:
            self.order.append(key)
        self._write()

    def adopt(self, other: Journal, keys: list[str]) -> None:
        """Take ``other``'s entries for ``keys`` unchanged (a fork: their stage dirs were linked in first)."""
        for key in keys:
            self.stages[key] = other.stages[key]
            if key not in self.order:
                self.order.append(key)
        self._write()

    def _write(self) -> None:
        fsio.write_json(self.path, {"version": VERSION, "stages": self.stages, "order": self.order})

    def last(self) -> str | None:
        return self.order[-1] if self.order else None


def set_progress(run_dir: Path, key: str | None, **info: Any) -> None:
    """The stage in flight (for ``apo-ray status``); ``key=None`` marks the run idle/finished."""
    fsio.write_json(run_dir / PROGRESS, {"stage": key, "pid": os.getpid(), "since": time.time(), **info})


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run dir: a second ``apo-ray loop`` on the same dir fails at once instead of racing. The
    holder is the only writer, so temp files in the run dir's root (a journal or progress write cut by a kill)
    are litter and go; readers (``status``, ``fork --from``) never take the lock, so never sweep."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "w")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("another apo-ray loop is running on this run dir", str(run_dir),
                            "wait for it to finish, or stop it first") from None
        fsio.sweep_tmp(run_dir)
        yield
    finally:
        f.close()


def run_stage(journal: Journal, key: str, fn: Callable[[Path], dict[str, Any]], *,
              resumable: bool = False, on_done: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``fn(work_dir) -> result`` once for ``key`` and return its result (from the journal if already done).

    ``resumable`` keeps a killed stage's work dir so ``fn`` can continue from what it left (its own
    checkpoints); otherwise the work dir is wiped and the stage starts clean. ``on_done(key)`` runs after the
    journal records the stage (e.g. to upload it).
    """
    if journal.done(key):
        return journal.result(key)
    final = journal.run_dir / key
    t0 = time.monotonic()
    if not (final / STAGE_FILE).is_file():
        if final.exists():  # cannot happen through this function; refuse to guess what it is
            raise UserError(f"stage output {key} exists but was never completed", str(final),
                            "delete that directory and rerun")
        work = journal.run_dir / WORK / work_name(key)
        if work.exists() and not resumable:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        result = fn(work)
        fsio.write_json(work / STAGE_FILE, {"key": key, "result": result})
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, final)
        _fsync_dir(final.parent)
    else:
        result = json.loads((final / STAGE_FILE).read_text())["result"]
    journal.record(key, result, time.monotonic() - t0)
    if on_done is not None:
        on_done(key)
    return result
