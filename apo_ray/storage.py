"""Run-dir storage: a local path, or a URI (``s3://``, ``gs://``, ``file://``) through pyarrow filesystems.

Stages always read and write a *local* working copy of the run dir (atomic renames need a POSIX disk).
When the run dir is a URI, :class:`RunStorage` mirrors it: ``pull()`` restores the remote copy into the local
one before a resume, and ``push(rel)`` uploads a finished stage directory, then the journal, so the remote
journal never names an output that is not fully uploaded (an S3 PUT of one object is atomic).
A local run dir is its own working copy and ``push``/``pull`` do nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs

from apo_ray.errors import UserError

CACHE_ENV = "APO_RAY_CACHE"


def is_uri(location: str) -> bool:
    return "://" in location


def _local_cache(uri: str) -> Path:
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "apo_ray" / "runs")
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or "run"
    return base / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


class RunStorage:
    """Where a run lives. ``local`` is always a local directory that the stages use."""

    def __init__(self, location: str | os.PathLike[str], local_dir: str | os.PathLike[str] | None = None) -> None:
        location = str(location)
        if not location:
            raise UserError("no run dir given", "command line", "pass --run-dir DIR or set loop.storage")
        self.location = location
        self.fs: pafs.FileSystem | None = None
        self.root = ""
        if is_uri(location):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
                raise UserError(f"cannot open storage URI {location}: {e}".splitlines()[0], "run dir",
                                "use a local path or an s3://bucket/prefix URI with credentials set") from None
            self.local = Path(local_dir) if local_dir else _local_cache(location)
        else:
            self.local = Path(local_dir or location).resolve()
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # under a file, /proc, a read-only mount: one line, not a traceback
            from apo_ray.fsio import check_writable

            if self.local.exists():
                raise UserError(f"the run dir {self.local} is a file", "--run-dir", "pass a directory") from None
            check_writable(self.local, "--run-dir")  # names the cause where it can
            raise UserError(f"cannot create output {self.local}: {os.strerror(e.errno or 0)}", "--run-dir",
                            "choose a directory you can write to, on a writable filesystem") from None

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def _remote_path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def push(self, rel: str) -> None:
        """Upload ``local/rel`` (a file or a directory tree) to the remote copy."""
        if self.fs is None:
            return
        src = self.local / rel
        if src.is_dir():
            self.fs.create_dir(self._remote_path(rel), recursive=True)
            pafs.copy_files(str(src), self._remote_path(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        else:
            self.fs.create_dir(self._remote_path(rel.rsplit("/", 1)[0] if "/" in rel else ""), recursive=True)
            with open(src, "rb") as f, self.fs.open_output_stream(self._remote_path(rel)) as out:
                out.write(f.read())

    def remote_exists(self, rel: str) -> bool:
        if self.fs is None:
            return (self.local / rel).exists()
        return self.fs.get_file_info(self._remote_path(rel)).type != pafs.FileType.NotFound

    def read_remote(self, rel: str) -> bytes | None:
        if self.fs is None:
            p = self.local / rel
            return p.read_bytes() if p.is_file() else None
        info = self.fs.get_file_info(self._remote_path(rel))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self._remote_path(rel)) as f:
            return f.read()

    def pull(self, rels: list[str] | None = None) -> None:
        """Copy remote entries (all of the run, or the given relative paths) into the local working copy."""
        if self.fs is None:
            return
        for rel in rels if rels is not None else [""]:
            info = self.fs.get_file_info(self._remote_path(rel))
            dest = self.local / rel
            if info.type == pafs.FileType.Directory:
                dest.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self._remote_path(rel), str(dest), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            elif info.type == pafs.FileType.File:
                from apo_ray import fsio

                data = self.read_remote(rel)
                assert data is not None
                fsio.write_bytes(dest, data)

    def __repr__(self) -> str:
        return f"RunStorage({self.location!r}, local={str(self.local)!r})"
