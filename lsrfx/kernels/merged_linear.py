"""``lsrfx::merged_linear``: the adapted linear through the merged weight, with low-rank factor gradients.

``merged_linear(x, W0, bias, A, B, s, transposed)`` is ``x @ (W0 + s * B @ A).T + bias``: the forward forms
``W' = W0 + s * B @ A`` (one ``addmm``, ``2 N K r`` flops) and runs one plain matmul. Its backward re-forms ``W'``
for the input gradient ``grad @ W'`` and computes the factor gradients from rank-``r`` products, never the dense
weight gradient ``grad.T @ x``:

    u = grad @ B,  grad_A = s * u.T @ x,  v = x @ A.T,  grad_B = s * grad.T @ v.

Against the fused form (:mod:`lsrfx.kernels.lowrank_linear`, whose forward adds ``x @ A.T`` and ``v @ B.T`` beside
the base matmul and whose input gradient adds ``u @ A``) this spends ``2 x 2 N K r`` flops forming ``W'`` to save
two rank-``r`` passes over the tokens (``2 M r (K + N)`` flops and the bytes of ``x`` and the output), so it is the
cheaper one once the tokens outnumber the layer's width (``M > K`` for a square layer), where BLAS runs the
base matmul and the rank-``r`` products as separate calls (the CPU; on CUDA the fused kernel computes ``x @ A.T``
in the base matmul's K-loop). It saves ``x``, ``W0``, ``A``, ``B`` and no ``tokens x r`` activation: ``v`` is
formed in the backward, where it is used, which costs no extra flops (the forward does not need it).

Used only when ``W0`` and the factors share a dtype: adding ``dW`` to a half-precision ``W0`` would round the
update to the base's precision, which the fused form (adapter term in the factors' dtype) avoids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.layout import flat
from lsrfx.kernels.reference import GradsNeeded, base_grads, grad_factors_reference
from lsrfx.kernels.torch_body_op import torch_body_op


def merged_weight(w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> Tensor:
    """``W0 + scale * B @ A`` in ``W0``'s layout as one ``addmm`` (``(K, N)`` storage when ``transposed``)."""
    if transposed:
        return torch.addmm(w, a.t(), b.t(), alpha=scale)
    return torch.addmm(w, b, a, alpha=scale)


def merged_linear_reference(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> Tensor:
    """``x @ (W0 + scale * B @ A).T + bias``."""
    merged = merged_weight(w, a, b, scale, transposed).to(x.dtype)  # formed in the factors' dtype, as compose
    return torch.nn.functional.linear(x, merged.t() if transposed else merged, bias)


def merged_linear_grads(
    grad: Tensor, x: Tensor, w: Tensor, a: Tensor, b: Tensor, *, needs: GradsNeeded, scale: float,
    transposed: bool,
) -> tuple[Tensor | None, ...]:
    """``(grad_x, grad_w, grad_bias, grad_a, grad_b)``, each ``None`` where ``needs`` is false; the factor
    gradients in their factors' layouts (see :mod:`lsrfx.kernels.layout`)."""
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_x = grad_a = grad_b = None
    if need_x:
        # W' re-formed in the other layout, (K, N) when W0 is (N, K): an expression that differs from the forward's,
        # so AOTAutograd's common-subexpression elimination cannot merge the two and save W' (N x K per layer)
        # from the forward for the backward; re-forming costs 2 N K r flops, far less than keeping it.
        other_layout = merged_weight(w.t(), a, b, scale, not transposed)
        merged_nk = other_layout if transposed else other_layout.t()
        grad_x = flat(grad) @ merged_nk.to(grad.dtype)
        grad_x = grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1])
    if need_a or need_b:
        v = flat(x) @ a.t()
        grad_a, grad_b = grad_factors_reference(grad, x, v, a, b, None, scale)
    grad_w, grad_bias = base_grads(grad, x, w, need_w=need_w, need_bias=need_bias, transposed=transposed)
    return grad_x, grad_w, grad_bias, (grad_a if need_a else None), (grad_b if need_b else None)


def _merged_linear(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> Tensor:
    """``x @ (W0 + scale * B @ A).T + bias``; see the module docstring."""
    return merged_linear_reference(x, w, bias, a, b, scale, transposed)


merged_linear = torch_body_op("lsrfx::merged_linear", _merged_linear)  # Inductor compiles the body in the graph


@merged_linear.register_fake
def _(x, w, bias, a, b, scale, transposed):
    return x.new_empty([*x.shape[:-1], w.shape[1 if transposed else 0]])


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, w, bias, a, b, scale, transposed = inputs
    ctx.save_for_backward(x, w, a, b)
    ctx.scale, ctx.transposed = scale, transposed
    ctx.needs = tuple(ctx.needs_input_grad[:5])


def _backward(ctx, grad: Tensor) -> tuple:
    x, w, a, b = ctx.saved_tensors
    grads = merged_linear_grads(grad, x, w, a, b, needs=ctx.needs, scale=ctx.scale, transposed=ctx.transposed)
    return (*grads, None, None)


merged_linear.register_autograd(_backward, setup_context=_setup_context)
