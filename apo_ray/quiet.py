"""Keep a few known, harmless Ray messages off the user's terminal.

Ray writes some warnings straight to the driver's file descriptors: its C++ core worker to fd 2 (no Python logger
to configure), and the driver's listener for raylet messages to stdout (``ray._private.worker.
listen_error_messages`` prints them as non-error output). Two of them show on every loop run and mean nothing for
it (see ``NOISE``). :func:`drop_noise` routes fds 1 and 2 each through a thread that drops exactly those lines and
forwards everything else unchanged, byte for byte. A terminal fd goes through a pseudo-terminal in raw mode, so
``isatty()`` stays true (progress bars keep working) and no byte is translated. ``APO_RAY_DEBUG=1`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

NOISE = (
    # Ray Data's actor for the reference stage (a map_batches callable class) gets its constructor through the
    # object store, as Ray Data always does; Ray (ray-project/ray#53727) warns about restarts of such actors on
    # every run. A lost constructor argument would fail the stage, which the loop then reruns.
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    # the raylet's note that several Python workers are starting at once (Ray Train's and Ray Data's workers at
    # a stage start): expected here, not a leak
    re.compile(rb"PYTHON worker processes have been started on node"),
)


def is_noise(line: bytes, patterns: tuple[re.Pattern[bytes], ...] = NOISE) -> bool:
    return any(p.search(line) for p in patterns)


def _pump(src: int, dst: int, patterns: tuple[re.Pattern[bytes], ...]) -> None:
    """Copy ``src`` to ``dst`` line by line, dropping lines that match; a partial line (a progress bar's ``\\r``
    update) is written as soon as it arrives unless it could still become a dropped line."""
    buf = b""
    while True:
        try:
            chunk = os.read(src, 65536)
        except OSError:  # a pty reports EIO when its last writer closes
            chunk = b""
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not is_noise(line, patterns))
        if buf and b"\r" in buf:  # a bar redraws in place: pass what is complete up to its last \r
            head, _, buf = buf.rpartition(b"\r")
            out += head + b"\r"
        if out:
            os.write(dst, out)
    if buf and not is_noise(buf, patterns):
        os.write(dst, buf)


@contextlib.contextmanager
def drop_noise(patterns: tuple[re.Pattern[bytes], ...] = NOISE) -> Iterator[None]:
    """Filter fds 1 and 2 (see the module docstring) for the duration of the block. Child processes started inside
    it (an embedded Ray) write through the filters too."""
    if os.environ.get("APO_RAY_DEBUG"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    routes = [_route(fd, patterns) for fd in (1, 2)]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, real, _, _ in routes:  # our fds are the real ones again; children still holding a pipe keep its pump
            os.dup2(real, fd)
        for _, real, read_end, pump in routes:
            pump.join(timeout=1.0)
            if not pump.is_alive():
                os.close(read_end)
                os.close(real)


def _route(fd: int, patterns: tuple[re.Pattern[bytes], ...]) -> tuple[int, int, int, threading.Thread]:
    """Point ``fd`` at a filter thread that writes to a copy of what it was; (fd, copy, read end, thread)."""
    real = os.dup(fd)
    if os.isatty(fd):
        import fcntl
        import pty
        import termios
        import tty

        read_end, write_end = pty.openpty()
        tty.setraw(write_end)  # no \n -> \r\n, no echo: the bytes pass as written
        with contextlib.suppress(OSError):  # the terminal's size, so bars are drawn to its width
            fcntl.ioctl(write_end, termios.TIOCSWINSZ, fcntl.ioctl(real, termios.TIOCGWINSZ, b"\0" * 8))
    else:
        read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, real, patterns), name=f"fd{fd}-filter", daemon=True)
    pump.start()
    return fd, real, read_end, pump
