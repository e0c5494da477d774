"""File-system safety shared by every writer of the package: atomic replacement of a file, and input paths checked
before anything heavy is imported.

:func:`atomic_write` gives every write its own temporary directory beside the destination,
``.NAME.<pid>-<random>.sharetx-tmp/``, writes the new file inside it, fsyncs it and renames it over ``NAME``.
Readers see the old file or a complete new one, never a partial one, and of two writers to one destination the
last rename wins whole: neither can touch the other's temporary.

A directory rather than a file, because some writers go through a temporary of their own: safetensors'
``save_file`` writes a sibling temporary and renames it over its target. Inside a private directory that one lands
inside ours, so a killed write leaves exactly one thing behind, named after its destination.

A killed writer's directory is removed by the next write to the same destination, once its writer is gone: the
process id in its name is not running and no process holds the ``flock`` every writer keeps on its directory while
it writes (the kernel releases it however the writer dies). A live writer's temporary is never touched.

Example:
    >>> atomic_write(Path("out.txt"), lambda tmp: Path(tmp).write_text("done"))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import FileFormatError, MissingFileError, OutputExistsError

try:
    import fcntl
except ImportError:  # not POSIX: the process id alone tells a dead writer's temporary
    fcntl = None  # type: ignore[assignment]

__all__ = ["TMP_SUFFIX", "atomic_write", "check_writable", "existing_file", "temporaries"]

#: Suffix of the temporary directory a write goes through (``.NAME.<pid>-<random>.sharetx-tmp`` beside ``NAME``).
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


def _stem(path: Path) -> str:
    """The destination's part of its temporaries' names: ``.NAME.``, or a hash of NAME when a temporary named
    after it would not fit the file system (``<pid>-<random>`` and the suffix take at most 40 bytes)."""
    stem = f".{path.name}."
    if len(os.fsencode(stem)) + 40 > _name_max(path.parent):
        stem = f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:32]}."
    return stem


def _pattern(path: Path) -> re.Pattern[str]:
    """The names of ``path``'s temporaries; group 1 is the writer's process id."""
    return re.compile(re.escape(_stem(path)) + r"(\d+)-[^/]+" + re.escape(TMP_SUFFIX))


def temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """The temporary directories of writes to ``path`` that exist now (in progress, or left by a killed writer)."""
    path = Path(path)
    pattern = _pattern(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / name for name in names if pattern.fullmatch(name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_if_abandoned(temporary: Path, pid: int) -> None:
    """Remove a temporary directory whose writer is gone (not running, and not holding its lock)."""
    if _running(pid):
        return  # a live writer, or a dead one whose id was reused: left for a later write
    try:
        fd = os.open(temporary, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # gone already, or not a directory
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a writer on another machine sharing this directory holds it
        shutil.rmtree(temporary, ignore_errors=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A new private directory beside ``path``, locked while the write runs, removed afterwards whatever happens."""
    pattern = _pattern(path)
    for stale in temporaries(path):
        match = pattern.fullmatch(stale.name)
        if match:
            _remove_if_abandoned(stale, int(match.group(1)))
    directory = Path(tempfile.mkdtemp(prefix=f"{_stem(path)}{os.getpid()}-", suffix=TMP_SUFFIX, dir=path.parent))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # ours from birth: the process id in the name covers the instant before
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(fd)


def existing_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path when it names a file that exists (checked before torch is imported, so a typo costs nothing).

    Raises:
        MissingFileError: nothing is there ("no such ``what``").
        FileFormatError: it is a directory or another kind of non-file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such {what}")
    if not path.is_file():
        raise FileFormatError(f"{path}: not a file")
    return path


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
    """Call ``write(tmp)`` with a path in a new private temporary directory beside ``path``, fsync the file it
    wrote, then rename it to ``path``.

    Readers see the old file or the complete new one, never a partial one; of concurrent writers to one
    destination, the last to rename wins, whole. If ``write`` raises (a ``KeyboardInterrupt`` too), the
    temporary directory is removed and ``path`` is untouched; if the process is killed, the directory is
    removed by the next write to ``path`` (see the module docstring). An ``OSError`` names ``path``, not the
    temporary. The new file gets the mode of the file it replaces, or what a plain ``open()`` would give.

    Raises:
        OutputExistsError: ``path`` exists and is not a regular file (see :func:`check_writable`).
        OSError: the directory cannot be written (full disk, no permission), naming ``path``.
    """
    path = Path(path)
    check_writable(path)
    try:
        with _temporary(path) as directory:
            tmp = directory / path.name
            write(str(tmp))
            # Writers may recreate the file (safetensors makes it 0600): give it the mode of the file it replaces,
            # or the one a plain open() would.
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
            os.chmod(tmp, mode, follow_symlinks=False)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OutputExistsError:
        raise
    except OSError as e:
        if e.filename is None or os.fsdecode(e.filename).startswith(str(path.parent / _stem(path))):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
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
