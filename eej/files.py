"""Output files that are whole or absent, checked before a long run, and owned by one run at a time.

    check_writable(paths)        every output can be created (folders made), before any work
    write_atomic(path, data)     a temporary file in the same folder, then os.replace: readers never see half a file
    with exclusive(path): ...    a non-blocking lock on PATH's lock file: a second run writing PATH fails at once
    with locked(lock_file): ...  the lock itself (a run directory's lock: eej.train.loop.run_lock)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import Iterator, Sequence


class OutputError(OSError):
    """An output path that can't be written, or that another run is writing."""


def check_writable(paths: Sequence[str], what: str = "output") -> None:
    """Make each path's folder and create (then remove) a file there; OutputError naming the first path that fails,
    a folder given as a file, or a path given twice."""
    seen: set[str] = set()
    for path in paths:
        full = os.path.abspath(path)
        if full in seen:
            raise OutputError(f"{what} {path} is given twice; give each output its own file")
        seen.add(full)
        if os.path.isdir(full):
            raise OutputError(f"{what} {path} is a directory; give a file name")
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=os.path.dirname(full), prefix=f".{os.path.basename(full)}.")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise OutputError(f"{what} {path} can't be written ({e.strerror or e}); choose another path") from None


def write_atomic(path: str, data: str | bytes) -> None:
    """`data` into `path` (its folder made if needed) through a temporary file and os.replace."""
    full = os.path.abspath(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=f".{os.path.basename(full)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from other users
        os.replace(tmp, full)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def lock_path(path: str) -> str:
    """The lock file of output `path`: a hidden `.NAME.lock` beside it (left in place, holding the last holder's
    process id)."""
    full = os.path.abspath(path)
    return os.path.join(os.path.dirname(full), f".{os.path.basename(full)}.lock")


class LockHeld(OutputError):
    """A lock file another process holds (`holder`: its process id, or "unknown")."""

    def __init__(self, lock: str, holder: str):
        super().__init__(f"lock {lock} is held by process {holder}")
        self.lock, self.holder = lock, holder


@contextlib.contextmanager
def locked(lock: str) -> Iterator[None]:
    """Hold the lock file `lock` (flock, non-blocking; it records our process id) for the block; LockHeld if another
    process holds it. The operating system drops the lock when a process dies."""
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise LockHeld(lock, f.read().strip() or "unknown") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


@contextlib.contextmanager
def exclusive(paths: Sequence[str]) -> Iterator[None]:
    """Hold the lock of every path in `paths` (`lock_path`) for the block; OutputError naming the path and the
    holder's process id if another process holds one."""
    with contextlib.ExitStack() as stack:
        for path in paths:
            try:
                stack.enter_context(locked(lock_path(path)))
            except LockHeld as e:
                raise OutputError(f"another run (process {e.holder}) is writing {path} (lock {e.lock}); "
                                  "wait for it to finish or choose another path") from None
        yield
