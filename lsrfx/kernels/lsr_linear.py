"""``lsrfx::lsr_linear``: the fused adapted linear for LSR-Adapt, taking the Kronecker factors themselves.

``A = sum_s A1[s] (x) A2[s]`` (``r x K``) and ``B = sum_s B1[s] (x) B2[s]`` (``N x r``) are expanded inside the
Triton kernel tile by tile, so the forward reads only the small factors. The backward forms ``A`` and ``B``
(``r x K`` and ``N x r``: tiny, never ``dW``), runs the low-rank backward ops, and chains the ``A``/``B``
gradients to the factors with two small einsums.
"""


from torch import Tensor
from torch.library import triton_op, wrap_triton

from lsrfx.kernels import reference as ref
from lsrfx.kernels import triton_lowrank as tk
from lsrfx.kernels.dispatch import use_triton
from lsrfx.kernels.lowrank_linear import linear_grads, out_shape


@triton_op("lsrfx::lsr_linear", mutates_args=())
def lsr_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float,
    transposed: bool,
) -> Tensor:
    """``x @ W.T + bias + scale * (x @ A.T) @ B.T`` with ``A``, ``B`` given by their Kronecker factors."""
    if use_triton(x):
        return tk.lsr_forward(x, w, bias, a1, a2, b1, b2, scale, transposed, wrap_triton)
    a, b = ref.kron_sum_dense(a1, a2), ref.kron_sum_dense(b1, b2)
    return ref.lowrank_linear_ref(x, w, bias, a, b, scale, transposed)


@lsr_linear.register_fake
def _(x, w, bias, a1, a2, b1, b2, scale, transposed):
    return x.new_empty(out_shape(x, w, transposed))


def _setup(ctx, inputs, output) -> None:
    x, w, bias, a1, a2, b1, b2, scale, transposed = inputs
    ctx.save_for_backward(x, w, a1, a2, b1, b2)
    ctx.scale, ctx.transposed = scale, transposed
    n = ctx.needs_input_grad
    ctx.needs = (n[0], n[1], n[2], n[3] or n[4], n[5] or n[6])
    ctx.factor_needs = tuple(n[3:7])


def _backward(ctx, grad: Tensor):
    x, w, a1, a2, b1, b2 = ctx.saved_tensors
    a, b = ref.kron_sum_dense(a1, a2), ref.kron_sum_dense(b1, b2)
    grad_x, grad_w, grad_bias, grad_a, grad_b = linear_grads(ctx, grad, x, w, a, b)
    ga1 = ga2 = gb1 = gb2 = None
    if grad_a is not None:
        ga1, ga2 = ref.kron_sum_grads(grad_a, a1, a2)
    if grad_b is not None:
        gb1, gb2 = ref.kron_sum_grads(grad_b, b1, b2)
    need = ctx.factor_needs
    factor_grads = [g if n else None for g, n in zip((ga1, ga2, gb1, gb2), need, strict=True)]
    return (grad_x, grad_w, grad_bias, *factor_grads, None, None)


lsr_linear.register_autograd(_backward, setup_context=_setup)
