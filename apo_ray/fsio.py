"""Atomic file writes: everything apo_ray writes goes to a temp name first, then ``os.replace``.

A reader therefore sees either the old file or the complete new one, never half of it,
and a SIGKILL mid-write leaves only a ``.tmp-*`` file that later runs ignore and sweep.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"
SOURCE_ROOT = Path(__file__).resolve().parents[1]
"""The checkout (or install prefix) holding apo_ray/ and envs/: outputs never go inside its code dirs."""
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
"""Write failures of the filesystem itself (full, over quota, read-only), not of one path's permissions."""
DISK_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def refuse_source_tree(path: str | os.PathLike[str], where: str) -> None:
    """Check an output path before any work: not inside the package/env sources (outputs there would be imported,
    linted and shipped with them), and creatable: every command's output path comes through here, so a path under
    a file, a virtual or read-only filesystem or a dir without write permission fails in one line, not in a
    traceback after the work."""
    from apo_ray.errors import UserError

    p = Path(path).resolve()
    for src in (SOURCE_ROOT / "apo_ray", SOURCE_ROOT / "envs", SOURCE_ROOT / "jobs", SOURCE_ROOT / "tests"):
        if p == src or src in p.parents:
            raise UserError(f"output dir is inside the source tree ({src.name}/)", where,
                            "write outputs elsewhere, e.g. runs/<name>")
    check_writable(p, where)


def check_writable(path: Path, where: str) -> None:
    """Raise a UserError unless ``path`` (a dir to create or fill, or a file to create or replace) can be written:
    probe its nearest existing ancestor by creating and removing a temp dir there (permission bits alone say
    nothing for root, /proc or a read-only mount)."""
    from apo_ray.errors import UserError

    probe = path if path.is_dir() else path.parent if path.exists() else path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create output {path}: {probe} is a file, not a directory", where,
                        "choose a path whose parent directories are directories")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=TMP_PREFIX + "probe.", dir=probe))
    except OSError as e:
        if e.errno in DISK_ERRNOS:  # full or read-only filesystem: the CLI's exit-3 line, as at any later write
            raise OSError(e.errno, os.strerror(e.errno or 0), str(probe)) from None
        raise UserError(f"cannot create output {path}: {os.strerror(e.errno or 0)} in {probe}", where,
                        "choose a directory you can write to, on a writable filesystem") from None


def disk_error(exc: BaseException) -> str | None:
    """If ``exc`` (or anything it wraps, Ray task errors included) is a full, read-only or unwritable disk,
    a short description of it; else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            where = f" writing {e.filename}" if e.filename else ""
            return f"{os.strerror(e.errno)}{where}"
        text = str(e)
        for msg in DISK_MESSAGES:
            if msg in text:
                return msg
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def _umask() -> int:
    """The process umask, read without setting it: ``os.umask`` has no getter and is process-wide."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dest.stem + ".", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide reports and data from the user's group
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp dir beside ``dest``; swap it in for ``dest`` only if the block succeeds. An old ``dest`` is
    renamed aside first, so a kill between the two renames leaves a swept ``.tmp-*`` dir, never a half one."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + dest.name + ".", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would, not mkdtemp's 0700
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(TMP_PREFIX + dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(dest, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_parquet(dest: str | os.PathLike[str], table: pa.Table) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike[str]) -> str:
    """A checkpoint's identity by content: relative names and file hashes (a single file hashes by its name)."""
    root, h = Path(path), hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if p.is_file():
            h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def sweep_tmp(directory: str | os.PathLike[str]) -> int:
    """Delete temp files left by a killed writer. Returns how many were removed."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    n = 0
    for p in d.glob(TMP_PREFIX + "*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
