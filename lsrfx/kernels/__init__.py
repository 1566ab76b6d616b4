"""Custom ops (``torch.library``) and the Triton kernels behind them."""

import contextlib
import logging

from lsrfx.kernels.factor_ops import compose, compose_reference, kron_sum, kron_sum_reference
from lsrfx.kernels.triton_lowrank import HAS_TRITON


@contextlib.contextmanager
def _quiet_without_triton():
    """Without triton installed (e.g. the ``demo`` extra), ``triton_op`` warns once per kernel scan that it finds
    no Triton kernels; the torch-reference branch is what runs then, so the warning only adds noise."""
    logger = logging.getLogger("torch._library.triton")
    level = logger.level
    if not HAS_TRITON:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


with _quiet_without_triton():
    from lsrfx.kernels.lowrank_linear import lowrank_linear
    from lsrfx.kernels.lsr_linear import lsr_linear

__all__ = ["compose", "compose_reference", "kron_sum", "kron_sum_reference", "lowrank_linear", "lsr_linear"]
