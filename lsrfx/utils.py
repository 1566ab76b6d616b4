"""Small helpers several layers share: one definition each (unwrapping a compiled model, an error's first line,
atomic file writes, quieting a logger for the length of a block)."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The ``nn.Module`` behind a ``torch.compile``d ``OptimizedModule`` (or the module itself)."""
    return getattr(model, "_orig_mod", model)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if empty), cut to ``limit`` characters."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def atomic_write(target: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place: readers never see
    a half-written file, and a failed write leaves ``target`` as it was."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR, enabled: bool = True) -> Iterator[None]:
    """Raise logger ``name`` to ``level`` inside the block (when ``enabled``), then restore its level."""
    logger = logging.getLogger(name)
    previous = logger.level
    if enabled:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
