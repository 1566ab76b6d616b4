"""Custom ops (``torch.library``), one op per module with its reference, fake and autograd, and the Triton
kernels behind them; :mod:`lsrfx.kernels.factor_table` is the table tying them to the compile pass and the
ONNX export."""

from lsrfx.kernels import condlora_linear  # noqa: F401 - registers lsrfx::condlora_linear
from lsrfx.kernels.compose import compose, compose_reference
from lsrfx.kernels.kron_sum import kron_sum, kron_sum_reference
from lsrfx.kernels.triton_matmul import HAS_TRITON
from lsrfx.utils import quiet_logger

# Without triton installed (e.g. the ``demo`` extra), ``triton_op`` warns once per kernel scan that it finds no
# Triton kernels; the torch-reference branch is what runs then, so the warning only adds noise.
with quiet_logger("torch._library.triton", enabled=not HAS_TRITON):
    from lsrfx.kernels.lowrank_linear import lowrank_linear
    from lsrfx.kernels.lsr_linear import lsr_linear
from lsrfx.kernels import autocast  # noqa: E402 - the rules need the ops above defined
from lsrfx.kernels.merged_linear import merged_linear
from lsrfx.kernels.rbf_bank import rbf_bank
from lsrfx.kernels.stacking import stack_factors, unstack_factors

autocast.register()

__all__ = ["compose", "compose_reference", "kron_sum", "kron_sum_reference", "lowrank_linear", "lsr_linear",
           "merged_linear", "rbf_bank", "stack_factors", "unstack_factors"]
