"""lsrfx's LoRA gives peft's LoRA outputs and gradients when both hold the same tensors."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

import lsrfx
from lsrfx.parametrization import adapted_layers

from conftest import tiny_bert


def test_lora_matches_peft_outputs_and_gradients() -> None:
    base = tiny_bert()
    ours = lsrfx.adapt(copy.deepcopy(base), method="lora", targets=["query", "value"], r=4, alpha=8)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules=["query", "value"]))
    layers = {name: p.adapter for name, _, p in adapted_layers(ours)}
    peft_modules = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(peft_modules) == set(layers) and len(layers) == 4
    with torch.no_grad():
        for name, adapter in layers.items():
            peft_layer = peft_modules[name]
            assert peft_layer.scaling["default"] == adapter.scale == 2.0
            b = torch.randn_like(adapter.lora_B) * 0.5  # B starts at zero in both; make the update visible
            adapter.lora_A.copy_(peft_layer.lora_A["default"].weight)
            adapter.lora_B.copy_(b)
            peft_layer.lora_B["default"].weight.copy_(b)

    ids = torch.randint(0, 100, (3, 9))
    labels = torch.tensor([0, 2, 1])
    out_ours = ours(input_ids=ids, labels=labels)
    out_theirs = theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, adapter in layers.items():
        peft_layer = peft_modules[name]
        torch.testing.assert_close(adapter.lora_A.grad, peft_layer.lora_A["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adapter.lora_B.grad, peft_layer.lora_B["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)
    assert lsrfx.count_parameters(ours)[0] == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
