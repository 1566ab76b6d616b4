"""All-or-nothing output directories: a run writes into a hidden sibling directory that is renamed into place only
when everything succeeded, and removed on any error or Ctrl-C, so no half-written files are ever left behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lsrfx.finetune.errors import FinetuneError


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``; refuse a parent that is not a directory."""
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
    """Yield a fresh temporary directory next to ``out``; on success it replaces ``out`` atomically."""
    check_out_dir(out, overwrite)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
        os.replace(out, old / out.name)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
