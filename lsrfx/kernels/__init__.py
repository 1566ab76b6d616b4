"""Custom ops (``torch.library``) and the Triton kernels behind them."""

from lsrfx.kernels.factor_ops import compose, compose_reference, kron_sum, kron_sum_reference
from lsrfx.kernels.lowrank_linear import lowrank_linear
from lsrfx.kernels.lsr_linear import lsr_linear

__all__ = ["compose", "compose_reference", "kron_sum", "kron_sum_reference", "lowrank_linear", "lsr_linear"]
