"""All-or-nothing output directories: a run writes into a hidden sibling of ``--out`` that becomes ``--out`` in one
step only when everything succeeded (:func:`lsrfx.atomic_files.publish_directory`), and is removed on any error,
Ctrl-C or SIGTERM, so no half-written files are ever left behind; the siblings a killed run (``kill -9``) left are
removed by the next run into the same place.

``--out`` is checked before any work: it may not be a directory the run cannot replace (the current directory or
one containing it) or must not delete (the model directory or the data file, or a directory holding them).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lsrfx.atomic_files import publish_directory
from lsrfx.errors import LsrfxError
from lsrfx.finetune.errors import FinetuneError


def _holds(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved: symbolic links and ``..`` followed)."""
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def check_out_dir(out: Path, overwrite: bool, inputs: dict[str, Path] | None = None) -> None:
    """Refuse an ``out`` that is or holds the current directory or one of ``inputs`` (``{"the --model directory":
    path, ...}``), a symbolic link, an existing ``out`` unless ``overwrite``, and a parent that is not a directory."""
    if _holds(out, Path.cwd()):
        raise FinetuneError(f"--out {str(out)!r} is the current directory or contains it; a run replaces --out as "
                            "a whole, which cannot be done to the directory you work in. Choose a new directory, "
                            "e.g. --out lsrfx-out/run1.")
    for what, path in (inputs or {}).items():
        if _holds(out, path):
            raise FinetuneError(f"--out {str(out)!r} is or contains {what} {str(path)!r}, which the run would "
                                "delete when it replaces --out; choose another --out.")
    if out.is_symlink():
        raise FinetuneError(f"output path {str(out)!r} is a symbolic link; pass the directory it points to, or "
                            "another --out.")
    if out.exists() and not overwrite:
        raise FinetuneError(f"output directory {str(out)!r} already exists; pass --overwrite to replace it or "
                            "choose another --out.")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output path {str(out)!r} exists and is not a directory.")
    parent = out.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise FinetuneError(f"cannot create {str(out)!r}: {str(parent)!r} is not a directory.")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``out``; when the block succeeds it becomes ``out`` in one step (the
    previous ``out`` is deleted), else it is removed and ``out`` is left as it was. Errors that name the hidden
    directory are told in terms of ``out``; a failed write (a full disk) is a :class:`FinetuneError` naming it."""
    check_out_dir(out, overwrite)
    stage: Path | None = None
    try:
        with publish_directory(out) as stage:
            yield stage
    except LsrfxError as exc:
        if stage is not None and str(stage) in str(exc):
            exc.args = (str(exc).replace(str(stage), str(out)),)
        raise
    except OSError as exc:
        if not _written_by_run(exc, out, stage):
            raise
        raise write_error(exc, out, stage) from exc


def _written_by_run(exc: OSError, out: Path, stage: Path | None) -> bool:
    """Whether ``exc`` came from writing the output: it names no file (a failed ``write``), or a file in the staging
    directory, or ``out`` itself."""
    if exc.filename is None:
        return True
    path = Path(os.fsdecode(exc.filename)).absolute()
    return path == out.absolute() or (stage is not None and _inside(path, stage))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def write_error(exc: OSError, out: Path, stage: Path | None) -> FinetuneError:
    """The one-line error for a failed write of the output: names ``out`` (and the file, under ``out``'s name, when
    known), says whether the disk is full, and that nothing was written."""
    where = ""
    if exc.filename is not None and stage is not None:
        path = Path(os.fsdecode(exc.filename)).absolute()
        if _inside(path, stage) and path != stage:
            where = f" (writing {str(out / path.relative_to(stage))!r})"
    full = " (the disk is full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    kept = " and the existing one is unchanged" if out.exists() else ""
    return FinetuneError(f"cannot write the output directory {str(out)!r}{where}: {exc.strerror or exc}{full}; "
                         f"nothing was written{kept}. Free space there or choose another --out.")
