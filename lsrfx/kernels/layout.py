"""Layouts shared by the fused ops and the compile pass: shapes of a fused linear and which factors are stored
transposed, and why.

Why factors are stored transposed: LSR's, CondLoRA's and GenLoRA's compiled ``B`` (``N x r``) is formed as ``B.T``
and used as a transposed view, because Inductor's C++ backend vectorises a reduction along its output's last
dimension and, when that dimension is shorter than one vector (``r``), torch 2.13 opens an OpenMP parallel region
inside every output iteration (hundreds per call; each costs a scheduler time slice when another process holds a
core). ``grad_B`` then takes ``B``'s layout, so the factor gradients read it along ``N`` too. The ``kron_sum`` op,
``lsr_linear``, the pass's product rewrite and its batching all follow :func:`formed_transposed`; this is the one
place the reason is written.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def out_shape(x: Tensor, w: Tensor, transposed: bool) -> list:
    """Output shape of a fused linear: ``x``'s leading dims and ``N``."""
    return [*x.shape[:-1], w.shape[0 if not transposed else 1]]


def flat(t: Tensor) -> Tensor:
    """``t`` as a 2-D ``(tokens, features)`` matrix."""
    return t.reshape(-1, t.shape[-1])


def column_major(t: Tensor) -> bool:
    """Whether the 2-D ``t`` (of more than one row) is stored as the transpose of a contiguous matrix, as the
    factors lsrfx forms that end in their rank are (see the module docstring for why)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def formed_transposed(rows: int, cols: int) -> bool:
    """Whether a factor of shape ``rows x cols`` that lsrfx forms itself is formed as its transpose and used as a
    transposed view (so that it is :func:`column_major`): when it has fewer columns than rows, i.e. ends in its
    rank. The ``kron_sum`` op, ``lsr_linear`` and the pass's product rewrite all follow this rule."""
    return cols < rows


def tn_like(tn: Callable[[Tensor, Tensor, Tensor], Tensor], lhs: Tensor, rhs: Tensor, like: Tensor) -> Tensor:
    """``lhs.T @ rhs`` computed by ``tn(lhs, rhs, like)`` in the layout of ``like``, its shape (a factor): row-major,
    or the transpose of ``tn(rhs, lhs, like.T)`` when ``like`` is :func:`column_major`."""
    if column_major(like):
        return tn(rhs, lhs, like.t()).t()
    return tn(lhs, rhs, like)
