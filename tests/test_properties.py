"""Property-based sweep over every method, plus the non-finite cases.

For random layer shapes, ranks, Kronecker factorisations, dtypes, layer kinds (``nn.Linear`` with/without bias,
GPT-2 ``Conv1D``) and input ranks, ``adapt`` must either give outputs equal to the dense float64 reference
``x @ (W0 + dW).T + b`` (``dW`` rebuilt here from the adapter's parameters with independent formulas) and a
``merge`` that reproduces them exactly, or raise :class:`LsrfxError` naming the layer when an independent
feasibility rule says the configuration is impossible, leaving the model untouched. Adapter parameters are
randomised so that ``dW`` is as large as ``W0``: a dropped, transposed or mis-scaled update fails the tolerance.

Tolerance (documented): ``|y - y_ref| <= k * eps(dtype) * (|x| @ (|W0| + |dW|).T + |b|) + tiny`` elementwise, a
rounding-error bound for one cast of ``W0 + dW`` to the weight dtype, the matmul and the output cast; ``k = 4`` for
bf16/fp16 (largest seen over ~450 random examples: 2.2 for both) and ``k = 8`` for fp32/fp64 (largest seen: 3.3,
from the factor arithmetic). ``test_tolerance_catches_wrong_updates`` shows it still rejects a dropped, transposed
or 20 %-off update at every dtype.

Non-finite policy (what users get): ``adapt`` refuses a target layer whose base weight holds NaN/inf (error names
the layer and counts); NaN/inf inputs propagate to the outputs and adapter gradients of the rows they touch (never
masked, other rows unaffected); ``merge`` refuses to fold a non-finite ``W0 + dW`` (diverged adapter, fp16
overflow, corrupted base) and says which, leaving the model adapted.

Hypothesis runs derandomised (fixed examples, no database) so CI is reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

import lsrfx
from lsrfx.errors import LsrfxError
from lsrfx.parametrization import adapted_layers

from conftest import TINY_OPTIONS, tiny_mlp
from references import reference_delta, reference_for

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SWEEP = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---------------------------------------------------------------- independent references


def divisor_pairs(d: int) -> list[tuple[int, int]]:
    return [(d // f, f) for f in range(1, d + 1) if d % f == 0]


def most_balanced(d: int) -> tuple[int, int]:
    """Brute force: the ``(f1, f2)``, ``f1 >= f2``, with ``f1 * f2 == d`` and the smallest ``f1 - f2``."""
    return min((p for p in divisor_pairs(d) if p[0] >= p[1]), key=lambda p: p[0] - p[1])


def feasible(method: str, opts: dict, d_out: int, d_in: int) -> bool:
    """Whether ``method`` with ``opts`` can adapt a ``d_out x d_in`` weight, decided without lsrfx."""
    if method != "lsr":
        return 1 <= opts["r"] <= min(d_in, d_out)
    r1, r2 = opts["r1"], opts["r2"]
    if r1 < 1 or r2 < 1 or opts["separation_rank"] < 1:
        return False
    splits = []
    for d, override in ((d_in, opts.get("in_factors")), (d_out, opts.get("out_factors"))):
        split = most_balanced(d) if override is None else override
        if split[0] * split[1] != d or min(split) < 2:
            return False
        splits.append(split)
    (a1, a2), (b1, b2) = splits
    return r1 <= min(a1, b1) and r2 <= min(a2, b2) and r1 * r2 <= min(d_in, d_out)


def centring_error(adapter: nn.Module, w0: Tensor) -> Tensor | None:
    """Extra rounding error of GenLoRA's centred ``dW`` (``None`` for every other method): its mean-free features
    are small differences of RBF values near 1 (cancellation), so the error of ``dW``, computed at the adapter's
    (master) precision, scales with the uncentred features: ``8 eps 2 |scale| (|w^B| Phi_B).T @ (|w^A| Phi_A)``."""
    if type(adapter).__name__ != "GenLoRAAdapter" or adapter.basis != "centred":
        return None
    p = {n: t.detach().double() for n, t in adapter.named_parameters()}

    def features(z: Tensor, c: Tensor, log_gamma: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(c, z) ** 2 * log_gamma.exp()[:, None])

    a = p["amplitude_A"].abs()[:, None] * features(p["Z_A"], p["centres_A"], p["log_gamma_A"])
    b = (p["amplitude_B"].abs()[:, None] * features(p["Z_B"], p["centres_B"], p["log_gamma_B"])).t()
    eps = torch.finfo(adapter.amplitude_A.dtype).eps
    return 8 * eps * 2 * abs(adapter.scale) * (b @ a)


def randomise(model: nn.Module, method: str, gen: torch.Generator) -> None:
    """Random adapter parameters, with the parameter ``dW`` is linear in rescaled so ``||dW|| ~ ||W0||``."""
    done: set[int] = set()
    with torch.no_grad():
        for _, module, param in adapted_layers(model):
            adapter = param.adapter
            for p in adapter.parameters():
                if id(p) not in done:
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            w0 = dense_w0(module)
            dw = reference_delta(method, adapter, w0)
            lin = adapter.get_parameter(reference_for(method).linear_in_dw)
            if id(lin) not in done and dw.norm() > 0:
                lin.mul_(float(w0.double().norm() / dw.norm()))
            done.update(id(p) for p in adapter.parameters())


def dense_w0(module: nn.Module) -> Tensor:
    """The frozen base weight in ``d_out x d_in`` layout."""
    w = module.parametrizations["weight"].original
    return w.t() if isinstance(module, Conv1D) else w


class Blocks(nn.Module):
    """``n`` blocks each holding one layer named ``proj`` (so CondLoRA shares one pair across blocks)."""

    def __init__(self, n: int, kind: str, d_in: int, d_out: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": make_layer(kind, d_in, d_out)}) for _ in range(n))


def make_layer(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "conv1d":
        layer = Conv1D(d_out, d_in)  # GPT-2 layout: weight (d_in, d_out)
        nn.init.normal_(layer.bias)
        return layer
    return nn.Linear(d_in, d_out, bias=kind == "linear")


def within(y: Tensor, ref: Tensor, tol: Tensor) -> bool:
    return bool(((y.double() - ref).abs() <= tol).all())


def tolerance(x: Tensor, w: Tensor, dw: Tensor, bias: Tensor | None, dtype: torch.dtype,
              dw_error: Tensor | None = None) -> Tensor:
    """Rounding tolerance of ``x @ (W + dW).T + b`` in ``dtype``, plus ``|x| @ dw_error.T`` for an extra error bound
    of ``dW`` itself (:func:`centring_error`)."""
    bound = x.abs() @ (w.abs() + dw.abs()).t()
    if bias is not None:
        bound = bound + bias.abs()
    eps = torch.finfo(dtype).eps
    extra = 0 if dw_error is None else x.abs() @ dw_error.t()
    return (4 if eps > 1e-4 else 8) * eps * bound + extra + 1e-30


# ---------------------------------------------------------------- the sweep


RARE = 7  # a "mode" draw of 0..RARE: the top value picks the edge case, the rest the common case


def draw_dim(data: st.DataObject, label: str) -> tuple[int, tuple[int, int] | None]:
    """``(d, override)``: mostly ``d = p*q`` (Kronecker-splittable) with no override; sometimes an explicit valid
    split, any size 1..40 (primes too), or an override that is wrong (product != d, or a factor of 1)."""
    p, q = data.draw(st.integers(2, 6), label=f"{label} p"), data.draw(st.integers(2, 6), label=f"{label} q")
    mode = data.draw(st.integers(0, RARE), label=f"{label} mode")
    if mode == RARE - 2:
        return p * q, (p, q)
    if mode == RARE - 1:
        return data.draw(st.integers(1, 40), label=label), None
    if mode == RARE:
        return p * q, data.draw(st.sampled_from([(p, q + 1), (1, p * q), (p * q, 1)]), label=f"{label} bad split")
    return p * q, None


def draw_rank(data: st.DataObject, label: str, common: int, rare: int) -> int:
    """Mostly ``1..common``; sometimes ``0..rare`` (zero and too-large ranks)."""
    if data.draw(st.integers(0, 3), label=f"{label} mode") == 3:
        return data.draw(st.integers(0, rare), label=label)
    return data.draw(st.integers(1, common), label=label)


def sweep(method: str, data: st.DataObject) -> None:
    d_in, in_factors = draw_dim(data, "d_in")
    d_out, out_factors = draw_dim(data, "d_out")
    kind = data.draw(st.sampled_from(["linear", "linear_nobias", "conv1d"]), label="kind")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n_blocks = data.draw(st.integers(1, 2), label="n_blocks")
    lead = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3), label="leading dims")
    if method == "lsr":
        opts = {"r1": draw_rank(data, "r1", 2, 4), "r2": draw_rank(data, "r2", 2, 4),
                "separation_rank": data.draw(st.integers(1, 3), label="S"),
                "alpha": data.draw(st.sampled_from([1.0, 4.0]), label="alpha"),
                "in_factors": in_factors, "out_factors": out_factors}
    else:
        opts = {"r": draw_rank(data, "r", 4, 40), "alpha": data.draw(st.sampled_from([1.0, 8.0]), label="alpha")}
        if method == "genlora":
            opts["group_size"] = data.draw(st.integers(1, 3), label="group_size")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)

    torch.manual_seed(seed)
    model = Blocks(n_blocks, kind, d_in, d_out).to(dtype)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    ok = feasible(method, opts, d_out, d_in)
    if not ok:
        with pytest.raises(LsrfxError, match=r"blocks\.0\.proj|must be >= 1"):
            lsrfx.adapt(model, method=method, targets=["proj"], **opts)
        assert not any(parametrize.is_parametrized(m) for m in model.modules()), "failed adapt changed the model"
        after = dict(model.named_parameters())
        assert set(after) == set(before)
        for n, (value, req) in before.items():
            assert torch.equal(after[n], value) and after[n].requires_grad == req
        return

    lsrfx.adapt(model, method=method, targets=["proj"], **opts)
    randomise(model, method, gen)
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64).to(dtype)
    outputs = []
    for block in model.blocks:
        layer = block["proj"]
        adapter = layer.parametrizations["weight"][0].adapter
        if dtype in (torch.bfloat16, torch.float16):
            assert all(p.dtype == torch.float32 for p in adapter.parameters()), "half base needs fp32 masters"
        w0 = dense_w0(layer).double()
        dw = reference_delta(method, adapter, dense_w0(layer))
        bias = None if layer.bias is None else layer.bias.detach().double()
        x64 = x.double()
        ref = x64 @ (w0 + dw).t() + (0 if bias is None else bias)
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*lead, d_out) and y.dtype == dtype
        tol = tolerance(x64, w0, dw, bias, dtype, centring_error(adapter, dense_w0(layer)))
        assert within(y, ref, tol)
        outputs.append((ref, tol))

    lsrfx.merge(model)  # the merged weight W0 + dW meets the same reference (the adapted layer never formed it)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        for block, (ref, tol) in zip(model.blocks, outputs, strict=True):
            assert block["proj"].weight.dtype == dtype
            assert within(block["proj"](x), ref, tol)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
@SWEEP
@given(data=st.data())
def test_sweep_matches_dense_reference(method: str, data: st.DataObject) -> None:
    sweep(method, data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_tolerance_catches_wrong_updates(method: str, dtype: torch.dtype) -> None:
    """The sweep's tolerance has power at every dtype: a dropped, transposed or 20 %-off update fails it."""
    torch.manual_seed(0)
    model = Blocks(1, "linear", 12, 12).to(dtype)
    lsrfx.adapt(model, method=method, targets=["proj"], **TINY_OPTIONS[method])
    randomise(model, method, torch.Generator().manual_seed(0))
    layer = model.blocks[0]["proj"]
    w0 = dense_w0(layer).double()
    dw = reference_delta(method, layer.parametrizations["weight"][0].adapter, dense_w0(layer))
    x = torch.randn(32, 12, dtype=dtype).double()  # 32 rows: a 20 % error shows in some row at every dtype
    b = layer.bias.detach().double()
    tol = tolerance(x, w0, dw, b, dtype, centring_error(layer.parametrizations["weight"][0].adapter, dense_w0(layer)))
    with torch.no_grad():
        assert within(layer(x.to(dtype)), x @ (w0 + dw).t() + b, tol)
    for wrong in (w0, w0 + dw.t(), w0 + 0.8 * dw):
        assert not within(x @ (w0 + dw).t() + b, x @ wrong.t() + b, tol)


def test_feasibility_rule_is_not_trivial() -> None:
    """The independent rule both accepts and rejects LSR configurations (else the sweep tests one branch)."""
    assert feasible("lsr", {"r1": 2, "r2": 2, "separation_rank": 1}, 768, 768)
    assert not feasible("lsr", {"r1": 2, "r2": 2, "separation_rank": 1}, 768, 13)
    assert most_balanced(768) == (32, 24) and most_balanced(13) == (13, 1)


# ---------------------------------------------------------------- non-finite inputs and weights


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapt_refuses_nonfinite_base_weight(method: str, bad: float, dtype: torch.dtype) -> None:
    model = tiny_mlp().to(dtype)
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    with pytest.raises(LsrfxError, match=r"layer '2' \(weight 8 x 10.*1 non-finite base weight"):
        lsrfx.adapt(model, method=method, targets=["0", "2"], **TINY_OPTIONS[method])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_adapt_refuses_fp16_overflow() -> None:
    """A weight that overflows when cast to fp16 becomes inf: reported at adapt, not trained on."""
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 1e5
    model = model.half()
    with pytest.raises(LsrfxError, match=r"layer '0'.*0 NaN, 1 inf.*65504"):
        lsrfx.adapt(model, method="lora", targets=["0"], r=2)


@pytest.mark.parametrize("method, compiled", [*((m, False) for m in lsrfx.METHODS), ("lsr", True), ("lora", True)])
def test_nonfinite_inputs_propagate(method: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager, and through torch.compile with the lsrfx pass forced to fuse the adapted linear."""
    monkeypatch.setenv("LSRFX_FUSE", "always")
    model = tiny_mlp()
    lsrfx.adapt(model, method=method, targets=["0", "2"], **TINY_OPTIONS[method])
    randomise(model, method, torch.Generator().manual_seed(1))
    x = torch.randn(5, 12)
    clean = model(x).detach()
    x[1, 4] = math.nan
    x[3, 0] = math.inf
    first = torch.compile(model[0]) if compiled else model[0]
    hidden = first(x)
    y = model[2](model[1](hidden))
    assert torch.isnan(y[1]).all(), "a NaN input must poison its row's outputs"
    assert not torch.isfinite(hidden[3]).any(), "an inf input must not be masked by the adapted layer"
    if compiled:
        graphs = str(lsrfx.explain(model[0], x, graphs=True))
        # Off CUDA, LSR's layer is lowrank_linear fed by kron_sum ops (lsr_linear fuses them on CUDA).
        assert "lsrfx.lowrank_linear" in graphs and ("lsrfx.kron_sum" in graphs) == (method == "lsr")
    tol = 1e-5 if compiled else 0.0
    torch.testing.assert_close(y[[0, 2, 4]], clean[[0, 2, 4]], rtol=tol, atol=tol)
    y.sum().backward()
    grads = [p.grad for p in lsrfx.parametrization.adapter_parameters(model).values()]
    assert any(g is not None and torch.isnan(g).any() for g in grads), "NaN inputs must reach adapter grads"


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_merge_refuses_diverged_adapter(method: str) -> None:
    model = tiny_mlp()
    lsrfx.adapt(model, method=method, targets=["0", "2"], **TINY_OPTIONS[method])
    randomise(model, method, torch.Generator().manual_seed(2))
    param = next(iter(model[2].parametrizations["weight"][0].adapter.parameters()))
    with torch.no_grad():
        param.view(-1)[0] = math.nan
    assert torch.isnan(model(torch.randn(3, 12))).any(), "a NaN adapter must show in the outputs"
    with pytest.raises(LsrfxError, match=r"layer\(s\) '2' \(\d+ entries, from the adapter update\)"):
        lsrfx.merge(model)
    assert parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[2]), "model changed"


def test_merge_refuses_corrupted_base_and_fp16_overflow() -> None:
    model = tiny_mlp()
    lsrfx.adapt(model, method="lora", targets=["0", "2"], r=2)
    with torch.no_grad():
        model[0].parametrizations["weight"].original[0, 0] = math.inf  # e.g. a bad base checkpoint loaded later
    with pytest.raises(LsrfxError, match=r"'0' \(1 entries, from the base weight\)"):
        lsrfx.merge(model)

    model = tiny_mlp().half()
    lsrfx.adapt(model, method="lora", targets=["2"], r=2)
    with torch.no_grad():  # fp32 masters are fine; their delta overflows fp16 when composed
        model[2].parametrizations["weight"][0].adapter.lora_B.fill_(1e3)
        model[2].parametrizations["weight"][0].adapter.lora_A.fill_(1e3)
    assert not torch.isfinite(model[2].weight).all()
    with pytest.raises(LsrfxError, match=r"'2' \(80 entries, from the adapter update\).*overflows"):  # all 8 x 10
        lsrfx.merge(model)
