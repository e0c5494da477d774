"""File-system safety shared by every writer of the package: atomic replacement of a file.

:func:`atomic_write` writes beside the destination under one temporary name derived from it
(:func:`temp_path`), so a write killed half-way leaves a file the next write to the same destination removes;
readers see the old file or the complete new one, never a partial one. It never replaces what is not a regular
file (a device, a FIFO, a directory, a symlink, even a dangling one).

Example:
    >>> atomic_write(Path("out.txt"), lambda tmp: Path(tmp).write_text("done"))
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import OutputExistsError

__all__ = ["TMP_SUFFIX", "atomic_write", "check_writable", "temp_path"]

#: Suffix of the temporary file a write goes through (``.NAME.sharetx-tmp`` beside ``NAME``).
TMP_SUFFIX = ".sharetx-tmp"


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
