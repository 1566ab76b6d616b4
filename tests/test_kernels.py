"""Triton kernels (forward and backward) against dense torch math, under TRITON_INTERPRET=1 on CPU tensors.

The references here are written out densely (``x @ (W0 + s*B@A).T + bias`` in float64, Kronecker sums with
``torch.kron``, gradients from autograd), independent of the ops' own torch reference bodies.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be checked")

from lsrfx.errors import LsrfxError  # noqa: E402
from lsrfx.kernels import dispatch, tile_configs  # noqa: E402
from lsrfx.kernels import triton_matmul as tk  # noqa: E402
from lsrfx.kernels.dispatch import force_triton  # noqa: E402
from lsrfx.kernels.kernel_choice import KernelChooser  # noqa: E402

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
    torch.testing.assert_close(u.double(), g.to(dtype).double().reshape(-1, n) @ b.double(), **TOL[dtype])
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
                y, v, a_out, b_out = torch.ops.lsrfx.lsr_linear(x, w, bias, *factors, 0.5, False)
                torch.testing.assert_close(a_out, a, atol=1e-5, rtol=1e-5)  # the dense factors, saved for backward
                torch.testing.assert_close(b_out, b, atol=1e-5, rtol=1e-5)
            else:
                y, v = torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, 0.5, False)
            assert not v.requires_grad  # x @ A.T: saved for the backward, not differentiable
            torch.testing.assert_close(v, x @ a.t(), atol=1e-4, rtol=1e-4)
            grads = torch.autograd.grad(y, leaves, g)
        torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- every autotune config (the CUDA autotuner may pick any of them, so each must be right) -------------------

FUSED_CASES = [(dtype, config) for dtype in (torch.float32, torch.float16) for config in tile_configs.fused_configs(dtype)]
REDUCTION_CASES = [
    (dtype, config) for dtype in (torch.float32, torch.float16) for config in tile_configs.reduction_configs(dtype)
]


@pytest.mark.parametrize("two_pass", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize(("dtype", "config"), FUSED_CASES, ids=[f"{d}-{c.name}".replace("torch.", "") for d, c in FUSED_CASES])
def test_fused_kernel_every_config(dtype, config, two_pass):
    """Forward and input gradient, both layouts, 3-D input, odd sizes spanning several (grouped) tiles of the
    smaller configs and fewer rows than one tile of the larger ones."""
    k, n, r, scale = 70, 140, 5, 0.7
    for transposed in (False, True):
        x, w, bias, a, b = make((3, 50), k, n, r, dtype, transposed)
        y = tk.lowrank_forward(x, w, bias, a, b, scale, transposed, config=config, two_pass=two_pass)
        assert y.shape == (3, 50, n) and y.dtype == dtype
        torch.testing.assert_close(y.double(), dense_forward(x, w, bias, a, b, scale, transposed), **TOL[dtype])
        g = torch.randn(3, 50, n, dtype=dtype)
        gx, u = tk.grad_input(g, w, a, b, scale, transposed, config=config, two_pass=two_pass)
        w_nk = (w.t() if transposed else w).double()
        gx_ref = g.double() @ (w_nk + scale * b.double() @ a.double())
        torch.testing.assert_close(gx.double(), gx_ref, **TOL[dtype])
        torch.testing.assert_close(u.double(), g.double().reshape(-1, n) @ b.double(), **TOL[dtype])


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize(
    ("dtype", "config"), REDUCTION_CASES, ids=[f"{d}-{c.name}".replace("torch.", "") for d, c in REDUCTION_CASES]
)
def test_reduction_kernel_every_config(dtype, config, split):
    """``scale * L.T @ R`` with the rank on either side, mixed fp32/half operands, split over token chunks."""
    lhs, rhs = torch.randn(300, 7, dtype=dtype), torch.randn(300, 41)
    for left, right in ((lhs, rhs), (rhs, lhs)):
        got = tk.tn_matmul(left, right, 2.0, torch.float32, config=config, split=split)
        torch.testing.assert_close(got.double(), 2.0 * left.double().t() @ right.double(), **TOL[dtype])
    # the factor gradients, which chain four reductions, against autograd of the dense formula
    x, w, _, a, b = make((2, 40), 33, 26, 4, dtype, False, bias=False)
    ad, bd = a.double().requires_grad_(), b.double().requires_grad_()
    y = dense_forward(x, w, None, ad, bd, 0.5, False)
    g = torch.randn_like(y)
    ga_ref, gb_ref = torch.autograd.grad(y, (ad, bd), g)
    ga, gb = tk.grad_factors(g.to(dtype), x, a, b, None, 0.5, config=config, split=split)
    torch.testing.assert_close(ga.double(), ga_ref, **TOL[dtype])
    torch.testing.assert_close(gb.double(), gb_ref, **TOL[dtype])


@pytest.mark.parametrize("two_pass", [False, True], ids=["one-pass", "two-pass"])
def test_lsr_forward_both_passes(two_pass):
    a1, a2, b1, b2 = torch.randn(4, 2, 5), torch.randn(4, 3, 6), torch.randn(4, 7, 2), torch.randn(4, 4, 3)
    x = torch.randn(2, 9, 30)
    w = torch.randn(28, 30) / 30**0.5
    y = tk.lsr_forward(x, w, None, a1, a2, b1, b2, 0.3, False, two_pass=two_pass)
    ref = dense_forward(x, w, None, dense_kron_sum(a1, a2), dense_kron_sum(b1, b2), 0.3, False)
    torch.testing.assert_close(y.double(), ref, **TOL[torch.float32])


def test_kron_expand_matches_torch_kron():
    f1, f2 = torch.randn(3, 4, 5), torch.randn(3, 6, 2).transpose(1, 2)  # a strided second factor
    torch.testing.assert_close(tk.kron_expand(f1, f2), dense_kron_sum(f1, f2.contiguous()), atol=1e-5, rtol=1e-5)


def test_no_tokens_gives_empty_outputs():
    x, w, bias, a, b = make((0,), 12, 10, 3, torch.float32, False)
    assert tk.lowrank_forward(x, w, bias, a, b, 1.0, False).shape == (0, 10)
    gx, u = tk.grad_input(torch.zeros(0, 10), w, a, b, 1.0, False)
    assert gx.shape == (0, 12) and u.shape == (0, 3)
    ga, gb = tk.grad_factors(torch.zeros(0, 10), x, a, b, None, 1.0)
    assert torch.equal(ga, torch.zeros_like(a)) and torch.equal(gb, torch.zeros_like(b))


def test_fp32_uses_tf32_only_when_torch_allows_it():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert tk.dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tk.dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# ---- tile configs: the shape key and the deterministic pick ---------------------------------------------------


def test_tile_config_helpers():
    assert [tile_configs.token_bucket(t) for t in (1, 16, 17, 1000, 10**9)] == [1, 16, 32, 1024, 1 << 16]
    assert [tile_configs.block_r(r) for r in (1, 8, 16, 17, 64)] == [16, 16, 16, 32, 64]
    half = tile_configs.fused_configs(torch.bfloat16)
    assert tile_configs.pick_fused(half, 8192, 4096) == half[0]  # a big problem gets the biggest tile
    assert tile_configs.pick_fused(half, 37, 29) == half[-1]  # a tiny one the smallest
    assert tile_configs.pick_fused(half, 100, 300).block_m == 64
    assert tile_configs.fused_configs(torch.float32) is not half
    with pytest.raises(LsrfxError, match="fp32, fp16 or bf16"):
        tile_configs.fused_configs(torch.float64)
    # split-K: about two programs per processor, at least 256 tokens each, never for a full GPU
    assert tile_configs.reduction_splits(tiles=4, tokens=8192, processors=132) == 32
    assert tile_configs.reduction_splits(tiles=4, tokens=1024, processors=132) == 4
    assert tile_configs.reduction_splits(tiles=200, tokens=8192, processors=132) == 1
    assert tile_configs.reduction_splits(tiles=4, tokens=100, processors=132) == 1


# ---- the measured choice (LSRFX_KERNEL=auto), with a fake timer -----------------------------------------------


class FakeTimer:
    """Runs the timed function once and returns the scripted seconds of whichever body it called."""

    def __init__(self, triton: float, reference: float) -> None:
        self.seconds = {"triton": triton, "reference": reference}
        self.timed: list[str] = []
        self.arguments: list[tuple] = []

    def bodies(self):
        def run(name, fn):
            def body(*args):
                self.timed.append(name)
                self.arguments.append(args)
                return fn(*args)
            return body

        reference = lambda x, w, bias, a, b, s, t: dense_forward(x, w, bias, a, b, s, t).to(x.dtype)  # noqa: E731
        return run("triton", tk.lowrank_forward), run("reference", reference)

    def __call__(self, fn) -> float:
        count = len(self.timed)
        fn()
        return self.seconds[self.timed[count]]


def lowrank_args(tokens: int, dtype=torch.float32):
    x, w, bias, a, b = make((tokens,), 24, 20, 4, dtype, False)
    return (x, w, bias, a, b, 0.5, False)


@pytest.mark.parametrize(("triton_s", "reference_s", "winner"), [(1e-3, 2e-3, True), (3e-3, 2e-3, False)])
def test_choice_keeps_the_faster_body_per_bucket(monkeypatch, triton_s, reference_s, winner):
    monkeypatch.delenv("LSRFX_KERNEL", raising=False)
    timer = FakeTimer(triton_s, reference_s)
    chooser = KernelChooser(timer)
    triton_body, reference_body = timer.bodies()
    assert chooser.choose("lowrank", lowrank_args(40), triton_body, reference_body) is winner
    assert timer.timed == ["triton", "reference"]
    # same bucket (33..64 tokens): cached, nothing re-timed
    assert chooser.choose("lowrank", lowrank_args(60), triton_body, reference_body) is winner
    assert len(timer.timed) == 2
    # a new bucket, a new dtype or a new op is timed again
    chooser.choose("lowrank", lowrank_args(70), triton_body, reference_body)
    chooser.choose("lowrank", lowrank_args(40, torch.float16), triton_body, reference_body)
    chooser.choose("other_op", lowrank_args(40), triton_body, reference_body)
    assert len(timer.timed) == 8 and len(chooser.choices) == 4


def test_choice_under_fake_tensors_times_real_tensors_of_the_same_layout(monkeypatch):
    """What ``torch.compile`` tracing looks like to the op body: fake tensors; the timing must use real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    monkeypatch.delenv("LSRFX_KERNEL", raising=False)
    timer = FakeTimer(1e-3, 2e-3)
    chooser = KernelChooser(timer)
    triton_body, reference_body = timer.bodies()
    args = lowrank_args(40)
    args = (args[0], args[1].t().contiguous().t(), *args[2:])  # a column-major weight
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        assert chooser.choose("lowrank", fake, triton_body, reference_body) is True
    for timed in timer.arguments:
        for got, want in zip(timed, args, strict=True):
            if isinstance(want, torch.Tensor):
                assert not is_fake(got)
                assert (got.shape, got.stride(), got.dtype) == (want.shape, want.stride(), want.dtype)


def test_lsrfx_kernel_overrides_the_measurement(monkeypatch):
    timer = FakeTimer(1e-3, 2e-3)
    chooser = KernelChooser(timer)
    triton_body, reference_body = timer.bodies()
    monkeypatch.setenv("LSRFX_KERNEL", "reference")
    assert chooser.choose("lowrank", lowrank_args(40), triton_body, reference_body) is False
    monkeypatch.setenv("LSRFX_KERNEL", "triton")
    assert chooser.choose("lowrank", lowrank_args(40), triton_body, reference_body) is True
    assert timer.timed == []
    monkeypatch.setenv("LSRFX_KERNEL", "cublas")
    with pytest.raises(LsrfxError, match="LSRFX_KERNEL='cublas'"):
        chooser.choose("lowrank", lowrank_args(40), triton_body, reference_body)


def test_dispatch_choose_asks_the_chooser_only_when_triton_can_run(monkeypatch):
    monkeypatch.delenv("LSRFX_KERNEL", raising=False)
    timer = FakeTimer(3e-3, 2e-3)
    triton_body, reference_body = timer.bodies()
    args = lowrank_args(40)
    assert dispatch.choose("lowrank", args, triton_body, reference_body) is False  # CPU, not forced
    with force_triton():
        assert dispatch.choose("lowrank", args, triton_body, reference_body) is True  # forced, untimed
    with force_triton(KernelChooser(timer)):
        assert dispatch.choose("lowrank", args, triton_body, reference_body) is False  # timed: reference faster
    assert timer.timed == ["triton", "reference"]


# --- the torch reference bodies (what Inductor compiles off CUDA), against dense math and autograd ------------


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_kron_sum_and_its_gradient_match_torch_kron(shape):
    """Both layouts: a wide sum (A-like, fewer rows than columns) is formed row-major, a tall one (B-like) as its
    transpose; values, gradients and the fake function's strides (``opcheck``) agree with dense math either way."""
    from lsrfx.kernels.kron_sum import kron_sum_grads, kron_sum_reference

    p = torch.randn(3, 2, 5, dtype=torch.float64)
    q = torch.randn(3, 4, 3, dtype=torch.float64)
    if shape == "tall":
        p, q = p.mT.contiguous(), q.mT.contiguous()
    p.requires_grad_(), q.requires_grad_()
    dense = dense_kron_sum(p, q)
    op_out = torch.ops.lsrfx.kron_sum(p, q)
    assert op_out.is_contiguous() == (shape == "wide") and op_out.t().is_contiguous() == (shape == "tall")
    torch.library.opcheck(torch.ops.lsrfx.kron_sum, (p, q))
    torch.testing.assert_close(kron_sum_reference(p, q), dense)
    g = torch.randn_like(dense)
    want = torch.autograd.grad(dense, (p, q), g)
    got = kron_sum_grads(g, p.detach(), q.detach())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert kron_sum_grads(g, p, q, need_p=False)[0] is None and kron_sum_grads(g, p, q, need_q=False)[1] is None
    torch.testing.assert_close(torch.autograd.grad(torch.ops.lsrfx.kron_sum(p, q), (p, q), g), want)  # the op
    from lsrfx.kernels.kron_sum import KronSum  # the eager function over the op's bodies: same layout and values

    eager_out = KronSum.apply(p, q)
    assert eager_out.stride() == op_out.stride()
    torch.testing.assert_close(eager_out, dense)
    torch.testing.assert_close(torch.autograd.grad(eager_out, (p, q), g), want)
    # the eager form (one matmul over the terms): same values, and autograd through it gives the same gradients
    from lsrfx.kernels.kron_sum import kron_sum_product

    torch.testing.assert_close(kron_sum_product(p, q), dense)
    torch.testing.assert_close(torch.autograd.grad(kron_sum_product(p, q), (p, q), g), want)


def test_kron_sum_of_stacked_layers_is_each_layer_alone():
    """The pass calls the op on factors stacked across layers: each batch element, and its gradients, are what
    that layer's sum alone gives, in both layouts."""
    for p, q in [(torch.randn(3, 2, 5), torch.randn(3, 4, 3)), (torch.randn(3, 5, 2), torch.randn(3, 3, 4))]:
        ps = torch.stack([p, 2 * p]).double().requires_grad_()
        qs = torch.stack([q, -q]).double().requires_grad_()
        out = torch.ops.lsrfx.kron_sum(ps, qs)
        torch.library.opcheck(torch.ops.lsrfx.kron_sum, (ps, qs))
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (ps, qs), g)
        for i in range(2):
            pi, qi = ps[i].detach().requires_grad_(), qs[i].detach().requires_grad_()
            dense = dense_kron_sum(pi, qi)
            torch.testing.assert_close(out[i], dense)
            for a, b in zip((got[0][i], got[1][i]), torch.autograd.grad(dense, (pi, qi), g[i]), strict=True):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("basis", ["rbf", "centred", "mixed"])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_rbf_bank_op_and_its_gradient_match_the_reference(basis, g):
    """``lsrfx::rbf_bank`` (its eager-written body and its backward op) and the eager ``RbfBank`` function against
    autograd through the plain reference, with and without leading batch dimensions, and ``opcheck`` (fake
    function, autograd registration)."""
    from lsrfx.kernels.rbf_bank import RbfBank, rbf_bank_reference

    for lead in ((), (3,)):
        z = torch.randn(*lead, 40, g, dtype=torch.float64, requires_grad=True)
        c = torch.randn(*lead, 6, g, dtype=torch.float64, requires_grad=True)
        lg = (0.5 * torch.randn(*lead, 6, dtype=torch.float64)).requires_grad_()
        w = torch.randn(*lead, *((5, 6) if basis == "mixed" else (6,)), dtype=torch.float64, requires_grad=True)
        want = rbf_bank_reference(z, c, lg, w, basis)
        grad = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, (z, c, lg, w), grad)
        for out in (torch.ops.lsrfx.rbf_bank(z, c, lg, w, basis), RbfBank.apply(z, c, lg, w, basis)):
            torch.testing.assert_close(out, want)
            for a, b in zip(torch.autograd.grad(out, (z, c, lg, w), grad), want_grads, strict=True):
                torch.testing.assert_close(a, b)
        torch.library.opcheck(torch.ops.lsrfx.rbf_bank, (z, c, lg, w, basis))


class CountMapPasses(torch.utils._python_dispatch.TorchDispatchMode):
    """Names the operations that read or write a tensor of ``numel`` elements (views excluded): the passes over a
    bank's ``m x n`` maps."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.passes = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = torch.utils._pytree.tree_leaves((args, kwargs, out))
        if not func._schema._is_view_op() and any(isinstance(t, torch.Tensor) and t.numel() == self.numel
                                                  for t in tensors):
            self.passes.append(func.__name__)
        return out


@pytest.mark.parametrize(("basis", "forward_passes", "feature_passes", "backward_passes"),
                         [("rbf", 7, 6, 7), ("centred", 9, 6, 10), ("mixed", 7, 6, 7)])
def test_rbf_bank_bodies_pass_over_the_feature_map_few_times(basis, forward_passes, feature_passes, backward_passes):
    """The bank's eager bodies touch the ``m x n`` maps as few times as their arithmetic allows (each pass costs a
    kernel launch and a trip through memory, most of the bank's time): a difference and a fused multiply-add per
    latent coordinate, one scaling, one exponential and the weighing in the forward; the features for the backward
    the same with the exponent kept (one exponential into a fresh map, no rescaled copy of the exponent); in the
    backward the per-RBF factors of the exponent's gradient go onto the small results, not onto the map."""
    from lsrfx.kernels.rbf_bank import rbf_bank_backward_values, rbf_bank_features, rbf_bank_forward

    z, c, lg = torch.randn(40, 2), torch.randn(6, 2), torch.zeros(6)
    w = torch.randn(5, 6) if basis == "mixed" else torch.randn(6)
    grad = torch.randn(w.shape[0], 40)
    with CountMapPasses(6 * 40) as forward:
        rbf_bank_forward(z, c, lg, w, basis)
    with CountMapPasses(6 * 40) as features:
        bank_features = rbf_bank_features(z, c, lg)
    with CountMapPasses(6 * 40) as backward:
        rbf_bank_backward_values(grad, z, c, lg, w, basis, bank_features)
    counts = len(forward.passes), len(features.passes), len(backward.passes)
    assert counts == (forward_passes, feature_passes, backward_passes), (forward.passes, features.passes,
                                                                         backward.passes)


def test_factor_ops_are_opaque_to_inductor(uncached_compile):
    """``kron_sum`` and ``rbf_bank`` and their backward ops reach Inductor's output code as calls, with no code
    generated for their bodies (what structured factors used to add to a cold compile)."""
    from torch._inductor.utils import run_and_get_code

    z, c, lg, w = torch.randn(40, 2), torch.randn(6, 2), torch.zeros(6), torch.randn(6)
    p, q = torch.randn(3, 2, 5), torch.randn(3, 4, 3)
    leaves = [t.requires_grad_() for t in (z, c, lg, w, p, q)]

    def loss(z, c, lg, w, p, q):
        return torch.ops.lsrfx.rbf_bank(z, c, lg, w, "centred").square().sum() + torch.ops.lsrfx.kron_sum(p, q).sum()

    compiled = torch.compile(loss, backend="inductor")
    _, code = run_and_get_code(lambda: compiled(*leaves).backward())
    text = "\n".join(code)
    for op in ("rbf_bank.default", "rbf_bank_backward.default", "kron_sum.default", "kron_sum_backward.default"):
        assert f"torch.ops.lsrfx.{op}" in text, op
    assert "exp(" not in text  # the RBF features are the op's own work, not generated code
    want = torch.autograd.grad(loss(*leaves), leaves)
    for leaf, expected in zip(leaves, want, strict=True):
        torch.testing.assert_close(leaf.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b_layout", ["row-major", "column-major"])
@pytest.mark.parametrize("transposed", [False, True])
def test_compose_gradients_match_dense_autograd_in_the_factors_layout(transposed, b_layout):
    """``compose``'s backward gives autograd's gradients of the dense ``W0 + s*B@A``, and ``grad_B`` in ``B``'s own
    layout (a ``B`` formed as ``B.T``, as LSR-Adapt's and GenLoRA's are, gets a column-major gradient)."""
    from lsrfx.kernels.compose import compose_reference

    n, k, r, scale = 10, 12, 3, 0.7
    w0 = torch.randn(k, n) if transposed else torch.randn(n, k)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b_storage = torch.randn(r, n, dtype=torch.float64) if b_layout == "column-major" else None
    b = (b_storage.t() if b_storage is not None else torch.randn(n, r, dtype=torch.float64)).requires_grad_()
    w0 = w0.double()
    g = torch.randn_like(w0)
    want = torch.autograd.grad(compose_reference(w0, a, b, scale, transposed), (a, b), g)
    got = torch.autograd.grad(torch.ops.lsrfx.compose(w0, a, b, scale, transposed), (a, b), g)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y)
    assert got[1].stride() == b.stride()
    torch.library.opcheck(torch.ops.lsrfx.compose, (w0, a, b, scale, transposed))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_reference_ops_match_dense_autograd(transposed, base_dtype, x_grad):
    """The reference path (saved ``v``, scale folded into ``addmm``) gives the dense formula's output and the
    gradients autograd computes for it, for both layouts, fp32 factors on a bf16 base, with or without grad_x."""
    k, n, r, scale = 12, 10, 3, 0.7
    x = torch.randn(2, 5, k).to(base_dtype).requires_grad_(x_grad)
    w = (torch.randn(n, k) / k**0.5).to(base_dtype)
    w = w.t().contiguous() if transposed else w
    bias = torch.randn(n).to(base_dtype).requires_grad_()
    a, b = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    leaves = [t for t in (x, bias, a, b) if t.requires_grad]

    y, v = torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, scale, transposed)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    # dense reference in float64: x @ (W + s B A).T + bias
    w_nk = (w.t() if transposed else w).double()
    d_leaves = [t.detach().double().requires_grad_() for t in leaves]
    dx, dbias, da, db = ([d_leaves.pop(0)] if x_grad else [x.double()]) + d_leaves
    ref = dx @ (w_nk + scale * db @ da).t() + dbias
    want = torch.autograd.grad(ref, [t for t in (dx, dbias, da, db) if t.requires_grad], g.double())
    tol = TOL[torch.float32] if base_dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    assert y.dtype == base_dtype and v.dtype == a.dtype and v.shape == (2, 5, r)
    torch.testing.assert_close(y.double(), ref, **tol)
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), exp, **tol)


@pytest.mark.parametrize("b_layout", ["row-major", "column-major"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
def test_merged_linear_matches_dense_autograd(transposed, b_layout, x_grad):
    """``merged_linear`` (``W0 + s*B@A`` for the matmuls, rank-``r`` factor gradients) gives the dense formula's
    output and autograd's gradients for both weight layouts, with or without grad_x and a trainable ``W0``;
    ``grad_B`` comes in ``B``'s layout; its fake function and autograd registration pass ``opcheck``."""
    k, n, r, scale = 12, 10, 3, 0.7
    x = torch.randn(2, 5, k, dtype=torch.float64, requires_grad=x_grad)
    w = torch.randn(k, n, dtype=torch.float64) if transposed else torch.randn(n, k, dtype=torch.float64)
    w.requires_grad_(x_grad)  # a trainable base (unusual) takes the dense gradient
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, dtype=torch.float64, requires_grad=True)
    b = (torch.randn(r, n, dtype=torch.float64).t() if b_layout == "column-major"
         else torch.randn(n, r, dtype=torch.float64)).requires_grad_()
    leaves = [t for t in (x, w, bias, a, b) if t.requires_grad]
    y = torch.ops.lsrfx.merged_linear(x, w, bias, a, b, scale, transposed)
    ref = x @ ((w.t() if transposed else w) + scale * b @ a).t() + bias
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(y, leaves, g), torch.autograd.grad(ref, leaves, g)
    for name, p_got, p_want in zip(("x", "w", "bias", "a", "b")[-len(leaves):], got, want, strict=True):
        torch.testing.assert_close(p_got, p_want, msg=name)
    assert got[-1].stride() == b.stride()
    torch.library.opcheck(torch.ops.lsrfx.merged_linear, (x, w, bias, a, b, scale, transposed))
    torch.library.opcheck(torch.ops.lsrfx.merged_linear, (x.detach(), w.detach(), None, a, b, scale, transposed))


def test_lsr_linear_reference_matches_dense_autograd():
    """``lsr_linear`` returns the dense ``A``, ``B`` it formed and ``v``; its factor gradients are autograd's."""
    factors = [torch.randn(2, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.randn(2, 2, 2)]
    factors = [f.double().requires_grad_() for f in factors]
    x, w, bias = torch.randn(7, 12, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64), None
    y, v, a, b = torch.ops.lsrfx.lsr_linear(x, w, bias, *factors, 0.5, False)
    a_ref, b_ref = dense_kron_sum(*factors[:2]), dense_kron_sum(*factors[2:])
    ref = x @ (w + 0.5 * b_ref @ a_ref).t()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(v, x @ a_ref.t())
    assert not (v.requires_grad or a.requires_grad or b.requires_grad)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, factors, g), torch.autograd.grad(ref, factors, g), strict=True):
        torch.testing.assert_close(got, want)


def test_compiled_fused_layer_launches():
    """One compiled fused layer, forward + backward with the input gradient: exactly the eight BLAS calls of the
    factored form (``x @ W.T``, ``x @ A.T``, ``v @ B.T``; ``grad @ W``, ``grad @ B``, ``u @ A``, ``u.T @ x``,
    ``grad.T @ v``: the backward does not recompute ``x @ A.T``), and the scale costs no kernel of its own (the
    one generated kernel is the forward's adapter add)."""
    import collections

    torch._dynamo.reset()
    k, n, r = 32, 24, 4
    x = torch.randn(64, k, requires_grad=True)
    w, bias = torch.randn(n, k), torch.randn(n)
    a, b = torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    g = torch.randn(64, n)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True, "fx_graph_cache": False}):
        f = torch.compile(lambda x, a, b: torch.ops.lsrfx.lowrank_linear(x, w, bias, a, b, 0.5, False)[0])
        for _ in range(2):
            f(x, a, b).backward(g)
        with torch.profiler.profile() as prof:
            f(x, a, b).backward(g)
    names = collections.Counter(e.name for e in prof.events())
    assert names["aten::mm"] + names["aten::addmm"] == 8, names
    assert sum(c for name, c in names.items() if "cpp_fused" in name) == 1, names
    torch._dynamo.reset()


@pytest.mark.parametrize(("d_out", "d_in", "transposed", "blocked"), [
    (12, 12, False, False), (8, 12, False, False), (12, 8, True, False),
    (130, 12, False, True), (12, 130, True, True)])  # W0 in cache blocks (of 64, a short last one) one way
def test_condlora_linear_op_matches_dense_math(d_out, d_in, transposed, blocked, monkeypatch):
    """``lsrfx::condlora_linear`` against CondLoRA's layer written densely (``A = C_A W0^T`` or ``C_A' W0``,
    ``B = W0 C_B^T``) in float64, gradients by autograd through the dense form, and ``opcheck`` (fake functions,
    autograd registration); ``blocked``: a non-square ``W0`` taken in cache blocks by both products along its long
    axis (:func:`lsrfx.kernels.condlora_linear.products_sharing_w`)."""
    from lsrfx.kernels import condlora_linear
    from lsrfx.kernels.condlora_linear import CondLoRALinear

    if blocked:
        monkeypatch.setattr(condlora_linear, "CACHE_BLOCK_BYTES", 1)

    r, square = 3, d_in == d_out
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    stored = w.t().contiguous() if transposed else w
    x = torch.randn(2, 5, d_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    c_a = torch.randn(r, d_in if square else d_out, dtype=torch.float64, requires_grad=True)
    c_b = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    a = c_a @ (w.t() if square else w)
    b = w @ c_b.t()
    want = x @ w.t() + bias + 0.5 * (x @ a.t()) @ b.t()
    grad = torch.randn_like(want)
    leaves = (x, bias, c_a, c_b)
    want_grads = torch.autograd.grad(want, leaves, grad)
    args = (x, stored, bias, c_a, c_b, 0.5, square, transposed)
    for out in (torch.ops.lsrfx.condlora_linear(*args)[0], CondLoRALinear.apply(*args)):
        torch.testing.assert_close(out, want)
        for g, expected in zip(torch.autograd.grad(out, leaves, grad), want_grads, strict=True):
            torch.testing.assert_close(g, expected)
    torch.library.opcheck(torch.ops.lsrfx.condlora_linear, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_condlora_blocked_products_round_half_precision_once(dtype, monkeypatch):
    """In half precision the products sharing ``W0`` block by block (64 blocks here) sum their blocks in float32 and
    round once, as one product would: their error against float64 stays within twice the one product's (summed in
    the half dtype, each block's rounding adds up to several times it)."""
    from lsrfx.kernels import condlora_linear

    monkeypatch.setattr(condlora_linear, "CACHE_BLOCK_BYTES", 1)
    torch.manual_seed(0)
    s, w, c = torch.randn(20, 64, dtype=dtype), torch.randn(4096, 64, dtype=dtype), torch.randn(3, 4096, dtype=dtype)
    y, z = condlora_linear.products_sharing_w(s, w, c)
    exact = c.double() @ w.double()
    one_product = ((c @ w).double() - exact).abs().max()
    assert z.dtype == dtype and (z.double() - exact).abs().max() <= 2 * one_product
    torch.testing.assert_close(y, s @ w.t())
