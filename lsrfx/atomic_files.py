"""All-or-nothing writes of files and whole directories, and consistent reads of directories being replaced.

Adapter directories, fine-tuning outputs and multi-file ONNX exports are read by other processes (a server hot-swapping
adapters, a user copying a run) while they may be rewritten. Writing one file after another is not enough: a
``kill -9`` between two renames leaves new tensors beside an old config, and a reader between them sees a set that
never existed. So:

* :func:`atomic_write` writes one file under a temporary name and renames it into place.
* :func:`publish_directory` fills a hidden sibling directory, then makes it the target in one step: a plain rename
  when the target does not exist, else Linux's ``renameat2(RENAME_EXCHANGE)`` (the old directory then sits under the
  sibling's name and is deleted). Where the exchange is unavailable it renames the old directory away first and the
  next publish or read restores it if it was killed in between. Savers of the same target take an exclusive lock on
  the parent directory (``flock``), so two of them cannot interleave.
* :func:`read_directory` reads files relative to one open directory handle, so the files come from one version of
  the directory; when a file vanishes because the directory was replaced meanwhile it reads again.
* Temporary siblings are named ``.<target>.tmp-<pid>-<token>``: the next write of the same target removes the
  ones whose process is gone (:func:`remove_stale`), so a killed run leaves no litter for long.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class NotARegularFile(OSError):
    """:func:`read_directory` refused a file that is not a regular file (a device, a FIFO, a directory)."""


class FileTooLarge(OSError):
    """:func:`read_directory` refused a file larger than the caller's limit."""
STAGE_TAG, OLD_TAG = "tmp", "old"
READ_ATTEMPTS = 5


def sibling_name(target: Path, tag: str) -> Path:
    """A fresh hidden sibling of ``target``: ``.<name>.<tag>-<pid>-<token>``."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_pid(path: Path, target: Path) -> int | None:
    """The process id encoded in a sibling's name, or ``None`` if ``path`` is not a sibling of ``target``."""
    for tag in (STAGE_TAG, OLD_TAG):
        prefix = f".{target.name}.{tag}-"
        if path.name.startswith(prefix):
            pid = path.name[len(prefix):].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(target: Path) -> None:
    """Remove ``target``'s temporary siblings left by processes that no longer run; first restore an old directory
    that a killed :func:`publish_directory` had renamed away before it could put the new one in place."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        pid = _owner_pid(path, target)
        if pid is None or _alive(pid):
            continue
        if path.name.startswith(f".{target.name}.{OLD_TAG}-") and not os.path.lexists(target):
            os.replace(path, target)  # the previous good version: put it back
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` for the block (no lock where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; publishing is still atomic per rename
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def fsync_tree(path: Path) -> None:
    """Flush the files of ``path`` (a file or directory, not recursive beyond one level) and the directory."""
    paths = [path] if path.is_file() else [*(p for p in path.iterdir() if p.is_file()), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some filesystems refuse fsync on directories
            pass
        finally:
            os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place: readers never see
    a half-written file, and a failed write leaves ``target`` as it was."""
    target = Path(target)
    tmp = sibling_name(target, STAGE_TAG)
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); ``False`` where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_directory(stage: Path, target: Path) -> None:
    """Make the filled directory ``stage`` the directory ``target`` in one step and delete the previous one."""
    if not os.path.lexists(target):
        os.replace(stage, target)
        return
    if not target.is_dir() or target.is_symlink():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    if _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # it holds the previous version now
        return
    old = sibling_name(target, OLD_TAG)
    os.replace(target, old)
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def publish_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; when the block succeeds its contents become ``target``
    in one step (see the module docstring), flushed to disk first. On any exception (Ctrl-C included) the staging
    directory is removed and ``target`` is left as it was. Concurrent publishers of the same target run one after
    another."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = sibling_name(target, STAGE_TAG)
    with locked(target.parent):
        remove_stale(target)
        stage.mkdir()
        try:
            yield stage
            fsync_tree(stage)
            replace_directory(stage, target)
            fsync_tree(target.parent)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def read_directory(directory: str | os.PathLike, read: Callable[[Callable[..., bytes]], T]) -> T:
    """``read(read_file)``, where ``read_file(name, limit=None)`` returns the bytes of ``directory/name``, every file
    taken from the same version of the directory (one open handle). ``read_file`` refuses what is not a regular
    file (:class:`NotARegularFile`: a symlink to ``/dev/zero`` is never read) and files over ``limit`` bytes
    (:class:`FileTooLarge`). When a file disappears because the directory was replaced during the read, read again
    (up to a few times); other errors propagate."""
    directory = Path(directory)
    if not os.path.lexists(directory):
        remove_stale(directory.absolute())  # a killed fallback publish may have left the good version renamed away
    for attempt in range(READ_ATTEMPTS):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            try:
                return read(_file_reader(fd))
            except FileNotFoundError:
                if attempt == READ_ATTEMPTS - 1 or _same_directory(fd, directory):
                    raise
        finally:
            os.close(fd)
    raise AssertionError("unreachable")


def _file_reader(fd: int) -> Callable[..., bytes]:
    """``read_file(name, limit=None)``: the bytes of the regular file ``name`` in the directory open as ``fd``."""
    def read_file(name: str, limit: int | None = None) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
        with open(name, "rb", opener=lambda p, _flags: os.open(p, flags, dir_fd=fd)) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(errno.EINVAL, "not a regular file", name)
            if limit is not None and info.st_size > limit:
                raise FileTooLarge(errno.EFBIG, f"{info.st_size:,} bytes, more than the {limit:,} expected", name)
            return f.read()
    return read_file


def _same_directory(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the directory open as ``fd``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    then = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (then.st_ino, then.st_dev)
