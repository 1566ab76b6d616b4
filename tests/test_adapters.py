"""Each method's factors, dense update and layer output against an independent dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.adapters import make_config
from lsrfx.adapters.base import LayerSpec
from lsrfx.adapters.lsr import LSRConfig, balanced_split, lsr_parameter_count
from lsrfx.parametrization import adapted_layers, base_weight

from conftest import TINY_OPTIONS, tiny_mlp
from references import reference_factors


def test_tiny_options_cover_every_registered_method() -> None:
    """The shared option table has one entry per registered method, and each entry is a valid config."""
    assert set(TINY_OPTIONS) == set(lsrfx.METHODS)
    for method, options in TINY_OPTIONS.items():
        assert isinstance(make_config(method, options), lsrfx.METHODS[method])


def _randomize(model: nn.Module) -> None:
    """Give every adapter parameter non-trivial values, so outputs test the whole update (init zeros B)."""
    with torch.no_grad():
        for _, _, param in adapted_layers(model):
            for p in param.adapter.parameters():
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_factors_delta_and_output_match_dense_reference(method: str) -> None:
    model = tiny_mlp()
    lsrfx.adapt(model, method=method, targets=["0", "2"], **TINY_OPTIONS[method])
    _randomize(model)
    x = torch.randn(5, 12)
    h = x
    with torch.no_grad():
        for _, module, param in adapted_layers(model):
            adapter, w0 = param.adapter, base_weight(module)
            a_ref, b_ref = (t.to(w0.dtype) for t in reference_factors(method, adapter, w0))
            a, b = adapter.factors(w0)
            assert a.shape == (adapter.rank, w0.shape[1]) and b.shape == (w0.shape[0], adapter.rank)
            torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)
            dw_ref = adapter.scale * b_ref @ a_ref
            torch.testing.assert_close(adapter.delta_weight(w0), dw_ref, rtol=1e-5, atol=1e-6)
            assert torch.linalg.matrix_rank(dw_ref) <= adapter.rank
            out = h @ (w0 + dw_ref).T + module.bias
            torch.testing.assert_close(module(h), out, rtol=1e-5, atol=1e-5)
            h = torch.tanh(out)  # the model is Linear, Tanh, Linear: `out` of the last layer is the model's output
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_update_is_zero_at_start(method: str) -> None:
    model = tiny_mlp()
    before = model(torch.ones(2, 12)).detach()
    lsrfx.adapt(model, method=method, targets=["0", "2"], **TINY_OPTIONS[method])
    for _, module, param in adapted_layers(model):
        assert torch.count_nonzero(param.adapter.delta_weight(base_weight(module))) == 0
    assert torch.equal(model(torch.ones(2, 12)), before)


def test_lsr_paper_init_starts_nonzero() -> None:
    model = tiny_mlp(16, 16, 16)
    lsrfx.adapt(model, method="lsr", targets=["0"], r1=2, r2=2, separation_rank=4, init="paper")
    (_, module, param), = adapted_layers(model)
    for p in param.adapter.parameters():
        assert 0.005 < p.std().item() < 0.02  # N(0, 0.01^2)
    assert param.adapter.delta_weight(base_weight(module)).abs().max() > 0


def test_conv1d_weight_stored_in_out_is_adapted_with_transpose() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=10, nx=6)  # weight (in=6, out=10); y = x @ W + b
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    model = nn.Sequential(layer)
    lsrfx.adapt(model, method="lora", targets=["0"], r=3)
    _randomize(model)
    (_, module, param), = adapted_layers(model)
    w_stored = base_weight(module)
    assert w_stored.shape == (6, 10)
    a, b = param.adapter.lora_A, param.adapter.lora_B
    assert a.shape == (3, 6) and b.shape == (10, 3)  # A: r x d_in, B: d_out x r in PyTorch terms
    x = torch.randn(2, 4, 6)
    expected = x @ (w_stored + param.adapter.scale * (b @ a).T) + module.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_balanced_split() -> None:
    assert balanced_split(768) == (32, 24)
    assert balanced_split(384) == (24, 16)
    assert balanced_split(64) == (8, 8)
    assert balanced_split(13) == (13, 1)


def _count_unique(model: nn.Module) -> int:
    return lsrfx.count_parameters(model)[0]


def test_lsr_parameter_count_matches_paper_reference() -> None:
    spec = LayerSpec("q", 768, 768, False, torch.float32, torch.device("cpu"))
    config = LSRConfig(r1=2, r2=2, separation_rank=16, in_factors=(32, 24), out_factors=(32, 24))
    assert lsr_parameter_count(config, spec) == 3584
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(768, 768))
    lsrfx.adapt(model, config, targets=["0"])
    assert _count_unique(model) == 3584  # against LoRA r = 8: 12,288
    lora = nn.Sequential(nn.Linear(768, 768, device="meta"))
    lsrfx.adapt(lora, method="lora", targets=["0"], r=8)
    assert _count_unique(lora) == 12288


def test_condlora_shares_one_pair_per_group_roberta_base_counts() -> None:
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):  # RoBERTa-base shapes without allocating 125M parameters
        cond = RobertaModel(RobertaConfig())
        lora = RobertaModel(RobertaConfig())
    lsrfx.adapt(cond, method="condlora", targets=["query", "value"], r=8, alpha=8)
    lsrfx.adapt(lora, method="lora", targets=["query", "value"], r=8)
    assert _count_unique(cond) == 24576
    assert _count_unique(lora) == 294912
    pairs = {id(param.adapter.pair) for _, _, param in adapted_layers(cond)}
    assert len(pairs) == 2  # one for every `query`, one for every `value`


def test_condlora_groups_split_by_shape_and_nonsquare_uses_extension() -> None:
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": nn.Linear(8, 8)}), "b": nn.ModuleDict({"proj": nn.Linear(8, 8)}),
                           "c": nn.ModuleDict({"proj": nn.Linear(8, 6)})})
    lsrfx.adapt(model, method="condlora", targets=["proj"], r=2)
    params = {name: p for name, _, p in adapted_layers(model)}
    assert params["a.proj"].adapter.pair is params["b.proj"].adapter.pair
    assert params["c.proj"].adapter.pair is not params["a.proj"].adapter.pair
    assert params["c.proj"].adapter.pair.C_A.shape == (2, 6)  # r x d_out for non-square W0
    assert params["a.proj"].adapter.pair.C_A.shape == (2, 8)


def test_genlora_parameter_count_matches_formula() -> None:
    d_out, d_in, g, r = 24, 40, 3, 5
    model = nn.Sequential(nn.Linear(d_in, d_out))
    lsrfx.adapt(model, method="genlora", targets=["0"], r=r, group_size=g)
    assert _count_unique(model) == g * (d_in + d_out) + 2 * r * (g + 2)
    with torch.device("meta"):
        big = nn.Sequential(nn.Linear(768, 768))
    lsrfx.adapt(big, method="genlora", targets=["0"], r=32, group_size=2)
    assert _count_unique(big) == 3328


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_gradcheck_through_factors_float64(method: str) -> None:
    model = tiny_mlp(8, 6, 4).double()
    # Override of the shared options: the 4 x 6 layer allows rank <= 4 (GenLoRA's r = 6 would not fit), and two
    # LSR terms instead of three halve the finite differences gradcheck takes.
    override = {"r": 3} if "r" in TINY_OPTIONS[method] else {"separation_rank": 2}
    lsrfx.adapt(model, method=method, targets=["0", "2"], **{**TINY_OPTIONS[method], **override})
    _randomize(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params
    x = torch.randn(3, 8, dtype=torch.float64)

    def fn(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(params, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, tuple(params.values()), eps=1e-6, atol=1e-5)


def test_kaiming_init_of_lora_a_matches_peft_bound() -> None:
    model = nn.Sequential(nn.Linear(400, 30))
    lsrfx.adapt(model, method="lora", targets=["0"], r=8)
    (_, _, param), = adapted_layers(model)
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert param.adapter.lora_A.abs().max() <= bound
    assert param.adapter.lora_A.abs().max() > 0.9 * bound
