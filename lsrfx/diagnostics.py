"""Diagnostics of adapted models: how many directions each layer's update ``dW`` really uses.

The *effective rank* of a matrix (Roy & Vetterli, 2007) is ``exp(H(p))`` with ``p_k = s_k / sum(s)`` its normalised
singular values and ``H`` their Shannon entropy: ``n`` for an ``n x n`` identity, 1 for a rank-1 matrix, between 1 and
the rank otherwise (a spectrum dominated by a few directions counts as few). For an adapter's ``dW = scale * B @ A``
it is at most the adapter's rank; right after ``adapt`` (``dW = 0``) it is 0. A matrix with a NaN or infinite entry
has no singular values (the SVD does not converge): its effective rank reads ``nan``, so a diverged layer shows up in
:func:`lsrfx.summary` instead of crashing it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lsrfx.errors import LsrfxError
from lsrfx.parametrization import adapted_layers, base_weight
from lsrfx.quantized_base import dense
from lsrfx.utils import unwrap


def effective_rank(matrix: Tensor) -> float:
    """``exp`` of the entropy of ``matrix``'s normalised singular values ``s_k / sum(s)`` (0 for an all-zero
    matrix, ``nan`` for one with a non-finite entry), computed in float64 on the CPU with
    :func:`torch.linalg.svdvals`."""
    if matrix.ndim != 2:
        raise LsrfxError(f"effective_rank takes a 2-D matrix, got shape {tuple(matrix.shape)}.")
    if matrix.is_meta:
        raise LsrfxError("effective_rank: the matrix is on the meta device (no values); materialise it first.")
    m64 = _float64(matrix)
    return _entropy_rank(torch.linalg.svdvals(m64)) if _finite(m64) else math.nan


def low_rank_effective_rank(a: Tensor, b: Tensor) -> float:
    """:func:`effective_rank` of ``b @ a`` (``a``: ``r x d_in``, ``b``: ``d_out x r``) without forming it: with
    ``b = Q_b R_b`` and ``a.T = Q_a R_a`` (reduced QR), ``b @ a = Q_b (R_b R_a.T) Q_a.T`` has the singular values of
    the ``r x r`` core, so a 4096 x 4096 layer costs two thin QRs instead of a dense SVD."""
    a64, b64 = _float64(a), _float64(b)
    if not (_finite(a64) and _finite(b64)):
        return math.nan
    if a64.shape[0] >= min(a64.shape[1], b64.shape[0]):  # not low-rank: the dense product is as cheap
        return _entropy_rank(torch.linalg.svdvals(b64 @ a64))
    r_a = torch.linalg.qr(a64.t(), mode="r").R
    r_b = torch.linalg.qr(b64, mode="r").R
    return _entropy_rank(torch.linalg.svdvals(r_b @ r_a.t()))


def _entropy_rank(s: Tensor) -> float:
    total = s.sum()
    if not bool(torch.isfinite(total)):
        return math.nan
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def delta_effective_ranks(model: nn.Module) -> dict[str, float]:
    """The :func:`effective_rank` of every adapted layer's update ``dW = scale * B @ A``, by layer name, in module
    order (computed from the factors by :func:`low_rank_effective_rank`: the same value as for
    ``adapter.delta_weight(W0)``, without the dense SVD). ``model`` may be compiled; a quantized (torchao) base weight is
    dequantised first (:func:`lsrfx.quantized_base.dense`); a layer whose weights are still on
    the ``meta`` device, or whose factors hold a NaN or infinity, reads ``nan``."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, module, param in adapted_layers(unwrap(model)):
            w0 = base_weight(module)
            if w0.is_meta or any(p.is_meta for p in param.adapter.parameters()):
                out[name] = math.nan
                continue
            w0 = dense(w0)
            adapter = param.adapter
            a, b = adapter.factors(w0.t() if param.transposed else w0)
            out[name] = 0.0 if adapter.scale == 0 else low_rank_effective_rank(a, b)
    return out


def _float64(matrix: Tensor) -> Tensor:
    return dense(matrix).detach().to("cpu", torch.float64)


def _finite(matrix: Tensor) -> bool:
    """Whether every entry is finite: the SVD of anything else fails to converge (``torch.linalg.LinAlgError``)."""
    return bool(torch.isfinite(matrix).all())
