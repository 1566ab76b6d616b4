"""``lsrfx.compile_blocks``: each repeated block compiled in place, the block code compiled at most twice for a
whole decoder, the lsrfx pass fusing every adapted layer, compiled == eager, before or after ``adapt``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.utils import parametrize

import lsrfx
from lsrfx.parametrization import adapter_parameters
from lsrfx.regional import repeated_blocks

from conftest import TINY_OPTIONS, ToyNet, tiny_bert, tiny_llama

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 3



def counting_inductor() -> tuple[list[int], object]:
    """A backend that counts the graphs it compiles and compiles them with Inductor (so the lsrfx pass runs)."""
    from torch._inductor.compile_fx import compile_fx

    graphs: list[int] = []

    def backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    return graphs, backend


def random_adapters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters with random values (``dW != 0``: every factor gets a gradient)."""
    params = adapter_parameters(model)
    with torch.no_grad():
        for p in params.values():
            p.normal_(0.0, 0.2)
    return params


def loss_of(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=ids, labels=ids, use_cache=False)  # no KV cache: its per-layer state differs per block
    return out.logits, out.loss


@pytest.mark.parametrize("method", ["genlora", "condlora"])
def test_block_code_compiles_at_most_twice_and_equals_eager(uncached_compile, method):
    """GenLoRA (its factor banks batched across a block's layers by the pass) and CondLoRA (the first block owns the
    shared pairs); LoRA and LSR-Adapt take the same path as far as compile_blocks goes, and the whole suite budget
    pays for two Inductor compiles of a decoder here.

    Training a tiny Llama (all seven projections adapted) with its decoder layers compiled: the block code is
    compiled at most twice (the first block's input needs no grad; CondLoRA's first block also owns the shared
    pairs), every adapted layer of each compiled block is fused, no graph break, and outputs and gradients equal
    eager's within 1e-5; further training steps compile nothing more."""
    model = lsrfx.adapt(tiny_llama(num_hidden_layers=LAYERS).train(), method=method, targets=ALL_SEVEN,
                        **TINY_OPTIONS[method])
    params = random_adapters(model)
    ids = torch.randint(3, 100, (2, 9))
    logits, loss = loss_of(model, ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()

    graphs, backend = counting_inductor()
    assert lsrfx.compile_blocks(model, backend=backend) is model
    compiled_logits, compiled_loss = loss_of(model, ids)
    compiled_loss.backward()
    assert 1 <= len(graphs) <= 2, graphs
    assert counters["lsrfx"]["fused"] == len(ALL_SEVEN) * len(graphs), dict(counters["lsrfx"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled_logits, logits, atol=1e-5, rtol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)

    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        _, step_loss = loss_of(model, ids)
        step_loss.backward()
        assert torch.isfinite(step_loss)
    assert len(graphs) <= 2, graphs
    assert any(not torch.equal(p, before[n]) for n, p in params.items())


def test_compile_blocks_before_adapt(uncached_compile):
    """``compile_blocks`` first, ``adapt`` after: compilation happens at the first call, so the blocks compile
    with the adapters (fused by the pass) and still share one compiled code."""
    model = tiny_llama(num_hidden_layers=LAYERS).train()
    graphs, backend = counting_inductor()
    lsrfx.compile_blocks(model, backend=backend)
    lsrfx.adapt(model, method="lora", targets=ALL_SEVEN, **TINY_OPTIONS["lora"])
    random_adapters(model)
    ids = torch.randint(3, 100, (2, 9))
    _, loss = loss_of(model, ids)
    loss.backward()
    assert 1 <= len(graphs) <= 2, graphs
    assert counters["lsrfx"]["fused"] == len(ALL_SEVEN) * len(graphs)


def test_blocks_found():
    """Decoder and encoder layers from ``_no_split_modules`` (not BERT's single embeddings module), an
    ``nn.ModuleList`` of one class, classes given by name or type; the outermost block only; an error otherwise."""
    llama = tiny_llama(num_hidden_layers=3)
    assert [n for n, _ in repeated_blocks(llama)] == [f"model.layers.{i}" for i in range(3)]
    assert [n for n, _ in repeated_blocks(tiny_bert())] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [n for n, _ in repeated_blocks(ToyNet())] == ["blocks.0", "blocks.1"]
    assert [n for n, _ in repeated_blocks(llama, blocks=["LlamaMLP"])] == [f"model.layers.{i}.mlp" for i in range(3)]
    layer_class = type(llama.model.layers[0])
    assert len(repeated_blocks(llama, blocks=[layer_class, "LlamaMLP"])) == 3  # the MLPs sit inside the layers
    with pytest.raises(lsrfx.LsrfxError, match="no repeated blocks"):
        lsrfx.compile_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_shared_classes_keep_each_layer_its_own(fresh_dynamo):
    """After a compiled call, adapted layers at one position share one class; each still reads its own weight
    (also under ``parametrize.cached()``); merging after ``compile_blocks`` keeps the outputs; a deep copy of the
    model runs its blocks uncompiled."""
    model = lsrfx.adapt(ToyNet(), method="lora", targets=["query", "value"], **TINY_OPTIONS["lora"])
    random_adapters(model)
    x = torch.randn(2, 5, 32)
    want = model(x)
    lsrfx.compile_blocks(model, backend="eager")
    torch.testing.assert_close(model(x), want)
    first, second = model.blocks[0].query, model.blocks[1].query
    assert type(first) is type(second) and parametrize.is_parametrized(first)
    with parametrize.cached():
        assert not torch.equal(first.weight, second.weight)
        assert torch.equal(first.weight, first.weight.detach())
    clone = copy.deepcopy(model)
    assert all(b._compiled_call_impl is None for b in clone.blocks)
    torch.testing.assert_close(clone(x), want)
    lsrfx.merge(model)
    assert not parametrize.is_parametrized(model.blocks[0].query)
    torch.testing.assert_close(model(x), want, atol=1e-6, rtol=1e-5)
