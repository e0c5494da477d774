"""The run lock: one process at a time writes a run directory.

:func:`run_lock` holds an exclusive OS lock (``flock``) on a directory for as long as a run writes it; the
kernel releases it when the process dies, however it dies, so a killed run never leaves a stale lock. The lock
file records the holder's PID, which :func:`lock_holder` reads for the error message.

Example:
    >>> with run_lock(Path("runs/r50")):
    ...     train()
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputLockedError

__all__ = ["LOCK_FILE", "check_unlocked", "lock_holder", "run_lock"]

#: The lock file :func:`run_lock` creates in a run directory; it holds the PID of the process writing the run.
LOCK_FILE = ".sharetx.lock"

# Lock descriptors this process holds; a forked child (a DataLoader worker) closes its copies, so the lock
# stays the parent's alone and dies with it (an flock belongs to the open file, which a fork shares).
_HELD: set[int] = set()
# Directory (resolved) -> how many nested run_lock blocks of this process hold it: a recipe locks its run
# directory before its first write, and fit, inside, finds the lock already its own.
_DEPTH: dict[Path, int] = {}


def _close_held_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()
    _DEPTH.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def check_unlocked(directory: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputLockedError` naming the holder's PID if a live process holds ``directory``'s lock."""
    pid = lock_holder(directory)
    if pid is not None:
        raise _locked(directory, pid)


def _locked(directory: str | os.PathLike[str], pid: int) -> OutputLockedError:
    return OutputLockedError(
        f"{directory} is in use by another run (PID {pid}); wait for it to end or choose another --output"
    )


def lock_holder(directory: str | os.PathLike[str]) -> int | None:
    """The PID holding :func:`run_lock` on ``directory``, or None when no other live process holds it."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            return None if pid == os.getpid() else pid  # this process's own run_lock
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else -1


@contextmanager
def run_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (which must exist) for the ``with`` block.

    The lock is an ``flock`` on ``directory/.sharetx.lock``, which records the holder's PID. The kernel
    releases it when the process exits or is killed; processes forked inside the block do not keep it. A block
    nested in another of the same process on the same directory holds the lock already and just runs (the lock
    is released when the outermost block ends).

    Raises:
        OutputLockedError: another process holds the lock; the message names its PID.
    """
    key = Path(directory).resolve()
    if _DEPTH.get(key):
        _DEPTH[key] += 1
        try:
            yield
        finally:
            _DEPTH[key] -= 1
        return
    path = Path(directory) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _read_pid(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise _locked(directory, pid) from None
    _HELD.add(fd)
    _DEPTH[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _DEPTH.pop(key, None)
        _HELD.discard(fd)
        os.close(fd)
