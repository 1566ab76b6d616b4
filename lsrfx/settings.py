"""The environment variables lsrfx reads, each parsed here and only here (read at call time, never on import).

- ``LSRFX_FUSE``: the compile pass's policy for each adapted linear: ``auto`` (the roofline rule in
  :mod:`lsrfx.passes.cost_model`), ``always`` (fuse), ``merged`` (merge where base and factors share a dtype) or
  ``never`` (materialise ``W0 + dW`` as the captured graph does).
- ``LSRFX_KERNEL``: on CUDA, ``auto`` (time the Triton kernel against the torch reference once per shape bucket),
  ``triton`` or ``reference`` (always that body).
- ``LSRFX_LOG``: ``1``/``info`` logs each graph's decisions to the ``lsrfx.compile`` logger, ``2``/``debug`` adds
  the graphs before and after the pass.

A value outside these raises :class:`~lsrfx.errors.LsrfxError` naming the variable and its accepted values.
"""

from __future__ import annotations

import logging
import os

from lsrfx.errors import LsrfxError

FUSE_POLICIES = ("auto", "always", "merged", "never")
KERNEL_MODES = ("auto", "triton", "reference")
LOG_LEVELS = {"1": logging.INFO, "info": logging.INFO, "2": logging.DEBUG, "debug": logging.DEBUG}
VARIABLES: dict[str, tuple[str, ...]] = {  # every variable lsrfx reads -> the values it accepts
    "LSRFX_FUSE": FUSE_POLICIES, "LSRFX_KERNEL": KERNEL_MODES, "LSRFX_LOG": tuple(LOG_LEVELS)}


def _read(name: str, default: str, accepted: tuple[str, ...] | dict[str, int], meaning: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    if value not in accepted:
        raise LsrfxError(f"{name}={value!r} is not {meaning}: set it to one of {', '.join(accepted)}, or unset it.")
    return value


def fuse_policy() -> str:
    """``LSRFX_FUSE`` (default ``auto``)."""
    return _read("LSRFX_FUSE", "auto", FUSE_POLICIES, "a fusion policy")


def kernel_mode() -> str:
    """``LSRFX_KERNEL`` (default ``auto``)."""
    return _read("LSRFX_KERNEL", "auto", KERNEL_MODES, "a kernel choice")


def log_level() -> int | None:
    """``LSRFX_LOG``'s ``logging`` level, ``None`` when unset or empty."""
    if not os.environ.get("LSRFX_LOG", "").strip():
        return None
    return LOG_LEVELS[_read("LSRFX_LOG", "", LOG_LEVELS, "a log level")]
