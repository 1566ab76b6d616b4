"""adapt / merge / summary: target selection, freezing, exact merge, state_dict, and every bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lsrfx
from lsrfx import LsrfxError
from lsrfx.parametrization import adapted_layers
from lsrfx.recorder import latest

from conftest import tiny_bert, tiny_gpt2


def adapted_names(model: nn.Module) -> list[str]:
    return [name for name, _, _ in adapted_layers(model)]


def test_default_targets_bert_query_value() -> None:
    model = lsrfx.adapt(tiny_bert(), method="lora")
    names = adapted_names(model)
    assert len(names) == 4 and all(re.search(r"\.(query|value)$", n) for n in names)


def test_default_targets_gpt2_c_attn_conv1d() -> None:
    model = lsrfx.adapt(tiny_gpt2(), method="lora")
    assert adapted_names(model) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_default_targets_fallback_all_linear_but_head() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    model.add_module("classifier", nn.Linear(8, 2))
    lsrfx.adapt(model, method="lora", r=2)
    assert adapted_names(model) == ["encoder.0", "encoder.2"]


def test_targets_suffix_regex_and_predicate() -> None:
    by_suffix = adapted_names(lsrfx.adapt(tiny_bert(), method="lora", targets=["key", "attention.output.dense"]))
    assert by_suffix == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.output.dense",
                         "bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.output.dense"]
    by_regex = adapted_names(lsrfx.adapt(tiny_bert(), method="lora", targets=r".*layer\.1\..*(query|key)"))
    assert by_regex == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    by_pred = adapted_names(lsrfx.adapt(tiny_bert(), method="lora",
                                        targets=lambda name, m: m.out_features == 48))
    assert by_pred == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]


def test_freezes_base_except_trainable_and_reports() -> None:
    model = lsrfx.adapt(tiny_bert(), method="lsr", r1=1, r2=2, separation_rank=2, trainable=("classifier",))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(n for n in trainable if ".parametrizations." not in n) == {"classifier.weight", "classifier.bias"}
    assert all(".adapter." in n for n in trainable if ".parametrizations." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".original"))
    table = lsrfx.summary(model)
    assert table.count("lsr ") == 4 and "query" in table and "value" in table
    n_adapter, n_base = lsrfx.count_parameters(model)
    expected = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    assert n_adapter == expected and f"{n_adapter:,} adapter parameters" in table
    assert "classifier.weight" in table


def test_merge_is_exact_on_bert_sized_layer_and_removes_lsrfx() -> None:
    for method in lsrfx.METHODS:  # each method's default options, on BERT-base-sized layers
        model = nn.Sequential(nn.Linear(768, 768), nn.GELU(), nn.Linear(768, 768))
        lsrfx.adapt(model, method=method, targets=["0", "2"])
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if ".adapter." in n):
                p.add_(torch.randn_like(p) * 0.02)
        x = torch.randn(4, 768)
        before = model(x).detach()
        merged = lsrfx.merge(model)
        assert merged is model
        assert type(model[0]) is nn.Linear and not hasattr(model[0], "parametrizations")
        assert not any(type(m).__module__.startswith("lsrfx") for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())  # adapt froze them; merge gives them back
        assert (model(x) - before).abs().max().item() <= 1e-5, method


def test_state_dict_round_trip() -> None:
    source = lsrfx.adapt(tiny_bert(), method="condlora", trainable=("classifier",))
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    target = lsrfx.adapt(copy.deepcopy(tiny_bert()), method="condlora", trainable=("classifier",))
    target.load_state_dict(source.state_dict())
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(target(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=0)


def _snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


def _assert_untouched(model: nn.Module, snap: tuple) -> None:
    state, types, grads = snap
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "_lsrfx_state")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="dora"), r"unknown method 'dora'; choose one of \['condlora', 'genlora', 'lora', 'lsr'\]"),
        (dict(method="lora", rank=8), r"unknown option\(s\) \['rank'\] for method 'lora'; valid options: \['r', 'alpha'\]"),
        (dict(method="lora", targets=["q_proj"]), r"matched no linear layer.*end in: \[.*'query'.*'value'"),
        (dict(method="lora", targets=["query"], r=33), r"rank r=33 is impossible for layer 'bert.encoder.layer.0.attention.self.query' \(weight 32 x 32\); use 1 <= r <= 32"),
        (dict(method="lsr", in_factors=(5, 7)), r"in_factors=\(5, 7\) does not factor d_in=32 of layer 'bert.encoder.layer.0.attention.self.query'"),
        (dict(method="lsr", r2=8), r"ranks r1=2, r2=8 exceed the Kronecker factors of layer '.*query' \(weight 32 x 32"),
        (dict(method="lora", trainable=("head_of_state",)), r"'head_of_state' matches no parameter"),
        (dict(method="lsr", init="gaussian"), r"init='gaussian' is unknown"),
    ],
)
def test_bad_input_names_layer_and_fix_and_leaves_model_untouched(kwargs: dict, message: str) -> None:
    model = tiny_bert()
    snap = _snapshot(model)
    with pytest.raises(LsrfxError, match=message):
        lsrfx.adapt(model, **kwargs)
    _assert_untouched(model, snap)


def test_lsr_prime_dimension_fails_clearly_and_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 13))
    snap = _snapshot(model)
    with pytest.raises(LsrfxError, match=r"d_out=13 of layer '2' \(weight 13 x 16\) has no useful Kronecker split "
                                         r"\(best is 13 x 1\); leave this layer out of `targets`"):
        lsrfx.adapt(model, method="lsr", targets=["0", "2"], r1=1, r2=1)
    _assert_untouched(model, snap)  # layer '0' was fine, but nothing was adapted


def test_already_adapted_and_config_plus_options_are_refused() -> None:
    model = lsrfx.adapt(tiny_bert(), method="lora")
    with pytest.raises(LsrfxError, match="already adapted.*lsrfx.merge"):
        lsrfx.adapt(model, method="lora")
    with pytest.raises(LsrfxError, match="either config= or method options"):
        lsrfx.adapt(tiny_bert(), lsrfx.LoRAConfig(), r=4)
    lsrfx.merge(model)
    lsrfx.adapt(model, method="lsr")  # after merging, a model can be adapted again


def test_adapt_then_merge_on_compiled_model_keeps_it_compiled() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 8)
    compiled(x)
    out = lsrfx.adapt(compiled, method="lora", targets=["0", "2"], r=2)
    assert out is compiled and isinstance(out, torch._dynamo.eval_frame.OptimizedModule)
    with torch.no_grad():
        for _, _, p in adapted_layers(model):
            p.adapter.lora_B.normal_()
    eager_expected = model(x)  # the adapted module run eagerly
    torch.testing.assert_close(compiled(x), eager_expected)
    lsrfx.merge(compiled)
    torch.testing.assert_close(compiled(x), eager_expected, rtol=1e-5, atol=1e-5)


def test_merge_of_a_deepcopy_leaves_the_original_adapted_and_recording() -> None:
    original = lsrfx.adapt(tiny_bert(), method="lora")
    with torch.no_grad():
        for _, _, p in adapted_layers(original):
            p.adapter.lora_B.normal_()
    ids = torch.randint(0, 100, (2, 5))
    expected = original(input_ids=ids).logits
    clone = lsrfx.merge(copy.deepcopy(original))
    torch.testing.assert_close(clone(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(True for _ in adapted_layers(clone))
    assert len(list(adapted_layers(original))) == 4
    torch.testing.assert_close(original(input_ids=ids).logits, expected)  # `weight` still works on the original
    other = torch.randint(0, 100, (3, 4))
    original(input_ids=other, attention_mask=torch.ones_like(other))  # a new call structure is recorded again
    recorded = latest(original)[1]["input_ids"]  # its recorder survived: a copy of the first rows, not `other`
    assert torch.equal(recorded, other[:2]) and recorded.data_ptr() != other.data_ptr()
    assert latest(clone) is None  # merging the copy stopped only the copy's recorder
