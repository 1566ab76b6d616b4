"""``lsrfx::lowrank_linear``: the adapted linear ``x @ W.T + bias + scale * (x @ A.T) @ B.T`` as one op.

What the FX pass puts in place of ``linear(x, compose(W0, A, B, s))`` so ``dW`` is never materialised. It is a
``torch.library.triton_op``: on CUDA the body launches the fused Triton kernel through ``wrap_triton`` (Inductor
sees and schedules it), elsewhere the body is the torch reference, which Inductor compiles like any torch code.
The backward (``register_autograd``) runs two more ops of the same kind: the input gradient with the adapter term
fused (``grad @ W + s * (grad @ B) @ A``), and the ``A``/``B`` gradients, which reuse ``grad @ B``.
``W`` is ``(N, K)``, or ``(K, N)`` when ``transposed`` (GPT-2 ``Conv1D``); ``x`` may have any leading dims.
"""


import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from lsrfx.kernels import reference as ref
from lsrfx.kernels import triton_lowrank as tk
from lsrfx.kernels.dispatch import use_triton


def out_shape(x: Tensor, w: Tensor, transposed: bool) -> list:
    return [*x.shape[:-1], w.shape[0 if not transposed else 1]]


@triton_op("lsrfx::lowrank_linear", mutates_args=())
def lowrank_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> Tensor:
    """Fused adapted linear; see the module docstring."""
    if use_triton(x):
        return tk.lowrank_forward(x, w, bias, a, b, scale, transposed, wrap_triton)
    return ref.lowrank_linear_ref(x, w, bias, a, b, scale, transposed)


@lowrank_linear.register_fake
def _(x, w, bias, a, b, scale, transposed):
    return x.new_empty(out_shape(x, w, transposed))


@triton_op("lsrfx::lowrank_linear_grad_input", mutates_args=())
def lowrank_linear_grad_input(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(grad @ W + scale * u @ A, u)`` with ``u = grad @ B`` flattened to ``(tokens, r)``, fused on CUDA."""
    if use_triton(grad):
        return tk.grad_input(grad, w, a, b, scale, transposed, wrap_triton)
    gx, u = ref.grad_input_ref(grad, w, a, b, scale, transposed)
    return gx, u.reshape(-1, u.shape[-1])


@lowrank_linear_grad_input.register_fake
def _(grad, w, a, b, scale, transposed):
    k = w.shape[1 if not transposed else 0]
    tokens = grad.numel() // grad.shape[-1]
    return grad.new_empty([*grad.shape[:-1], k]), b.new_empty([tokens, b.shape[1]])


@triton_op("lsrfx::lowrank_linear_grad_factors", mutates_args=())
def lowrank_linear_grad_factors(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(grad_A, grad_B)`` = ``(scale * u.T @ x, scale * grad.T @ (x @ A.T))`` summed over all tokens."""
    if use_triton(x):
        return tk.grad_factors(grad, x, a, b, u, scale, wrap_triton)
    return ref.grad_factors_ref(grad, x, a, b, u, scale)


@lowrank_linear_grad_factors.register_fake
def _(grad, x, a, b, u, scale):
    return torch.empty_like(a), torch.empty_like(b)


def linear_grads(ctx, grad: Tensor, x: Tensor, w: Tensor, a: Tensor, b: Tensor) -> tuple:
    """``(grad_x, grad_w, grad_bias, grad_a, grad_b)`` of the fused linear, each ``None`` where not needed.

    ``ctx.needs`` flags (x, w, bias, a, b), ``ctx.scale``, ``ctx.transposed``."""
    need_x, need_w, need_bias, need_a, need_b = ctx.needs
    grad_x = u = grad_w = grad_bias = grad_a = grad_b = None
    if need_x:
        grad_x, u = torch.ops.lsrfx.lowrank_linear_grad_input(grad, w, a, b, ctx.scale, ctx.transposed)
    if need_a or need_b:
        grad_a, grad_b = torch.ops.lsrfx.lowrank_linear_grad_factors(grad, x, a, b, u, ctx.scale)
    if need_w:
        grad_w = ref.grad_weight_ref(grad, x, ctx.transposed).to(w.dtype)
    if need_bias:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_bias, (grad_a if need_a else None), (grad_b if need_b else None)


def _setup(ctx, inputs, output) -> None:
    x, w, bias, a, b, scale, transposed = inputs
    ctx.save_for_backward(x, w, a, b)
    ctx.scale, ctx.transposed = scale, transposed
    ctx.needs = tuple(ctx.needs_input_grad[:5])


def _backward(ctx, grad: Tensor):
    x, w, a, b = ctx.saved_tensors
    grad_x, grad_w, grad_bias, grad_a, grad_b = linear_grads(ctx, grad, x, w, a, b)
    return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


lowrank_linear.register_autograd(_backward, setup_context=_setup)
