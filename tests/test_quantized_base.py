"""Adapters over a torchao-quantized frozen base (int8 weight-only), and adapter hot-swap without recompiling.

References: the base's quantized tensors themselves (bit-identical before and after training), the dense math
``F.linear(x, dequantize(W0)) + dW`` for merge, the eager model for ``torch.compile``, a freshly loaded model for a
hot-swapped one, and onnxruntime for the export.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx import adapted_layer, quantized_base
from lsrfx.errors import LsrfxError
from lsrfx.parametrization import adapter_parameters
from lsrfx.utils import unwrap

from conftest import TINY_OPTIONS, tiny_bert

torchao_quant = pytest.importorskip("torchao.quantization", reason="the lsrfx[quant] extra (torchao) is not installed")
Int8WeightOnlyConfig, quantize_ = torchao_quant.Int8WeightOnlyConfig, torchao_quant.quantize_

METHODS = sorted(TINY_OPTIONS)
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
STEPS = 6
# torch.compile against eager on the same quantized model: same math, different kernels and summation order.
COMPILED_TOL = dict(atol=1e-5, rtol=1e-4)


def tiny_llama() -> nn.Module:
    """A random-weight Llama language model: 2 layers, hidden 32 (q/v projections 32 x 32), vocabulary 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def quantized(arch: str) -> nn.Module:
    """The tiny model with every linear layer but the output head quantized to int8 weight-only."""
    model = tiny_bert() if arch == "bert" else tiny_llama()
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and name not in ("classifier", "lm_head"))
    return model


def batch(arch: str) -> dict:
    ids = torch.randint(0, 100, (4, 12))
    labels = torch.randint(0, 3, (4,)) if arch == "bert" else ids
    return {"input_ids": ids, "labels": labels}


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every inner tensor (int8 data, scales) of every quantized weight, cloned, by the layer's weight name."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        name = name.replace(".parametrizations.weight.original", ".weight")  # the same key adapted or not
        if quantized_base.is_quantized(p):
            for inner in p.__tensor_flatten__()[0]:
                out[f"{name}.{inner}"] = getattr(p, inner).detach().clone()
    return out


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_training_over_int8_base_moves_only_adapters(arch: str, method: str) -> None:
    model = quantized(arch)
    assert any(quantized_base.is_quantized(p) for p in model.parameters())
    q_before = quantized_state(model)
    assert q_before
    lsrfx.adapt(model, method=method, targets=TARGETS[arch], **TINY_OPTIONS[method])
    assert set(adapted_layer.quantized_layers(model)) == set(lsrfx.api.adapt_state(model).layers)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapter_parameters(model))  # only adapters train
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad and not quantized_base.is_quantized(p)}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    data = batch(arch)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    q_after = quantized_state(model)
    assert q_after.keys() == q_before.keys()
    for name, t in q_before.items():
        assert torch.equal(q_after[name], t), f"quantized base tensor {name} changed"
    for name, t in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], t), f"frozen parameter {name} changed"


# LoRA as the plain case and CondLoRA, whose factors read the quantized W0 itself; LSR-Adapt and GenLoRA form their
# factors from their own parameters only, which the int8 base does not touch (their eager path over int8 is tested
# above), and each compile here costs the suite several seconds.
@pytest.mark.parametrize("method", ["lora", "condlora"])
def test_compiled_equals_eager_over_int8_base(method: str) -> None:
    model = quantized("llama")
    lsrfx.adapt(model, method=method, targets=TARGETS["llama"], **TINY_OPTIONS[method])
    for p in adapter_parameters(model).values():  # B = 0 at init would hide half the adapter's gradient
        nn.init.normal_(p, std=0.2)
    data = batch("llama")
    params = adapter_parameters(model)

    def loss_and_grads(m: nn.Module) -> tuple[torch.Tensor, dict]:
        loss = m(**data).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        model.zero_grad()
        return loss.detach(), grads

    eager_loss, eager_grads = loss_and_grads(model)
    counters.clear()
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    assert counters["stats"]["unique_graphs"] >= 1  # it really ran compiled
    torch.testing.assert_close(compiled_loss, eager_loss, **COMPILED_TOL)
    for name in params:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], **COMPILED_TOL, msg=name)


def test_forward_is_base_kernel_plus_low_rank_term() -> None:
    """The adapted quantized layer computes F.linear(x, W0_q) + dW x: equal to the dense math on the dequantised
    weight, and its ``weight`` reads dequantize(W0) + dW."""
    model = quantized("bert")
    lsrfx.adapt(model, method="lsr", targets=TARGETS["bert"], **TINY_OPTIONS["lsr"])
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.3)
    layer = model.bert.encoder.layer[0].attention.self.query
    w0 = layer.parametrizations["weight"].original
    adapter = layer.parametrizations["weight"][0].adapter
    dense_w0 = w0.dequantize()
    delta = adapter.delta_weight(dense_w0)
    assert delta.abs().max() > 1e-3
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ (dense_w0 + delta).T + layer.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight, dense_w0 + delta)


def test_memory_is_quantized_base_plus_adapters() -> None:
    fp32 = tiny_bert()
    model = quantized("bert")
    layer_fp32 = fp32.bert.encoder.layer[0].attention.self.query
    layer_q = model.bert.encoder.layer[0].attention.self.query
    # int8 data + an fp32 scale and an int8 zero point per row: 0.29 x fp32 at 32 x 32, 0.26 x at 384 x 384
    assert quantized_base.tensor_bytes(layer_q.weight) <= 0.3 * quantized_base.tensor_bytes(layer_fp32.weight)
    before = quantized_base.storage_bytes(model)
    lsrfx.adapt(model, method="lora", targets=TARGETS["bert"], **TINY_OPTIONS["lora"])
    adapters = sum(p.numel() * p.element_size() for p in adapter_parameters(model).values())
    assert quantized_base.storage_bytes(model) == before + adapters  # the base was not dequantised in memory
    assert all(quantized_base.is_quantized(m.parametrizations["weight"].original)
               for _, m, _ in lsrfx.parametrization.adapted_layers(model))


@pytest.mark.parametrize("method", METHODS)
def test_merge_folds_into_dequantised_weight(method: str) -> None:
    model = quantized("bert")
    lsrfx.adapt(model, method=method, targets=TARGETS["bert"], **TINY_OPTIONS[method])
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.2)
    ids = batch("bert")["input_ids"]
    expected = {name: (m.parametrizations["weight"].original.dequantize()
                       + m.parametrizations["weight"][0].adapter.delta_weight(
                           m.parametrizations["weight"].original.dequantize())).detach()
                for name, m, _ in lsrfx.parametrization.adapted_layers(model)}
    before = model(input_ids=ids).logits
    lsrfx.merge(model)
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        merged = modules[name].weight
        assert type(merged) is nn.Parameter and not quantized_base.is_quantized(merged)
        assert merged.dtype == torch.float32 and not merged.requires_grad
        torch.testing.assert_close(merged.data, weight, atol=0, rtol=0)
        assert type(modules[name]).forward is nn.Linear.forward
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_merge_and_export_verified_in_onnxruntime(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the lsrfx[onnx] extra (onnxruntime) is not installed")
    model = quantized("bert")  # the classifier stays fp32, the encoder's other linears are int8 without adapters
    lsrfx.adapt(model, method="genlora", targets=TARGETS["bert"], **TINY_OPTIONS["genlora"])
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.2)
    ids = batch("bert")["input_ids"]
    reference = model(input_ids=ids).logits.detach()
    report = lsrfx.merge_and_export(model, tmp_path / "model.onnx", {"input_ids": ids})
    assert report.max_diff is not None and report.max_diff < 1e-4
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), reference, atol=1e-4, rtol=1e-4)
    assert all(quantized_base.is_quantized(m.parametrizations["weight"].original)  # the caller's model is unchanged
               for _, m, _ in lsrfx.parametrization.adapted_layers(model))


def test_unknown_scheme_is_refused_and_model_untouched(monkeypatch) -> None:
    model = quantized("bert")
    monkeypatch.setattr(quantized_base, "SCHEMES", {"Int4Tensor": "int4"})
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(LsrfxError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query.*Int8Tensor.*does not know"):
        lsrfx.adapt(model, method="lora", targets=TARGETS["bert"])
    assert lsrfx.api.adapt_state(model) is None
    assert {n: p for n, p in model.named_parameters()} == before


def test_dynamic_activation_quantization_is_refused() -> None:
    """Int8DynamicActivationInt8WeightConfig rounds activations to int8 without a gradient: training through it is
    impossible (measured: the loss has no grad_fn), so adapt refuses it, naming the layer and the fix."""
    model = tiny_bert()
    quantize_(model, torchao_quant.Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "classifier")
    with pytest.raises(LsrfxError, match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query'.*dynamic int8 "
                                         r"activations.*Int8WeightOnlyConfig"):
        lsrfx.adapt(model, method="lsr", targets=TARGETS["bert"], **TINY_OPTIONS["lsr"])
    assert lsrfx.api.adapt_state(model) is None


def test_state_dict_round_trip_over_int8_base() -> None:
    a, b = quantized("bert"), copy.deepcopy(quantized("bert"))
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        lsrfx.adapt(m, method="condlora", targets=TARGETS["bert"], **TINY_OPTIONS["condlora"])
    for p in adapter_parameters(a).values():
        nn.init.normal_(p, std=0.2)
    b.load_state_dict(a.state_dict())
    ids = batch("bert")["input_ids"]
    torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, atol=0, rtol=0)


# --- hot-swap --------------------------------------------------------------------------------------------------


def _saved_sets(make, tmp_path, n: int = 3) -> list:
    """``n`` adapter directories with different random values, saved from models built by ``make``."""
    dirs = []
    for i in range(n):
        model = make()
        torch.manual_seed(100 + i)
        for p in adapter_parameters(model).values():
            nn.init.normal_(p, std=0.2)
        dirs.append(lsrfx.save_adapters(model, tmp_path / f"set{i}"))
    return dirs


@pytest.mark.parametrize("base", ["fp32", "int8"])
def test_hot_swap_three_sets_without_recompiling(base: str, tmp_path) -> None:
    def plain() -> nn.Module:
        torch.manual_seed(0)
        return quantized("bert") if base == "int8" else tiny_bert()

    def make() -> nn.Module:
        return lsrfx.adapt(plain(), method="lsr", targets=TARGETS["bert"], **TINY_OPTIONS["lsr"])

    dirs = _saved_sets(make, tmp_path)
    ids = batch("bert")["input_ids"]
    served = torch.compile(make())
    served(input_ids=ids)  # compile once
    counters.clear()
    for directory in dirs:
        lsrfx.load_adapters(served, directory)
        got = served(input_ids=ids).logits
        fresh = lsrfx.load_adapters(plain(), directory)  # an independent model loaded with this set, eager
        torch.testing.assert_close(got, fresh(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # no new capture over three swaps


def test_hot_swap_mismatch_is_refused_and_model_unchanged(tmp_path) -> None:
    def base(kind: str = "int8") -> nn.Module:
        torch.manual_seed(0)  # the same base weights every time
        return quantized("bert") if kind == "int8" else tiny_bert()

    other_method = lsrfx.adapt(base(), method="lora", targets=TARGETS["bert"], **TINY_OPTIONS["lora"])
    lsrfx.save_adapters(other_method, tmp_path / "lora")
    other_shape = lsrfx.adapt(base(), method="lsr", targets=TARGETS["bert"],
                              **{**TINY_OPTIONS["lsr"], "separation_rank": 5})
    lsrfx.save_adapters(other_shape, tmp_path / "lsr-s5")
    fp32_base = lsrfx.adapt(base("fp32"), method="lsr", targets=TARGETS["bert"], **TINY_OPTIONS["lsr"])
    lsrfx.save_adapters(fp32_base, tmp_path / "lsr-fp32")

    model = lsrfx.adapt(base(), method="lsr", targets=TARGETS["bert"], **TINY_OPTIONS["lsr"])
    before = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    cases = [("lora", r"method 'lsr' in the model, 'lora' in the files"),
             ("lsr-s5", r"separation_rank=3 in the model, 5 in the files"),
             ("lsr-fp32", r"quantization Int8Tensor vs saved none")]
    for directory, message in cases:
        with pytest.raises(LsrfxError, match=message):
            lsrfx.load_adapters(model, tmp_path / directory)
        after = adapter_parameters(model)
        assert after.keys() == before.keys()
        for name, t in before.items():
            assert torch.equal(after[name], t), f"{directory}: {name} changed"


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: torchao has no CPU kernel for int4 weight-only (Int4WeightOnlyConfig)")
def test_int4_base_on_gpu() -> None:
    model = tiny_llama().to("cuda", torch.bfloat16)
    quantize_(model, torchao_quant.Int4WeightOnlyConfig(group_size=32),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
    lsrfx.adapt(model, method="lsr", targets=TARGETS["llama"], **TINY_OPTIONS["lsr"])
    for p in adapter_parameters(model).values():
        nn.init.normal_(p, std=0.2)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.parametrizations["weight"].original
    x = torch.randn(4, 32, device="cuda", dtype=torch.bfloat16)
    dense_w0 = w0.dequantize()
    expected = x.float() @ (dense_w0.float() + layer.parametrizations["weight"][0].adapter.delta_weight(dense_w0)).T
    torch.testing.assert_close(layer(x).float(), expected, atol=5e-2, rtol=5e-2)
