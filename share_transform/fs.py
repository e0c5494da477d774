"""File-system safety shared by every writer of the package: atomic replacement of a file, and run locks.

* :func:`atomic_write` writes beside the destination under one temporary name derived from it
  (:func:`temp_path`), so a write killed half-way leaves a file the next write to the same destination
  removes; readers see the old file or the complete new one, never a partial one. It never replaces what
  is not a regular file (a device, a FIFO, a directory, a symlink, even a dangling one).
* :func:`run_lock` holds an exclusive OS lock on a directory for as long as a run writes it; the kernel
  releases it when the process dies, however it dies, so a killed run never leaves a stale lock.

Example:
    >>> atomic_write(Path("out.txt"), lambda tmp: Path(tmp).write_text("done"))
    >>> with run_lock(Path("runs/r50")):
    ...     train()
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, OutputLockedError

__all__ = [
    "LOCK_FILE",
    "TMP_SUFFIX",
    "atomic_write",
    "check_unlocked",
    "check_writable",
    "lock_holder",
    "run_lock",
    "temp_path",
]

#: Suffix of the temporary file a write goes through (``.NAME.sharetx-tmp`` beside ``NAME``).
TMP_SUFFIX = ".sharetx-tmp"
#: The lock file :func:`run_lock` creates in a run directory; it holds the PID of the process writing the run.
LOCK_FILE = ".sharetx.lock"

# Lock descriptors this process holds; a forked child (a DataLoader worker) closes its copies, so the lock
# stays the parent's alone and dies with it (an flock belongs to the open file, which a fork shares).
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path``: ``.NAME.sharetx-tmp`` beside it.

    A name too long for the file system is replaced by a hash of it, so the longest destination name the
    file system accepts still has a temporary file, and it is the same one every time.
    """
    path = Path(path)
    name = f".{path.name}{TMP_SUFFIX}"
    if len(os.fsencode(name)) > _name_max(path.parent):
        name = f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:32]}{TMP_SUFFIX}"
    return path.parent / name


def check_writable(path: str | os.PathLike[str], *, force: bool = True) -> None:
    """Raise unless ``path`` may be written: absent, or a regular file (and ``force`` to replace one).

    Raises:
        OutputExistsError: ``path`` is a symlink (dangling or not), a directory, a device or a FIFO; or it
            exists and ``force`` is false.
    """
    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise OutputExistsError(f"{path} is a symlink; share_transform writes only regular files, remove it first")
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise OutputExistsError(f"{path} is {kind}; share_transform replaces only regular files")
    if not force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on :func:`temp_path` of ``path``, fsync it, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one. If ``write`` raises, the
    temporary file is removed and ``path`` is untouched; if the process is killed, the temporary file is
    removed by the next write to ``path``. An ``OSError`` names ``path``, not the temporary file. The new
    file gets the mode of the file it replaces, or what a plain ``open()`` would give.

    Raises:
        OutputExistsError: ``path`` exists and is not a regular file (see :func:`check_writable`).
        OSError: the directory cannot be written (full disk, no permission), naming ``path``.
    """
    path = Path(path)
    check_writable(path)
    tmp = temp_path(path)
    try:
        tmp.unlink(missing_ok=True)  # left by a killed write to the same destination
        # Writers may recreate the file (safetensors makes it 0600): give it the mode of the file it replaces,
        # or the one a plain open() would.
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
        # O_EXCL | O_NOFOLLOW: the temporary name is predictable, so never write through something planted there.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
        write(str(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename in (str(tmp), os.fsencode(tmp)) or e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temporary file either.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename itself is still atomic
    try:
        os.fsync(dir_fd)  # make the rename durable
    finally:
        os.close(dir_fd)


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
    releases it when the process exits or is killed; processes forked inside the block do not keep it.

    Raises:
        OutputLockedError: another process holds the lock; the message names its PID.
    """
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
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)
