"""Triton kernels (forward and backward) against dense torch math, under TRITON_INTERPRET=1 on CPU tensors.

The references here are written out densely (``x @ (W0 + s*B@A).T + bias`` in float64, Kronecker sums with
``torch.kron``, gradients from autograd), independent of ``lsrfx.kernels.reference``.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be checked")

from lsrfx.kernels import triton_lowrank as tk  # noqa: E402
from lsrfx.kernels.dispatch import force_triton  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest) to run on CPU"
)

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=3e-2)}


def dense_kron_sum(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(f1[s], f2[s]) for s in range(f1.shape[0]))


def dense_forward(x, w, bias, a, b, scale, transposed):
    """``x @ (W0 + s*B@A).T + bias`` in float64, ``W0`` given in its storage layout."""
    w_nk = (w.t() if transposed else w).double()
    full = w_nk + scale * b.double() @ a.double()
    y = x.double() @ full.t()
    return y + bias.double() if bias is not None else y


def make(shape_x, k, n, r, dtype, transposed, bias=True):
    x = torch.randn(*shape_x, k, dtype=dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    if transposed:
        w = w.t().contiguous()
    b_ = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(r, k) / k**0.5
    b = torch.randn(n, r) / r**0.5
    return x, w, b_, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape_x", [(37,), (2, 19)], ids=["2d", "3d"])
def test_lowrank_forward_and_backward(dtype, transposed, shape_x):
    k, n, r, scale = 45, 29, 3, 0.7
    x, w, bias, a, b = make(shape_x, k, n, r, dtype, transposed, bias=shape_x == (37,) or transposed)
    y = tk.lowrank_forward(x, w, bias, a, b, scale, transposed)
    assert y.shape == (*shape_x, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), dense_forward(x, w, bias, a, b, scale, transposed), **TOL[dtype])

    # gradients of the dense formula by autograd
    xd, ad, bd = (t.double().requires_grad_() for t in (x, a, b))
    yd = dense_forward(xd, w, bias, ad, bd, scale, transposed)
    g = torch.randn_like(yd)
    gx_ref, ga_ref, gb_ref = torch.autograd.grad(yd, (xd, ad, bd), g)
    gx, u = tk.grad_input(g.to(dtype), w, a, b, scale, transposed)
    torch.testing.assert_close(gx.double(), gx_ref, **TOL[dtype])
    torch.testing.assert_close(u.double(), g.to(dtype).double().reshape(-1, n) @ b.double(), **TOL[torch.float32])
    for reuse in (u, None):
        ga, gb = tk.grad_factors(g.to(dtype), x, a, b, reuse, scale)
        assert ga.dtype == a.dtype and gb.dtype == b.dtype
        torch.testing.assert_close(ga.double(), ga_ref, **TOL[dtype])
        torch.testing.assert_close(gb.double(), gb_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swap", [False, True], ids=["plain", "transposed-factors"])
def test_lsr_forward_expands_kronecker_sums(dtype, swap):
    s_, (r1, r2), (a1_, a2_), (b1_, b2_) = 3, (2, 3), (5, 9), (7, 3)
    a1, a2 = torch.randn(s_, r1, a1_), torch.randn(s_, r2, a2_)
    b1, b2 = torch.randn(s_, b1_, r1), torch.randn(s_, b2_, r2)
    if swap:  # strided (non-contiguous) factor views, as the pass passes for transposed layers
        a1, a2 = torch.randn(s_, a1_, r1).transpose(1, 2), torch.randn(s_, a2_, r2).transpose(1, 2)
    k, n = a1_ * a2_, b1_ * b2_
    x = torch.randn(2, 11, k, dtype=dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    bias = torch.randn(n, dtype=dtype)
    y = tk.lsr_forward(x, w, bias, a1, a2, b1, b2, 0.3, False)
    ref = dense_forward(x, w, bias, dense_kron_sum(a1, a2), dense_kron_sum(b1, b2), 0.3, False)
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])


def test_tn_matmul_odd_shapes():
    lhs, rhs = torch.randn(53, 7), torch.randn(53, 41)
    torch.testing.assert_close(tk.tn_matmul(lhs, rhs, 2.0, torch.float32), 2.0 * lhs.t() @ rhs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lowrank", "lsr"])
def test_ops_triton_branch_with_autograd(method):
    """The triton_op bodies take the Triton branch (forced on CPU) and their registered autograd is right."""
    k, n = 12, 10
    x = torch.randn(2, 5, k, requires_grad=True)
    w = torch.randn(n, k)
    bias = torch.randn(n, requires_grad=True)
    if method == "lsr":
        factors = [torch.randn(2, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.randn(2, 2, 2)]
        factors = [f.requires_grad_() for f in factors]
        a, b = dense_kron_sum(*factors[:2]), dense_kron_sum(*factors[2:])
    else:
        a, b = torch.randn(4, k, requires_grad=True), torch.randn(n, 4, requires_grad=True)
        factors = [a, b]
    leaves = [x, bias, *factors]
    ref = torch.nn.functional.linear(x, w + 0.5 * b @ a, bias)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, leaves, g)
    for forced in (True, False):
        with force_triton() if forced else torch.autograd.set_grad_enabled(True):
            if method == "lsr":
                y = torch.ops.lsrfx.lsr_linear(x, w, bias, *factors, 0.5, False)
            else:
                y = torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, 0.5, False)
            grads = torch.autograd.grad(y, leaves, g)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
