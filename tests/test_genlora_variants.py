"""GenLoRA's factor bases (``rbf``, ``centred``, ``mixed``) and width initialisations: the factors against an
independent dense reference, ``dW = 0`` at init, gradients to every parameter, the effective rank each basis starts
with, parameter counts, option errors, the unchanged ``rbf`` init and state_dict, meta-device init, save/load, the
CLI flags and the compile pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.adapters.base import LayerSpec
from lsrfx.adapters.genlora import GenLoRAAdapter, GenLoRAConfig, genlora_parameter_count
from lsrfx.diagnostics import effective_rank
from lsrfx.parametrization import adapted_layers, adapter_parameters, base_weight

from conftest import tiny_bert

BASES = ["rbf", "centred", "mixed"]
OLD_KEYS = ["Z_A", "Z_B", "centres_A", "centres_B", "log_gamma_A", "log_gamma_B", "amplitude_A", "amplitude_B"]


def make_adapter(d_out: int = 24, d_in: int = 40, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 **options) -> GenLoRAAdapter:
    spec = LayerSpec("layer", d_out, d_in, False, dtype, torch.device(device))
    return GenLoRAAdapter(spec, GenLoRAConfig(**options))


def output_side(adapter: GenLoRAAdapter) -> nn.Parameter:
    """The parameter ``B`` (so ``dW``) is linear in and that init zeroes."""
    return adapter.mix_B if adapter.basis == "mixed" else adapter.amplitude_B


def reference_factors(adapter: GenLoRAAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in float64 from the module docstring's formulas, entry by entry for the features."""
    p = {n: t.detach().double() for n, t in adapter.named_parameters()}

    def features(z: torch.Tensor, c: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
        phi = torch.empty(c.shape[0], z.shape[0], dtype=torch.float64)
        for i in range(c.shape[0]):
            for j in range(z.shape[0]):
                phi[i, j] = math.exp(-float(((z[j] - c[i]) ** 2).sum()) * math.exp(float(log_gamma[i])))
        return phi

    phi_a = features(p["Z_A"], p["centres_A"], p["log_gamma_A"])
    phi_b = features(p["Z_B"], p["centres_B"], p["log_gamma_B"])
    if adapter.basis == "mixed":
        return p["mix_A"] @ phi_a / math.sqrt(adapter.d_in), (p["mix_B"] @ phi_b / math.sqrt(adapter.d_out)).t()
    if adapter.basis == "centred":
        phi_a = phi_a - phi_a.mean(1, keepdim=True)
        phi_b = phi_b - phi_b.mean(1, keepdim=True)
    return p["amplitude_A"][:, None] * phi_a, (p["amplitude_B"][:, None] * phi_b).t()


@pytest.mark.parametrize("basis", BASES)
def test_factors_match_reference_and_delta_is_zero_at_init(basis: str) -> None:
    for gamma_init in ("auto", "median", "nearest", 0.7):
        adapter = make_adapter(r=5, group_size=3, basis=basis, gamma_init=gamma_init)
        w0 = torch.randn(24, 40)
        assert torch.count_nonzero(adapter.delta_weight(w0)) == 0
        with torch.no_grad():
            output_side(adapter).normal_()
        a, b = adapter.factors(w0)
        assert a.shape == (5, 40) and b.shape == (24, 5)
        assert a.dtype == b.dtype == torch.float32
        a_ref, b_ref = reference_factors(adapter)
        torch.testing.assert_close(a.double(), a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), b_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapter.delta_weight(w0).double(), adapter.scale * b_ref @ a_ref,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("basis", BASES)
def test_gradients_reach_every_parameter(basis: str) -> None:
    adapter = make_adapter(r=5, group_size=2, basis=basis)
    with torch.no_grad():
        output_side(adapter).normal_()
    w0 = torch.randn(24, 40)
    target = torch.randn(24, 40)
    (adapter.delta_weight(w0) - target).square().sum().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def initial_effective_ranks(basis: str, seed: int = 0, group_size: int = 2) -> tuple[float, float]:
    """Effective rank at init of ``A`` and of the ``B`` side's features (``B`` itself is 0), on 384 x 384, r = 32."""
    torch.manual_seed(seed)
    adapter = make_adapter(384, 384, r=32, group_size=group_size, basis=basis)
    with torch.no_grad():
        a, _ = adapter.factors(torch.zeros(384, 384))
        _, phi_b = adapter.features()
    return effective_rank(a), effective_rank(phi_b)


def test_centred_and_mixed_start_with_higher_effective_rank_than_rbf() -> None:
    rbf_a, rbf_b = initial_effective_ranks("rbf")
    for basis in ("centred", "mixed"):
        a, b = initial_effective_ranks(basis)
        assert a > rbf_a + 5 and b > rbf_b + 5, (basis, a, rbf_a, b, rbf_b)
    # centring alone (same width) removes the common mode: strictly higher than rbf, with the same parameters
    torch.manual_seed(0)
    centred = make_adapter(384, 384, r=32, basis="centred", gamma_init=1.0)
    assert effective_rank(centred.factors(torch.zeros(384, 384))[0]) > rbf_a
    # the independent computation: exp(entropy(s / sum s)) from svdvals
    torch.manual_seed(0)
    rbf = make_adapter(384, 384, r=32, basis="rbf")
    s = torch.linalg.svdvals(rbf.factors(torch.zeros(384, 384))[0].detach().double())
    p = s / s.sum()
    assert math.isclose(rbf_a, math.exp(-(p * p.log()).sum().item()), rel_tol=1e-9)


@pytest.mark.parametrize(("basis", "features"), [("rbf", None), ("centred", None), ("mixed", None), ("mixed", 7),
                                                 ("mixed", 3)])
def test_parameter_count_formula(basis: str, features: int | None) -> None:
    d_out, d_in, g, r = 24, 40, 3, 5
    config = GenLoRAConfig(r=r, group_size=g, basis=basis, features=features)
    adapter = GenLoRAAdapter(LayerSpec("x", d_out, d_in, False, torch.float32, torch.device("cpu")), config)
    m = features or r
    expected = (g * (d_in + d_out) + 2 * m * (g + 1) + 2 * r * m if basis == "mixed"
                else g * (d_in + d_out) + 2 * r * (g + 2))
    assert sum(p.numel() for p in adapter.parameters()) == expected == genlora_parameter_count(d_out, d_in, config)
    a, b = adapter.factors(torch.zeros(d_out, d_in))
    assert a.shape == (r, d_in) and b.shape == (d_out, r)


def test_parameter_counts_at_the_default_size() -> None:
    """384 x 384, r = 32, g = 2 (LoRA r = 8: 6,144 per layer)."""
    counts = {b: genlora_parameter_count(384, 384, GenLoRAConfig(basis=b)) for b in BASES}
    assert counts == {"rbf": 1792, "centred": 1792, "mixed": 3776}


def test_bad_options_raise_lsrfx_error_naming_the_choices() -> None:
    with pytest.raises(lsrfx.LsrfxError, match=r"basis='gauss'.*'rbf', 'centred', 'mixed'"):
        GenLoRAConfig(basis="gauss")
    with pytest.raises(lsrfx.LsrfxError, match=r"basis='gauss'.*'rbf', 'centred', 'mixed'"):
        lsrfx.adapt(nn.Sequential(nn.Linear(8, 8)), method="genlora", targets=["0"], r=2, basis="gauss")
    for bad in ("wide", -1.0, 0, math.inf, math.nan, True):
        with pytest.raises(lsrfx.LsrfxError, match=r"gamma_init=.*positive number or one of 'auto', 'median'"):
            GenLoRAConfig(gamma_init=bad)
    with pytest.raises(lsrfx.LsrfxError, match=r"features=4 applies to basis='mixed' only"):
        GenLoRAConfig(features=4)
    with pytest.raises(lsrfx.LsrfxError, match=r"features=0 must be >= 1"):
        GenLoRAConfig(basis="mixed", features=0)


def test_gamma_init_is_normalised_and_resolved_per_basis() -> None:
    assert GenLoRAConfig().basis == "centred" and GenLoRAConfig().width_init == "nearest"
    assert GenLoRAConfig(basis="rbf").gamma_init == "auto" and GenLoRAConfig(basis="rbf").width_init == 1.0
    assert GenLoRAConfig(basis="centred").width_init == "nearest"
    assert GenLoRAConfig(basis="mixed").width_init == "nearest"
    assert GenLoRAConfig(gamma_init=2).gamma_init == "2.0" == GenLoRAConfig(gamma_init="2").gamma_init
    assert GenLoRAConfig(gamma_init=2).width_init == 2.0
    assert GenLoRAConfig(gamma_init=" Median ").width_init == "median"
    config = GenLoRAConfig(basis="mixed", gamma_init=0.5, features=4)
    assert GenLoRAConfig(**config.options()) == config  # what an adapter file's config reads back


def test_width_heuristics() -> None:
    for rule in ("median", "nearest"):
        adapter = make_adapter(r=6, group_size=2, gamma_init=rule, basis="rbf")
        with torch.no_grad():
            for z, c, log_gamma in ((adapter.Z_A, adapter.centres_A, adapter.log_gamma_A),
                                    (adapter.Z_B, adapter.centres_B, adapter.log_gamma_B)):
                sq = torch.cdist(c.double(), z.double()) ** 2
                typical = sq.median() if rule == "median" else sq.min(0).values.median()
                torch.testing.assert_close(log_gamma.double(), (1 / typical).log().expand(6), rtol=1e-5, atol=1e-5)


def test_rbf_keeps_its_init_and_state_dict_keys_bit_for_bit() -> None:
    d_out, d_in, g, r = 24, 40, 2, 6
    torch.manual_seed(7)
    adapter = make_adapter(d_out, d_in, r=r, group_size=g, basis="rbf")
    assert list(adapter.state_dict()) == OLD_KEYS
    torch.manual_seed(7)  # the init before bases existed: N(0, 1) latents and centres in this order, unit widths
    expected = {"Z_A": torch.randn(d_in, g), "Z_B": torch.randn(d_out, g), "centres_A": torch.randn(r, g),
                "centres_B": torch.randn(r, g), "log_gamma_A": torch.zeros(r), "log_gamma_B": torch.zeros(r),
                "amplitude_A": torch.full((r,), d_in**-0.5), "amplitude_B": torch.zeros(r)}
    for name, value in adapter.state_dict().items():
        assert torch.equal(value, expected[name]), name
    model = lsrfx.adapt(nn.Sequential(nn.Linear(8, 8)), method="genlora", targets=["0"], r=2, basis="rbf")
    assert sorted(adapter_parameters(model)) == sorted(f"0.parametrizations.weight.0.adapter.{k}" for k in OLD_KEYS)
    centred = make_adapter(d_out, d_in, r=r, group_size=g, basis="centred")
    assert list(centred.state_dict()) == OLD_KEYS
    mixed = make_adapter(d_out, d_in, r=r, group_size=g, basis="mixed")
    assert list(mixed.state_dict()) == OLD_KEYS[:6] + ["mix_A", "mix_B"]


@pytest.mark.parametrize("basis", BASES)
def test_meta_device_model_is_initialised_by_to_empty(basis: str) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(48, 32))
    lsrfx.adapt(model, method="genlora", targets=["0"], r=8, basis=basis, gamma_init="nearest")
    model.to_empty(device="cpu")
    (_, module, param), = adapted_layers(model)
    adapter = param.adapter
    assert all(torch.isfinite(p).all() for p in adapter.parameters())
    assert torch.count_nonzero(adapter.delta_weight(base_weight(module))) == 0
    with torch.no_grad():
        typical = (torch.cdist(adapter.centres_A, adapter.Z_A) ** 2).min(0).values.median()
    torch.testing.assert_close(adapter.log_gamma_A, (1 / typical).log().expand(8), rtol=1e-5, atol=1e-5)
    if basis == "mixed":
        torch.testing.assert_close(adapter.mix_A @ adapter.mix_A.t(), torch.eye(8), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(adapter.amplitude_A, torch.full((8,), 48**-0.5))


def test_fp32_master_weights_under_a_bf16_base() -> None:
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    for basis in BASES:
        lsrfx.adapt(model, method="genlora", targets=["0"], r=4, basis=basis)
        assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
        lsrfx.merge(model)


@pytest.mark.parametrize("basis", ["centred", "mixed"])
def test_save_and_load_round_trip(basis: str, tmp_path) -> None:
    torch.manual_seed(0)
    base = tiny_bert()
    torch.manual_seed(0)
    fresh = tiny_bert()
    lsrfx.adapt(base, method="genlora", targets=["query", "value"], r=4, basis=basis, gamma_init="median")
    with torch.no_grad():
        for p in adapter_parameters(base).values():
            p.add_(torch.randn_like(p) * 0.3)
    lsrfx.save_adapters(base, tmp_path)
    lsrfx.load_adapters(fresh, tmp_path)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, base(input_ids=ids).logits)
    assert {type(p.adapter).__name__ + p.adapter.basis for _, _, p in adapted_layers(fresh)} == {
        "GenLoRAAdapter" + basis}


def test_cli_flags() -> None:
    from lsrfx.cli import build_parser, method_options

    args = build_parser().parse_args(["finetune", "--method", "genlora", "--basis", "mixed", "--features", "16",
                                      "--gamma-init", "median"])
    assert method_options(args, ["genlora"]) == {
        "genlora": {"basis": "mixed", "features": 16, "gamma_init": "median"}}
    args = build_parser().parse_args(["finetune", "--method", "genlora", "--set", "genlora.gamma_init=3"])
    assert GenLoRAConfig(**method_options(args, ["genlora"])["genlora"]).width_init == 3.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--basis", "gauss"])


@pytest.mark.parametrize("basis", ["centred", "mixed"])
def test_compile_pass_fuses_the_new_bases(basis: str) -> None:
    torch._dynamo.reset()
    model = tiny_bert(num_hidden_layers=1).bert.eval()
    lsrfx.adapt(model, method="genlora", targets=["query", "value"], r=6, basis=basis)
    params = adapter_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0.0, 0.2)
    ids = torch.randint(0, 100, (2, 7))
    eager = model(input_ids=ids).last_hidden_state
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        out = torch.compile(model)(input_ids=ids).last_hidden_state
        out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert counters["lsrfx"]["fused"] == 2 and counters["lsrfx"]["materialised"] == 0
    torch._dynamo.reset()


def test_adapter_file_from_before_bases_loads_as_rbf(tmp_path) -> None:
    """Files written before ``basis`` existed have no such option: they hold the rbf form, not today's default."""
    import json

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16))

    trained = lsrfx.adapt(base(), method="genlora", targets=["0"], r=4, basis="rbf")
    with torch.no_grad():
        for p in adapter_parameters(trained).values():
            p.normal_()
    directory = lsrfx.save_adapters(trained, tmp_path / "old")
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("basis", "features", "gamma_init"):  # what an older lsrfx wrote: none of the new options
        del config["options"][key]
    config_file.write_text(json.dumps(config))
    loaded = lsrfx.load_adapters(base(), directory)
    assert lsrfx.api.adapt_state(loaded).config.basis == "rbf"
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
