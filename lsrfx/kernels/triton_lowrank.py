"""Triton kernels of the fused adapted linear, and the launchers that size and start them.

Two kernels cover forward and backward:

* ``fused_lowrank_kernel``: ``out = X @ Wg + scale * (X @ Pg) @ Qg + bias`` in ONE pass over ``X``: each K-step
  loads the ``X`` tile once and feeds both ``X @ Wg`` and the rank-``r`` projection ``U = X @ Pg``; the adapter
  term is added in the epilogue, with the bias, before the single store. ``U`` can be written out too. The forward
  uses it with ``Wg = W.T, Pg = A.T, Qg = B.T``; the input gradient with ``X = grad, Wg = W, Pg = B, Qg = A`` (so
  ``U = grad @ B``, which the ``A`` gradient reuses). With ``KRON`` the ``Pg``/``Qg`` tiles are expanded on the fly
  from LSR's small Kronecker factors (``A = sum_s A1[s] (x) A2[s]``), so neither ``A`` nor ``B`` exists in memory.
* ``tn_matmul_kernel``: ``out = scale * L.T @ R``, reducing over the token dimension: the ``A``/``B`` gradients
  (``scale * U.T @ X`` and ``scale * G.T @ V``) and ``V = X @ A.T``.

All operands are addressed through strides, so transposed layouts (``Conv1D``) cost nothing; every load is
masked, so no shape needs to be a multiple of a block. Matmuls of the base run in the input dtype (fp32, fp16,
bf16) with fp32 accumulation; the adapter path runs in fp32.

Launchers take ``launch``: ``torch.library.wrap_triton`` inside the ``triton_op`` bodies (so Inductor sees the
kernels), the identity for direct calls. Under ``TRITON_INTERPRET=1`` they run on CPU tensors (tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
Launch = Callable[[object], object]

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32
MIN_DOT = 16  # tl.dot needs every dimension >= 16


def _block_r(r: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(r))


if HAS_TRITON:

    @triton.jit
    def _kron_tile(f1, f2, i, j, m2, n2, S, s1s, s1i, s1j, s2s, s2i, s2j, mask):
        """Element ``(i, j)`` of ``sum_s kron(F1[s], F2[s])`` (``F2`` is ``m2 x n2``), broadcast over ``i``, ``j``."""
        off1 = (i // m2) * s1i + (j // n2) * s1j
        off2 = (i % m2) * s2i + (j % n2) * s2j
        acc = tl.load(f1 + off1, mask=mask, other=0.0).to(tl.float32) * tl.load(
            f2 + off2, mask=mask, other=0.0
        ).to(tl.float32)
        for s in range(1, S):
            acc += tl.load(f1 + s * s1s + off1, mask=mask, other=0.0).to(tl.float32) * tl.load(
                f2 + s * s2s + off2, mask=mask, other=0.0
            ).to(tl.float32)
        return acc

    @triton.jit
    def fused_lowrank_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, u_ptr,
        p_ptr, p2_ptr, q_ptr, q2_ptr,
        M, N, K, R, S,
        sxm, sxk, swk, swn, som, son, sum_, sur,
        # dense: Pg[k, r] = p[k*sp0 + r*sp1], Qg[r, n] = q[r*sq0 + n*sq1].
        # KRON: Pg[k, r] = A[r, k], A = sum_s kron(p[s], p2[s]); Qg[r, n] = B[n, r], B = sum_s kron(q[s], q2[s]).
        sp0, sp1, sp2, sp20, sp21, sp22, pm2, pn2,
        sq0, sq1, sq2, sq20, sq21, sq22, qm2, qn2,
        scale,
        HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr, KRON: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        m_ok = rm < M
        n_ok = rn < N
        r_ok = rr < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += tl.dot(x, w)
            p_mask = k_ok[:, None] & r_ok[None, :]
            if KRON:
                p = _kron_tile(p_ptr, p2_ptr, rr[None, :], rk[:, None], pm2, pn2, S,
                               sp0, sp1, sp2, sp20, sp21, sp22, p_mask)
            else:
                p = tl.load(p_ptr + rk[:, None] * sp0 + rr[None, :] * sp1, mask=p_mask, other=0.0).to(tl.float32)
            u += tl.dot(x.to(tl.float32), p)
        q_mask = r_ok[:, None] & n_ok[None, :]
        if KRON:
            q = _kron_tile(q_ptr, q2_ptr, rn[None, :], rr[:, None], qm2, qn2, S,
                           sq0, sq1, sq2, sq20, sq21, sq22, q_mask)
        else:
            q = tl.load(q_ptr + rr[:, None] * sq0 + rn[None, :] * sq1, mask=q_mask, other=0.0).to(tl.float32)
        acc += tl.dot(u, q) * scale
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        if STORE_U:
            if pid_n == 0:
                tl.store(u_ptr + rm[:, None] * sum_ + rr[None, :] * sur, u, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def tn_matmul_kernel(
        l_ptr, r_ptr, out_ptr, P, Q, T,
        slt, slp, srt, srq, sop, soq,
        scale,
        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """``out[p, q] = scale * sum_t L[t, p] * R[t, q]`` in fp32."""
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        p_ok = rp < P
        q_ok = rq < Q
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_ok = rt < T
            lt = tl.load(l_ptr + rp[:, None] * slp + rt[None, :] * slt, mask=p_ok[:, None] & t_ok[None, :], other=0.0)
            rv = tl.load(r_ptr + rt[:, None] * srt + rq[None, :] * srq, mask=t_ok[:, None] & q_ok[None, :], other=0.0)
            acc += tl.dot(lt.to(tl.float32), rv.to(tl.float32))
        tl.store(out_ptr + rp[:, None] * sop + rq[None, :] * soq, (acc * scale).to(out_ptr.dtype.element_ty),
                 mask=p_ok[:, None] & q_ok[None, :])


def _identity(kernel: object) -> object:
    return kernel


def _fused(
    x2: Tensor, wg: Tensor, bias: Tensor | None, pg: tuple[Tensor, ...], qg: tuple[Tensor, ...], scale: float,
    out_dtype: torch.dtype, store_u: bool, launch: Launch,
) -> tuple[Tensor, Tensor | None]:
    """Launch ``fused_lowrank_kernel`` for 2-D ``x2`` (``M x K``) and ``wg`` viewed ``K x N``.

    ``pg``/``qg`` hold either one dense matrix (``Pg``: ``K x r``, ``Qg``: ``r x N``) or the two Kronecker factors
    of ``A`` (``r x K``) and of ``B`` (``N x r``)."""
    m, k = x2.shape
    n = wg.shape[1]
    kron = len(pg) == 2
    if kron:
        r = pg[0].shape[1] * pg[1].shape[1]
        s = pg[0].shape[0]
        p, p2 = pg
        q, q2 = qg
        p_strides = (*p.stride(), *p2.stride(), p2.shape[1], p2.shape[2])
        q_strides = (*q.stride(), *q2.stride(), q2.shape[1], q2.shape[2])
    else:
        (p,), (q,) = pg, qg
        p2, q2 = p, q
        r, s = p.shape[1], 1
        p_strides = (*p.stride(), 0, 0, 0, 0, 1, 1)
        q_strides = (*q.stride(), 0, 0, 0, 0, 1, 1)
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    u = torch.empty((m, r), dtype=torch.float32, device=x2.device) if store_u else out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    launch(fused_lowrank_kernel)[grid](
        x2, wg, bias if bias is not None else out, out, u,
        p, p2, q, q2,
        m, n, k, r, s,
        x2.stride(0), x2.stride(1), wg.stride(0), wg.stride(1), out.stride(0), out.stride(1),
        u.stride(0), u.stride(1),
        *p_strides, *q_strides,
        float(scale),
        HAS_BIAS=bias is not None, STORE_U=store_u, KRON=kron,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(r),
    )
    return out, (u if store_u else None)


def tn_matmul(lhs: Tensor, rhs: Tensor, scale: float, out_dtype: torch.dtype, launch: Launch = _identity) -> Tensor:
    """``scale * lhs.T @ rhs`` for ``lhs``: ``T x P``, ``rhs``: ``T x Q`` (any strides), fp32 accumulation."""
    t, p = lhs.shape
    q = rhs.shape[1]
    out = torch.empty((p, q), dtype=out_dtype, device=lhs.device)
    bp, bq = max(MIN_DOT, min(BLOCK_M, triton.next_power_of_2(p))), max(MIN_DOT, min(BLOCK_N, triton.next_power_of_2(q)))
    grid = (triton.cdiv(p, bp), triton.cdiv(q, bq))
    launch(tn_matmul_kernel)[grid](
        lhs, rhs, out, p, q, t,
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out.stride(0), out.stride(1),
        float(scale), BLOCK_P=bp, BLOCK_Q=bq, BLOCK_T=BLOCK_K,
    )
    return out


def _weight_kn(w: Tensor, transposed: bool) -> Tensor:
    """``W`` viewed as ``K x N`` (a stride view, no copy)."""
    return w if transposed else w.t()


def lowrank_forward(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool,
    launch: Launch = _identity,
) -> Tensor:
    """Fused ``x @ W.T + bias + scale * (x @ A.T) @ B.T`` for ``x`` of any leading shape."""
    x2 = x.reshape(-1, x.shape[-1])
    out, _ = _fused(x2, _weight_kn(w, transposed), bias, (a.t(),), (b.t(),), scale, x.dtype, False, launch)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def lsr_forward(
    x: Tensor, w: Tensor, bias: Tensor | None, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float,
    transposed: bool, launch: Launch = _identity,
) -> Tensor:
    """As :func:`lowrank_forward` with ``A = sum_s A1[s] (x) A2[s]``, ``B = sum_s B1[s] (x) B2[s]`` expanded in
    the kernel from the factors."""
    x2 = x.reshape(-1, x.shape[-1])
    out, _ = _fused(x2, _weight_kn(w, transposed), bias, (a1, a2), (b1, b2), scale, x.dtype, False, launch)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def grad_input(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool, launch: Launch = _identity,
) -> tuple[Tensor, Tensor]:
    """``(grad @ W + scale * (grad @ B) @ A, grad @ B)`` in one pass over ``grad``; ``u`` is ``M x r``."""
    g2 = grad.reshape(-1, grad.shape[-1])
    wg = w.t() if transposed else w  # (N, K): Wg[n, k]
    gx, u = _fused(g2, wg, None, (b,), (a,), scale, grad.dtype, True, launch)
    return gx.reshape(*grad.shape[:-1], gx.shape[-1]), u.to(b.dtype)


def grad_factors(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float, launch: Launch = _identity,
) -> tuple[Tensor, Tensor]:
    """``(scale * U.T @ X, scale * G.T @ (X @ A.T))`` with ``U = G @ B`` reused from :func:`grad_input` if given."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if u is None:
        u = tn_matmul(g2.t(), b, 1.0, torch.float32, launch)  # (M, r) = G @ B
    v = tn_matmul(x2.t(), a.t(), 1.0, torch.float32, launch)  # (M, r) = X @ A.T
    grad_a = tn_matmul(u, x2, scale, a.dtype, launch)  # (r, K)
    grad_b = tn_matmul(g2, v, scale, b.dtype, launch)  # (N, r)
    return grad_a, grad_b
