"""Triton kernels of the fused adapted linear, and the launchers that size and start them.

Three kernels cover forward and backward:

* ``fused_lowrank_kernel``: ``out = X @ Wg + scale * U @ Qg + bias`` with ``U = X @ Pg``, in one pass over the
  output: the adapter term and the bias are added in the epilogue, before the single store, so ``dW`` never
  exists and the output is written once. ``U`` is either computed in the K-loop from the same ``X`` tiles
  (one pass; it can be stored) or read from memory (``LOAD_U``, two passes, see below). The forward uses it with
  ``Wg = W.T, Pg = A.T, Qg = B.T``; the input gradient with ``X = grad, Wg = W, Pg = B, Qg = A`` (so
  ``U = grad @ B``, which the ``A`` gradient reuses).
* ``tn_matmul_kernel``: ``out = scale * L.T @ R``, a reduction over tokens (or features), split over several
  programs per output tile when the rank-sized side leaves too few tiles to fill the GPU (split-K, partial sums
  added afterwards: deterministic): the ``A``/``B`` gradients (``scale * U.T @ X`` and ``scale * G.T @ V``),
  ``V = X @ A.T`` and, for two passes, ``U``.
* ``kron_expand_kernel``: LSR's ``A = sum_s A1[s] (x) A2[s]`` (and ``B``) expanded once per call into a small
  dense ``r x K`` matrix, which the fused kernel then reads like LoRA's ``A``.

Precision. The base product and the adapter products run on tensor cores in the input's dtype with fp32
accumulation: fp16/bf16 inputs use fp16/bf16 MMA (the fp32 adapter factors, and ``U`` before the epilogue
product, are rounded to the input's dtype, as under autocast: ~1e-3 relative in fp16, ~4e-3 in bf16); fp32
inputs use TF32 only when torch allows it (``torch.backends.cuda.matmul.allow_tf32``), else exact fp32 on the
CUDA cores, like cuBLAS. ``U`` is accumulated and stored in fp32.

Tiles. On CUDA every matmul kernel is wrapped in ``triton.autotune`` over the sets in
:mod:`lsrfx.kernels.tile_configs` (64-128 x 64-256 output tiles, K-steps of 32-64, 4-8 warps, 3-5 stages),
keyed on (token bucket, N, K, rank block, flags, dtype); Inductor re-tunes the same sets when it compiles a graph.
Programs are ordered in groups of ``GROUP_M`` row blocks so the ``W`` column block they share stays in L2. Off
CUDA (the ``TRITON_INTERPRET=1`` CPU interpreter of the tests) benchmarking is meaningless, so the launchers pick
a config deterministically; every launcher takes ``config=`` to force one (the tests run every config).
``python -m lsrfx.kernels.aot`` compiles every specialisation for sm_80/sm_90 without a GPU and reports its
shared memory and tensor-core instructions.

One pass or two. By default ``U = X @ Pg`` is computed in the fused kernel's K-loop from the ``X`` tiles it
loads anyway (a second, rank-16 dot per iteration). ``two_pass=True`` computes ``U`` first with the reduction
kernel (one extra read of ``X``, no extra MMA work) and the fused kernel reads it in the epilogue; which is
faster is for ``bench/gpu.py`` to say. Either way the rank-sized operands (``A``, ``B``, ``U``) are cast to the
input's dtype once, before the kernels: converting a ``wgmma`` operand in registers inside the K-loop makes
Triton wait for every MMA before the next iteration (``wgmma.wait_group 0``), while with operands in the
input's dtype it keeps one or two in flight (``lsrfx.kernels.aot`` checks every Hopper build for this).

LSR's Kronecker sums are expanded once per call, not per K-tile. In the K-loop, the ``BLOCK_K x BLOCK_R`` slice
of ``A`` costs ``S`` products of two gathered loads per element, in every program at every K-step: for
``S = 16``, ``BLOCK_K = 64``, ``BLOCK_R = 16`` that is 16,384 FMAs and 32,768 gathered loads on the CUDA cores
(at best ~128 lanes per clock per SM: >= 256 + 128 clocks) against ~512 clocks of tensor-core work for a
128 x 128 x 64 step (an H100 SM retires ~2,048 bf16 MACs per clock): the expansion would cost about as much as
the matmul it feeds. Once per program does not fit (``A`` is ``r x K``: 256 KB in fp32 for ``r = 16``,
``K = 4096``). Once per call it is ``S r K`` FMAs in total (1 M here: microseconds), and ``A``, ``B`` hold
``r (K + N)`` values, never ``dW``.

Expected throughput, on paper (not measured: this project has not run on a GPU; ``bench/gpu.py`` will replace
these estimates). Case: a 4096 x 4096 bf16 layer, 8,192 tokens, LoRA rank 16 (``BLOCK_R = 16``); the base
matmul is 2 x 8192 x 4096 x 4096 = 275 GFLOP, ~0.39 ms for cuBLAS on an H100 SXM at ~700 TFLOP/s, ~1.05 ms
on an A100 at ~260 TFLOP/s.

* Adapter cost inside the fused kernel (one pass): the in-loop ``X @ Pg`` adds ``BLOCK_R / BLOCK_N`` = 6 %
  (128 x 256 tiles) to 12.5 % (128 x 128) tensor-core work, and as much to the bytes of the ``W`` tiles; the
  epilogue's ``U @ Qg`` is one 128 x 16 x 256 MMA per program (< 1 %). (Two passes instead: ``U = X @ A.T``
  re-reads ``X``, 64 MiB, ~22 us at ~3 TB/s on an H100: ~6 % of the base, about the same.)
* H100: the tiles compile to ``wgmma`` kept in flight across K-iterations, but loads go through cp.async
  rather than TMA and there is no warp specialisation, both of which cuBLAS uses on Hopper: we expect such a
  Triton matmul at about 70-85 % of cuBLAS, so the fused kernel at 0.70-0.85 / 1.06-1.125, i.e. **about 62-80 %
  of cuBLAS's throughput** on the base flops.
* A100: ``mma.sync`` with cp.async pipelining, where Triton's matmuls come close to cuBLAS (90-100 % at this
  size): **about 80-94 % of cuBLAS**.
* The unfused path (what peft runs: cuBLAS, then ``X @ A.T``, ``(XA) @ B.T`` writing a 64 MiB delta, and an add
  that reads the output and the delta and writes the output) moves ~320 MiB more: ~0.11 ms on an H100
  (~78 % of cuBLAS alone), ~0.2 ms on an A100 (~84 %). So the fused kernel should be about even with it on
  H100 and ahead on A100 when Triton is near cuBLAS; which is why each op times both bodies on its first call
  (:mod:`lsrfx.kernels.kernel_choice`) and keeps the faster.

Launchers take ``launch``: ``torch.library.wrap_triton`` inside the ``triton_op`` bodies (so Inductor sees the
kernels), the identity for direct calls. All operands are addressed through strides, so transposed layouts
(``Conv1D``) cost nothing; every load is masked, so no shape needs to be a multiple of a block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lsrfx.kernels import tile_configs as tiles
from lsrfx.kernels.tile_configs import MatmulTile, ReductionTile

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None
Launch = Callable[[object], object]

FUSED_KEY = ["M_KEY", "N", "K", "BLOCK_R", "STORE_U", "LOAD_U", "HAS_BIAS", "DOT_PRECISION"]
REDUCTION_KEY = ["P_KEY", "Q_KEY", "T_KEY", "DOT_PRECISION"]
KRON_BLOCK = 32


if HAS_TRITON:

    @triton.jit
    def fused_lowrank_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, u_ptr, p_ptr, q_ptr,
        M, N, K, R, M_KEY,
        sxm, sxk, swk, swn, som, son, sum_, sur, spk, spr, sqr, sqn,
        scale,
        HAS_BIAS: tl.constexpr, STORE_U: tl.constexpr, LOAD_U: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``out = X @ Wg + scale * U @ Qg + bias`` (``X``: M x K, ``Wg``: K x N, ``Qg``: R x N) with
        ``U = X @ Pg`` (``Pg``: K x R) computed in the K-loop, or read (fp32, M x R) when ``LOAD_U``; the
        computed ``U`` is stored (fp32) when ``STORE_U``. ``M_KEY`` is only the autotune key."""
        # Grouped ordering: GROUP_M row blocks walk one column block before the next, sharing it in L2.
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        # Out-of-range rows/columns wrap onto valid memory (their results are never stored), so the main loads
        # need only the K mask, as in Triton's matmul tutorial.
        rm_load = rm % M
        rn_load = rn % N
        r_ok = rr < R
        cdt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm_load[:, None] * sxm + rk[None, :] * sxk, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rk[:, None] * swk + rn_load[None, :] * swn, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(x, w.to(cdt), acc, input_precision=DOT_PRECISION)
            if not LOAD_U:
                p = tl.load(p_ptr + rk[:, None] * spk + rr[None, :] * spr, mask=k_ok[:, None] & r_ok[None, :],
                            other=0.0)
                u = tl.dot(x, p.to(cdt), u, input_precision=DOT_PRECISION)
        if LOAD_U:
            u = tl.load(u_ptr + rm_load[:, None] * sum_ + rr[None, :] * sur, mask=r_ok[None, :], other=0.0)
        q = tl.load(q_ptr + rr[:, None] * sqr + rn_load[None, :] * sqn, mask=r_ok[:, None], other=0.0)
        acc = tl.dot((u * scale).to(cdt), q.to(cdt), acc, input_precision=DOT_PRECISION)
        m_ok = rm < M
        n_ok = rn < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
        if STORE_U:
            if pid_n == 0:
                tl.store(u_ptr + rm[:, None] * sum_ + rr[None, :] * sur, u, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def tn_matmul_kernel(
        l_ptr, r_ptr, out_ptr, P, Q, T, T_PER_SPLIT, P_KEY, Q_KEY, T_KEY,
        slt, slp, srt, srq, sos, sop, soq,
        scale,
        DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """``out[s, p, q] = scale * sum_{t in split s} L[t, p] * R[t, q]``, fp32 accumulation. The dot runs in
        the narrower operand's dtype (an fp32 ``U`` meets a half ``X`` in half precision, on tensor cores)."""
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        pid_s = tl.program_id(2)
        rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        p_ok = rp < P
        q_ok = rq < Q
        t_lo = pid_s * T_PER_SPLIT
        t_hi = tl.minimum(t_lo + T_PER_SPLIT, T)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            t_ok = rt < t_hi
            lt = tl.load(l_ptr + rp[:, None] * slp + rt[None, :] * slt, mask=p_ok[:, None] & t_ok[None, :], other=0.0)
            rv = tl.load(r_ptr + rt[:, None] * srt + rq[None, :] * srq, mask=t_ok[:, None] & q_ok[None, :], other=0.0)
            if l_ptr.dtype.element_ty == tl.float32:
                lt = lt.to(rv.dtype)
            else:
                rv = rv.to(lt.dtype)
            acc = tl.dot(lt, rv, acc, input_precision=DOT_PRECISION)
        tl.store(out_ptr + pid_s * sos + rp[:, None] * sop + rq[None, :] * soq,
                 (acc * scale).to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])

    @triton.jit
    def kron_expand_kernel(
        f1_ptr, f2_ptr, out_ptr, M, N, S, M2, N2,
        s1s, s1i, s1j, s2s, s2i, s2j, som, son,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """``out[i, j] = sum_s F1[s, i // M2, j // N2] * F2[s, i % M2, j % N2]`` (``F2``: ``M2 x N2``), fp32."""
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = (rm < M)[:, None] & (rn < N)[None, :]
        off1 = (rm // M2)[:, None] * s1i + (rn // N2)[None, :] * s1j
        off2 = (rm % M2)[:, None] * s2i + (rn % N2)[None, :] * s2j
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, S):
            f1 = tl.load(f1_ptr + s * s1s + off1, mask=ok, other=0.0).to(tl.float32)
            f2 = tl.load(f2_ptr + s * s2s + off2, mask=ok, other=0.0).to(tl.float32)
            acc += f1 * f2
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _identity(kernel: object) -> object:
    return kernel


identity_launch = _identity  # ``launch`` for direct calls (outside a triton_op body: no ``wrap_triton``)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: TF32 for fp32 inputs only when torch allows it for CUDA matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _autotunes(tensor: Tensor) -> bool:
    """Benchmark configs (``triton.autotune``) only on a real GPU, never under the CPU interpreter."""
    return tensor.is_cuda and not triton.knobs.runtime.interpret


def _key(size: int) -> int:
    """Autotune key of a token-like size: its bucket, or the size itself when symbolic (under
    ``torch.compile`` Inductor tunes at compile time and ignores the key)."""
    return tiles.token_bucket(size) if isinstance(size, int) else size


_autotuned: dict[tuple, object] = {}


def _tuned(kernel_name: str, dtype: torch.dtype, wide_side: str = "") -> object:
    """The ``triton.autotune`` wrapper of a kernel over its config set for ``dtype`` (built once, on CUDA)."""
    key = (kernel_name, tiles.dtype_class(dtype), wide_side)
    if key not in _autotuned:
        if kernel_name == "fused":
            configs = [triton.Config(c.constexprs(), num_warps=c.num_warps, num_stages=c.num_stages)
                       for c in tiles.fused_configs(dtype)]
            _autotuned[key] = triton.autotune(configs=configs, key=FUSED_KEY)(fused_lowrank_kernel)
        else:
            configs = [triton.Config(c.constexprs(wide_side), num_warps=c.num_warps, num_stages=c.num_stages)
                       for c in tiles.reduction_configs(dtype)]
            _autotuned[key] = triton.autotune(configs=configs, key=REDUCTION_KEY)(tn_matmul_kernel)
    return _autotuned[key]


def _fused(
    x2: Tensor, wg: Tensor, bias: Tensor | None, pg: Tensor, qg: Tensor, scale: float,
    out_dtype: torch.dtype, store_u: bool, launch: Launch, config: MatmulTile | None, two_pass: bool,
) -> tuple[Tensor, Tensor | None]:
    """Launch ``fused_lowrank_kernel`` for 2-D ``x2`` (``M x K``), ``wg`` viewed ``K x N``, ``pg`` (``K x r``)
    and ``qg`` (``r x N``); with ``two_pass``, ``U = x2 @ pg`` comes first from :func:`tn_matmul`."""
    m, k = x2.shape
    n = wg.shape[1]
    r = pg.shape[1]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0:
        return out, (torch.empty((0, r), dtype=torch.float32, device=x2.device) if store_u else None)
    pg, qg = pg.to(x2.dtype), qg.to(x2.dtype)  # rank-sized: cast once, not per tile (see tn_matmul)
    if two_pass:
        u = tn_matmul(x2.t(), pg, 1.0, torch.float32, launch)
    else:
        u = torch.empty((m, r), dtype=torch.float32, device=x2.device) if store_u else out
    args = (
        x2, wg, bias if bias is not None else out, out, u, pg, qg,
        m, n, k, r, _key(m),
        x2.stride(0), x2.stride(1), wg.stride(0), wg.stride(1), out.stride(0), out.stride(1),
        u.stride(0), u.stride(1), pg.stride(0), pg.stride(1), qg.stride(0), qg.stride(1),
        float(scale),
    )
    flags = dict(HAS_BIAS=bias is not None, STORE_U=store_u and not two_pass, LOAD_U=two_pass,
                 DOT_PRECISION=dot_precision(x2.dtype), BLOCK_R=tiles.block_r(r))
    if config is None and _autotunes(x2):
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        launch(_tuned("fused", x2.dtype))[grid](*args, **flags)
    else:
        config = config or tiles.pick_fused(tiles.fused_configs(x2.dtype), m, n)
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        launch(fused_lowrank_kernel)[grid](
            *args, **flags, **config.constexprs(), num_warps=config.num_warps, num_stages=config.num_stages
        )
    return out, (u if store_u else None)


def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 1 elsewhere: no split under the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def tn_matmul(
    lhs: Tensor, rhs: Tensor, scale: float, out_dtype: torch.dtype, launch: Launch = _identity, *,
    config: ReductionTile | None = None, split: int | None = None,
) -> Tensor:
    """``scale * lhs.T @ rhs`` for ``lhs``: ``T x P``, ``rhs``: ``T x Q`` (any strides), fp32 accumulation.

    The narrower of ``P``/``Q`` (the rank side) gets a block of its own size; the other is tiled by the config.
    ``split`` programs share each output tile's reduction (default: enough to fill the GPU)."""
    t, p = lhs.shape
    q = rhs.shape[1]
    wide_side = "q" if q > p else "p"
    narrow = min(tiles.block_r(min(p, q)), 64)
    narrow_block = {"BLOCK_P" if wide_side == "q" else "BLOCK_Q": narrow}
    wide = q if wide_side == "q" else p
    if p == 0 or q == 0 or t == 0:
        return torch.zeros((p, q), dtype=out_dtype, device=lhs.device)
    if split is None:
        tiles_ = triton.cdiv(wide, 128) * triton.cdiv(min(p, q), narrow)
        split = tiles.reduction_splits(tiles_, t, _processors(lhs.device))
    per_split = triton.cdiv(triton.cdiv(t, split), 64) * 64  # a multiple of every BLOCK_T
    split = max(1, triton.cdiv(t, per_split))
    if split == 1:
        out = torch.empty((p, q), dtype=out_dtype, device=lhs.device)
        out3 = out.unsqueeze(0)
    else:
        out = out3 = torch.empty((split, p, q), dtype=torch.float32, device=lhs.device)
    # Mixed operands (an fp32 U, V or factor against half activations) meet in the narrower dtype. Casting the
    # rank-sized fp32 operand here, once, rather than per tile in the K-loop keeps Hopper's wgmma pipelined
    # (an operand converted in registers inside the loop serialises it).
    narrower = lhs.dtype if lhs.element_size() <= rhs.element_size() else rhs.dtype
    lhs, rhs = lhs.to(narrower), rhs.to(narrower)
    args = (
        lhs, rhs, out3, p, q, t, per_split, _key(p), _key(q), _key(t),
        lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), out3.stride(0), out3.stride(1), out3.stride(2),
        float(scale),
    )
    precision = dot_precision(narrower)
    if config is None and _autotunes(lhs):
        def grid(meta: dict) -> tuple[int, int, int]:
            return (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(q, meta["BLOCK_Q"]), split)

        launch(_tuned("tn", narrower, wide_side))[grid](*args, DOT_PRECISION=precision, **narrow_block)
    else:
        config = config or tiles.pick_reduction(tiles.reduction_configs(narrower), wide)
        sizes = {**narrow_block, **config.constexprs(wide_side)}
        grid = (triton.cdiv(p, sizes["BLOCK_P"]), triton.cdiv(q, sizes["BLOCK_Q"]), split)
        launch(tn_matmul_kernel)[grid](
            *args, DOT_PRECISION=precision, **sizes, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return out if split == 1 else out.sum(0).to(out_dtype)


def kron_expand(f1: Tensor, f2: Tensor, launch: Launch = _identity) -> Tensor:
    """``sum_s kron(F1[s], F2[s])`` for ``F1``: ``S x m1 x n1``, ``F2``: ``S x m2 x n2`` (any strides), in the
    factors' dtype: LSR's small ``A`` (``r x K``) or ``B`` (``N x r``)."""
    s, m1, n1 = f1.shape
    _, m2, n2 = f2.shape
    out = torch.empty((m1 * m2, n1 * n2), dtype=f1.dtype, device=f1.device)
    grid = (triton.cdiv(m1 * m2, KRON_BLOCK), triton.cdiv(n1 * n2, KRON_BLOCK))
    launch(kron_expand_kernel)[grid](
        f1, f2, out, m1 * m2, n1 * n2, s, m2, n2, *f1.stride(), *f2.stride(), out.stride(0), out.stride(1),
        BLOCK_M=KRON_BLOCK, BLOCK_N=KRON_BLOCK,
    )
    return out


def _weight_kn(w: Tensor, transposed: bool) -> Tensor:
    """``W`` viewed as ``K x N`` (a stride view, no copy)."""
    return w if transposed else w.t()


def lowrank_forward(
    x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float, transposed: bool,
    launch: Launch = _identity, *, config: MatmulTile | None = None, two_pass: bool = False,
    return_u: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused ``x @ W.T + bias + scale * (x @ A.T) @ B.T`` for ``x`` of any leading shape. ``config`` forces a
    tile config; ``two_pass`` computes ``x @ A.T`` with its own kernel first (see the module docstring).
    ``return_u``: also return ``x @ A.T`` (fp32, ``x``'s leading shape x ``r``), which the kernel has anyway (the
    ``A``/``B`` gradients need it): ``(out, u)``."""
    x2 = x.reshape(-1, x.shape[-1])
    out, u = _fused(x2, _weight_kn(w, transposed), bias, a.t(), b.t(), scale, x.dtype, return_u, launch, config,
                    two_pass)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return (out, u.reshape(*x.shape[:-1], u.shape[-1])) if return_u else out


def lsr_forward(
    x: Tensor, w: Tensor, bias: Tensor | None, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor, scale: float,
    transposed: bool, launch: Launch = _identity, *, config: MatmulTile | None = None, two_pass: bool = False,
    return_u: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """As :func:`lowrank_forward` with ``A = sum_s A1[s] (x) A2[s]``, ``B = sum_s B1[s] (x) B2[s]`` expanded on
    the device once per call (see the module docstring for why not per K-tile)."""
    a, b = kron_expand(a1, a2, launch), kron_expand(b1, b2, launch)
    return lowrank_forward(x, w, bias, a, b, scale, transposed, launch, config=config, two_pass=two_pass,
                           return_u=return_u)


def grad_input(
    grad: Tensor, w: Tensor, a: Tensor, b: Tensor, scale: float, transposed: bool, launch: Launch = _identity, *,
    config: MatmulTile | None = None, two_pass: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(grad @ W + scale * (grad @ B) @ A, grad @ B)`` in one pass over ``grad``; ``u`` is ``M x r``."""
    g2 = grad.reshape(-1, grad.shape[-1])
    wg = w.t() if transposed else w  # (N, K): Wg[n, k]
    gx, u = _fused(g2, wg, None, b, a, scale, grad.dtype, True, launch, config, two_pass)
    return gx.reshape(*grad.shape[:-1], gx.shape[-1]), u.to(b.dtype)


def grad_factors(
    grad: Tensor, x: Tensor, a: Tensor, b: Tensor, u: Tensor | None, scale: float, launch: Launch = _identity, *,
    config: ReductionTile | None = None, split: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(scale * U.T @ X, scale * G.T @ (X @ A.T))`` with ``U = G @ B`` reused from :func:`grad_input` if given."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    options = dict(config=config, split=split)
    if u is None:
        u = tn_matmul(g2.t(), b, 1.0, torch.float32, launch, **options)  # (M, r) = G @ B
    v = tn_matmul(x2.t(), a.t(), 1.0, torch.float32, launch, **options)  # (M, r) = X @ A.T
    grad_a = tn_matmul(u, x2, scale, a.dtype, launch, **options)  # (r, K)
    grad_b = tn_matmul(g2, v, scale, b.dtype, launch, **options)  # (N, r)
    return grad_a, grad_b
