"""Torch reference bodies of the fused adapted linear: the forward, the input and factor gradients and the base's
gradients. They are what runs off CUDA (Inductor compiles them like any torch code) and the spec the Triton kernels
are tested against; ``lowrank_linear``, ``lsr_linear`` and ``merged_linear`` share them.

Conventions shared by every fused op: ``W`` is ``(N, K)``, or stored ``(K, N)`` when ``transposed`` (GPT-2
``Conv1D``); ``A``: ``(r, K)``; ``B``: ``(N, r)``; ``x`` may have any leading dims. The adapter term is computed in
the factors' dtype (fp32 master weights under a half-precision base) and cast to the output dtype once, which is
what ``compose`` does to ``dW``. ``scale`` is folded into BLAS calls (``addmm``'s ``alpha``) rather than multiplied
afterwards: under Inductor on CPU each separate multiply would be one more kernel launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsrfx.kernels.layout import flat, tn_like

# Which inputs of the fused linear need a gradient: (x, W, bias, A, B).
GradsNeeded = tuple[bool, bool, bool, bool, bool]


def scaled_mm(m1: Tensor, m2: Tensor, scale: float, like: Tensor) -> Tensor:
    """``scale * m1 @ m2`` as one BLAS call, so no multiply kernel follows the product: ``addmm`` with ``beta = 0``
    ignores the values of its input, here ``like``, any existing tensor of the result's shape and dtype."""
    return torch.addmm(like, m1, m2, beta=0, alpha=scale)


def base_linear(x: Tensor, w: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``x @ W.T + bias`` for ``W`` in ``(N, K)`` layout, or ``(K, N)`` when ``transposed``."""
    return torch.nn.functional.linear(x, w.t() if transposed else w, bias)


def lowrank_linear_reference(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(x @ W.T + bias + scale * v @ B.T, v)`` with ``v = x @ A.T``, without ever forming ``B @ A``."""
    base = base_linear(x, w, bias, transposed)
    v = x.to(a.dtype) @ a.t()
    return base + (v @ b.t() * scale).to(base.dtype), v


def grad_input_reference(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> tuple[Tensor, Tensor]:
    """``(grad_x, u)``: ``grad_x = grad @ W + scale * u @ A`` and ``u = grad @ B`` (``tokens x r``, reused for
    ``grad_A``)."""
    w_nk = w.t() if transposed else w
    u = flat(grad).to(b.dtype) @ b
    base = flat(grad) @ w_nk
    if base.dtype == a.dtype:
        grad_x = torch.addmm(base, u, a, alpha=scale)
    else:  # fp32 factors on a half-precision base: one pointwise kernel scales, casts and adds
        grad_x = base + (u @ a * scale).to(base.dtype)
    return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), u


def grad_factors_reference(
    grad: Tensor, x: Tensor, v: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(grad_A, grad_B)`` = ``(scale * u.T @ x, scale * grad.T @ v)`` over all leading dims (``u = grad @ B``
    when not given), each in its factor's layout."""
    g2 = flat(grad).to(a.dtype)
    u2 = g2 @ b if u is None else flat(u)

    def tn(lhs: Tensor, rhs: Tensor, like: Tensor) -> Tensor:  # one BLAS call, scale included
        return scaled_mm(lhs.t(), rhs, scale, like)

    return tn_like(tn, u2, flat(x).to(a.dtype), a), tn_like(tn, g2, flat(v), b)


def grad_weight_reference(grad: Tensor, x: Tensor, transposed: bool) -> Tensor:
    """Gradient of the base weight in its storage layout (only when ``W`` is trainable, which is unusual)."""
    gw = flat(grad).t() @ flat(x)  # (N, K)
    return gw.t() if transposed else gw


def base_grads(grad: Tensor, x: Tensor, w: Tensor, *, need_w: bool, need_bias: bool,
               transposed: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_w, grad_bias)`` of an adapted linear, ``None`` where not needed: the base's part of every adapted
    linear's backward (fused or merged), the same whatever the adapter."""
    grad_w = grad_weight_reference(grad, x, transposed).to(w.dtype) if need_w else None
    grad_bias = flat(grad).sum(0) if need_bias else None
    return grad_w, grad_bias
