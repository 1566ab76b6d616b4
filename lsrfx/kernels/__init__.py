"""Custom ops (``torch.library``) and the Triton kernels behind them."""

from lsrfx.kernels.factor_ops import compose, compose_reference, kron_sum, kron_sum_reference

__all__ = ["compose", "compose_reference", "kron_sum", "kron_sum_reference"]
