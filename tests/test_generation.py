"""Decoder generation with unmerged adapters (issue #23): the adapted model generates the merged model's tokens,
forms each layer's factors once per generation rather than once per token, and under ``torch.compile`` decodes with
no more graphs and no more graph breaks than the base model; ``targets="all-linear"`` means what it means in peft.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.parametrization import adapted_layers
from lsrfx.targets import select_targets

from conftest import TINY_OPTIONS, tiny_bert, tiny_llama

PROMPT = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(4))


def adapted(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = lsrfx.adapt(tiny_llama(), method=method, targets="all-linear", **TINY_OPTIONS[method])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def generate(model: nn.Module, new: int = 12, cache: str | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              cache_implementation=cache)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_generation_forms_factors_once_and_matches_the_merged_model(method: str) -> None:
    model = adapted(method)
    calls = [0]
    for _, _, param in adapted_layers(model):
        original = param.adapter.factors

        def counted(w0, _original=original):
            calls[0] += 1
            return _original(w0)

        param.adapter.factors = counted
    tokens = generate(model)
    assert calls[0] == len(list(adapted_layers(model)))  # once per layer for the whole generation, not per token
    merged = lsrfx.merge(adapted(method))
    assert torch.equal(tokens, generate(merged))


def test_a_decoding_step_checks_each_layer_once_and_lists_layers_once(monkeypatch) -> None:
    """The call hook brings every layer's kept factors up to date before each forward without gradients; the
    layers then use them without checking again, and the list of adapted layers is walked once, not per token."""
    from lsrfx import factor_cache, serving

    model = adapted("lora")
    layers = len(list(adapted_layers(model)))
    checks, walks, forwards = [0], [0], [0]
    cache_key, walk = factor_cache._cache_key, serving.adapted_layers

    def counted(counter: list[int], function):
        def call(*args):
            counter[0] += 1
            return function(*args)
        return call

    monkeypatch.setattr(factor_cache, "_cache_key", counted(checks, cache_key))
    monkeypatch.setattr(serving, "adapted_layers", counted(walks, walk))
    model.register_forward_pre_hook(counted(forwards, lambda *_: None))
    tokens = generate(model)
    assert forwards[0] >= 12 and checks[0] == layers * forwards[0] and walks[0] == 1
    assert torch.equal(tokens, generate(lsrfx.merge(adapted("lora"))))


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic-cache", "static-cache"])
def test_compiled_decoding_adds_no_graph_and_no_graph_break(cache: str | None) -> None:
    """32 tokens with ``forward`` compiled (what ``generate`` calls), counted against the base model's own graphs.
    CondLoRA: its factors are the costliest to form, so the compiled graph reads the kept ones (every method takes
    the same path)."""
    method = "condlora"

    def compiled_run(model: nn.Module) -> tuple[torch.Tensor, int, int]:
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(model.forward, backend="eager")
        tokens = generate(model, new=32, cache=cache)
        return tokens, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())

    torch.manual_seed(0)
    _, base_graphs, base_breaks = compiled_run(tiny_llama())
    eager_tokens = generate(adapted(method), new=32, cache=cache)
    tokens, graphs, breaks = compiled_run(adapted(method))
    assert (graphs, breaks) == (base_graphs, base_breaks)
    assert torch.equal(tokens, eager_tokens)
    torch._dynamo.reset()


def test_all_linear_means_what_it_means_in_peft() -> None:
    from peft import LoraConfig, get_peft_model

    for build, task in ((tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS")):
        torch.manual_seed(0)
        peft = get_peft_model(build(), LoraConfig(target_modules="all-linear", task_type=task))
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A")
                        and isinstance(getattr(m, "base_layer", None), nn.Linear))
        assert sorted(select_targets(build(), "all-linear")) == theirs
    assert "lm_head" not in select_targets(tiny_llama(), "all-linear")


def test_explain_reports_the_mode_it_was_called_in(fresh_dynamo) -> None:
    """Issue 23 item 6: a model in eval mode under ``no_grad`` (a decoding step) is explained as such, not as
    training."""
    model = lsrfx.adapt(tiny_llama(), method="lora", targets=["q_proj"], **TINY_OPTIONS["lora"])
    ids = PROMPT[:, :6]
    with torch.no_grad():
        report = str(lsrfx.explain(model.eval(), ids))
    decisions = [line for line in report.splitlines() if "q_proj [linear" in line]
    assert decisions and all("(no grad," in line for line in decisions), report
    report = str(lsrfx.explain(model.train(), ids))
    decisions = [line for line in report.splitlines() if "q_proj [linear" in line]
    assert decisions and all("(training," in line for line in decisions), report
