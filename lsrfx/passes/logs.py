"""``LSRFX_LOG``: watch the compile pass in a real run without changing code.

``LSRFX_LOG=1`` (or ``info``) logs, for every graph Inductor compiles, each adapted node's decision (fused,
merged or materialised, and why) and the numbers fused and merged; ``LSRFX_LOG=debug`` (or ``2``) adds the
captured graph before and after the pass. Messages go to the ``lsrfx.compile`` logger (stderr), which can also be
configured with ``logging`` directly. The variable (parsed by :mod:`lsrfx.settings`) is read when the pass is
installed (``lsrfx.passes.install()``, called by ``lsrfx.adapt``), never on import.
"""

from __future__ import annotations

import logging

from lsrfx.settings import log_level

LOGGER = "lsrfx.compile"


def configure_from_env() -> None:
    """Attach a stderr handler to ``lsrfx.compile`` at the level ``LSRFX_LOG`` asks for (no-op when unset)."""
    level = log_level()
    if level is None:
        return
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(getattr(h, "_lsrfx", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler._lsrfx = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
