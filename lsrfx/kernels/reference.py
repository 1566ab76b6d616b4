"""Dense torch reference math of the fused adapted linear: the CPU body of the fused ops and the spec the Triton
kernels are tested against.

Conventions shared by every fused op: ``y = x @ W.T + bias + scale * (x @ A.T) @ B.T`` with ``W`` of shape
``(N, K)``, or stored ``(K, N)`` when ``transposed`` (GPT-2 ``Conv1D``); ``A``: ``(r, K)``; ``B``: ``(N, r)``. The
adapter term is computed in the factors' dtype (fp32 master weights under a half-precision base) and cast to the
output dtype once, which is what ``compose`` does to ``dW``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def base_linear(x: Tensor, w: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """``x @ W.T + bias`` for ``W`` in ``(N, K)`` layout, or ``(K, N)`` when ``transposed``."""
    return torch.nn.functional.linear(x, w.t() if transposed else w, bias)


def lowrank_linear_ref(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool
) -> Tensor:
    """``x @ W.T + bias + scale * (x @ A.T) @ B.T`` without ever forming ``B @ A``."""
    base = base_linear(x, w, bias, transposed)
    delta = (x.to(a.dtype) @ a.t()) @ b.t()
    return base + (delta * scale).to(base.dtype)


def grad_input_ref(grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x, u)``: ``grad_x = grad @ W + scale * u @ A`` and ``u = grad @ B`` (reused for ``grad_A``)."""
    w_nk = w.t() if transposed else w
    u = grad.to(b.dtype) @ b
    grad_x = grad @ w_nk + ((u @ a) * scale).to(grad.dtype)
    return grad_x, u


def grad_factors_ref(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """``(grad_A, grad_B)``: ``scale * u.T @ x`` and ``scale * grad.T @ (x @ A.T)``, over all leading dims."""
    g2 = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)
    u2 = g2 @ b if u is None else u.reshape(-1, u.shape[-1])
    v2 = x2 @ a.t()
    return (u2.t() @ x2) * scale, (g2.t() @ v2) * scale


def grad_weight_ref(grad: Tensor, x: Tensor, transposed: bool) -> Tensor:
    """Gradient of the base weight in its storage layout (only when ``W`` is trainable, which is unusual)."""
    gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # (N, K)
    return gw.t() if transposed else gw


def kron_sum_grads(grad: Tensor, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
    """Chain ``grad`` of ``M = sum_k kron(F1[k], F2[k])`` to ``(grad_F1, grad_F2)``."""
    _, m1, n1 = f1.shape
    _, m2, n2 = f2.shape
    g = grad.reshape(m1, m2, n1, n2)
    return torch.einsum("ijkl,sjl->sik", g, f2), torch.einsum("ijkl,sik->sjl", g, f1)


def kron_sum_dense(f1: Tensor, f2: Tensor) -> Tensor:
    """``sum_k kron(F1[k], F2[k])``: the small ``A`` (``r x K``) or ``B`` (``N x r``) of LSR, never ``dW``."""
    _, m1, n1 = f1.shape
    _, m2, n2 = f2.shape
    return torch.einsum("sik,sjl->ijkl", f1, f2).reshape(m1 * m2, n1 * n2)
