"""Atomic file writes: everything apo_ray writes goes to a temp name first, then ``os.replace``.

A reader therefore sees either the old file or the complete new one, never half of it,
and a SIGKILL mid-write leaves only a ``.tmp-*`` file that later runs ignore and sweep.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dest.stem + ".", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
