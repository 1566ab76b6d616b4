"""Small helpers several layers share: one definition each (unwrapping a compiled model, an error's first line,
quieting a logger for the length of a block). Atomic writes live in :mod:`lsrfx.atomic_files`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

# Wrappers whose ``.module`` is the user's model: ``nn.DataParallel`` and ``DistributedDataParallel``.
PARALLEL_WRAPPERS = ("DataParallel", "DistributedDataParallel")


def is_parallel_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is ``nn.DataParallel`` or ``DistributedDataParallel`` (or a subclass)."""
    return any(cls.__name__ in PARALLEL_WRAPPERS and cls.__module__.startswith("torch.nn.parallel")
               for cls in type(model).__mro__)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's ``nn.Module`` behind ``torch.compile``'s ``OptimizedModule`` and ``DataParallel`` /
    ``DistributedDataParallel`` wrappers (or the module itself), so that names never carry a ``module.`` prefix."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif is_parallel_wrapper(model):
            model = model.module
        else:
            return model


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if empty), cut to ``limit`` characters."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
