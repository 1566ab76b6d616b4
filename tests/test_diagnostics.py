"""``lsrfx.diagnostics``: the effective rank of a matrix and of every adapted layer's update, and its column in
``lsrfx.summary``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.diagnostics import delta_effective_ranks, effective_rank, low_rank_effective_rank
from lsrfx.parametrization import adapted_layers

from conftest import TINY_OPTIONS, tiny_bert, tiny_gpt2, tiny_mlp


def independent_effective_rank(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.detach().double())
    if s.sum() == 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def test_effective_rank_of_known_matrices() -> None:
    for n in (1, 3, 17):
        assert math.isclose(effective_rank(torch.eye(n)), n, rel_tol=1e-12)
    u, v = torch.randn(7, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    assert math.isclose(effective_rank(u @ v), 1.0, rel_tol=1e-9)
    assert effective_rank(torch.zeros(4, 6)) == 0.0
    assert math.isclose(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))), 2.0, rel_tol=1e-12)
    assert math.isclose(effective_rank(torch.diag(torch.tensor([3.0, 1.0]))),  # p = (3/4, 1/4)
                        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel_tol=1e-12)
    m = torch.randn(9, 4, dtype=torch.float16)
    assert math.isclose(effective_rank(m), independent_effective_rank(m.float()), rel_tol=1e-9)
    assert math.isnan(effective_rank(torch.tensor([[math.inf, 0.0], [0.0, 1.0]])))
    with pytest.raises(lsrfx.LsrfxError, match="2-D"):
        effective_rank(torch.ones(2, 2, 2))


def test_low_rank_route_equals_the_dense_svd() -> None:
    a, b = torch.randn(5, 40), torch.randn(30, 5)
    assert math.isclose(low_rank_effective_rank(a, b), independent_effective_rank(b.double() @ a.double()),
                        rel_tol=1e-9)
    a[2] = 0  # rank 4 < r
    assert math.isclose(low_rank_effective_rank(a, b), independent_effective_rank(b.double() @ a.double()),
                        rel_tol=1e-9)
    assert low_rank_effective_rank(a, torch.zeros(30, 5)) == 0.0
    a, b = torch.randn(6, 6), torch.randn(8, 6)  # r = d_in: the dense route
    assert math.isclose(low_rank_effective_rank(a, b), independent_effective_rank(b.double() @ a.double()),
                        rel_tol=1e-9)


def test_delta_effective_ranks_of_lora_equal_an_independent_computation() -> None:
    model = lsrfx.adapt(tiny_mlp(), method="lora", targets=["0", "2"], r=4)
    assert delta_effective_ranks(model) == {"0": 0.0, "2": 0.0}
    with torch.no_grad():
        for _, _, param in adapted_layers(model):
            param.adapter.lora_B.normal_()
    ranks = delta_effective_ranks(model)
    assert list(ranks) == ["0", "2"]
    for name, _, param in adapted_layers(model):
        a, b = param.adapter.lora_A, param.adapter.lora_B
        expected = independent_effective_rank(b.double() @ a.double())
        assert math.isclose(ranks[name], expected, rel_tol=1e-9), name
        assert 1.0 < ranks[name] <= 4.0 + 1e-9
    assert delta_effective_ranks(torch.compile(model)) == ranks  # a compiled model reads through to the original


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_every_method_and_a_transposed_layer(method: str) -> None:
    model = lsrfx.adapt(tiny_gpt2(n_layer=1), method=method, targets=["c_attn", "mlp.c_fc"], **TINY_OPTIONS[method])
    with torch.no_grad():
        for _, _, param in adapted_layers(model):
            for p in param.adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    ranks = delta_effective_ranks(model)
    for name, module, param in adapted_layers(model):
        w0 = module.parametrizations["weight"].original
        dw = param.adapter.delta_weight(w0.t() if param.transposed else w0)
        assert math.isclose(ranks[name], independent_effective_rank(dw), rel_tol=1e-4), name
        assert 0 < ranks[name] <= param.adapter.rank + 1e-6


def test_quantized_base_weight_is_dequantized() -> None:
    """CondLoRA's factors read W0: over a torchao int8 base the diagnostic uses the dequantised weight, and equals the
    independent dense computation on it."""
    quantization = pytest.importorskip("torchao.quantization", reason="the lsrfx[quant] extra (torchao) is not installed")
    model = tiny_bert()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(),
                           filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "classifier")
    lsrfx.adapt(model, method="condlora", targets=["query", "value"], r=4)
    with torch.no_grad():
        for _, _, param in adapted_layers(model):
            param.adapter.pair.C_B.normal_()
    ranks = delta_effective_ranks(model)
    for name, module, param in adapted_layers(model):
        w0 = module.parametrizations["weight"].original.dequantize()
        expected = independent_effective_rank(param.adapter.delta_weight(w0).detach())
        assert math.isclose(ranks[name], expected, rel_tol=1e-5), name  # fp32 dense product vs float64 factors


def test_summary_shows_the_effective_rank_column() -> None:
    model = lsrfx.adapt(tiny_bert(), method="lora", targets=["query", "value"], r=4)
    table = lsrfx.summary(model)
    header, rule, *rows = table.splitlines()
    assert header.split()[-3:] == ["dW", "eff.", "rank"]
    assert len(rows) == 5 and all(r.split()[-1] == "0.0" for r in rows[:4])  # dW = 0 right after adapt
    with torch.no_grad():
        for _, _, param in adapted_layers(model):
            param.adapter.lora_B.normal_()
    ranks = delta_effective_ranks(model)
    for row in lsrfx.summary(model).splitlines()[2:6]:
        assert row.split()[-1] == f"{ranks[row.split()[0]]:.1f}"
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8))
    assert lsrfx.summary(lsrfx.adapt(meta, method="lora", targets=["0"], r=2)).splitlines()[2].split()[-1] == "-"
