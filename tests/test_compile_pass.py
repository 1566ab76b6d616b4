"""The compile pass: compiled (Inductor) == eager for outputs and adapter gradients, the rewrite hits exactly the
adapted layers, leaves other graphs alone, matches every linear-like form, and causes no recompiles."""

from __future__ import annotations

import operator

import pytest
import torch
import transformers
from torch import fx, nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.parametrization import adapter_parameters
from lsrfx.passes import fuse_adapted_linears, install, installed, uninstall
from lsrfx.passes.install import LsrfxFusePass

METHODS = {"lora": dict(r=2), "lsr": dict(r1=2, r2=2, separation_rank=2), "condlora": dict(r=2),
           "genlora": dict(r=3)}
STEPS = 5


@pytest.fixture
def no_inductor_cache():
    """Compile for real (the pass runs late, after cache lookup) and start from a clean Dynamo state."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def tiny(kind: str) -> tuple[nn.Module, list[str]]:
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=32)
        return transformers.BertModel(cfg, add_pooling_layer=False), ["query", "value"]
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32, use_cache=False)
    return transformers.GPT2Model(cfg), ["c_attn", "mlp.c_fc"]


def adapted_tiny(kind: str, method: str) -> nn.Module:
    model, targets = tiny(kind)
    model = lsrfx.adapt(model.eval(), method=method, targets=targets, **METHODS[method])
    with torch.no_grad():  # random adapters (dW != 0), so gradients and outputs are not trivially equal
        for p in adapter_parameters(model).values():
            p.normal_(0.0, 0.2)
    return model


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_equals_eager_fused_and_no_recompiles(no_inductor_cache, kind, method):
    model = adapted_tiny(kind, method)
    params = adapter_parameters(model)
    n_layers = len(list(lsrfx.parametrization.adapted_layers(model)))
    ids = torch.randint(0, 100, (2, 7))

    eager = output(model, ids)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()

    counters.clear()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(params.values(), lr=1e-3)
    for step in range(STEPS):
        out = output(compiled, ids)
        out.square().mean().backward()
        if step == 0:
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
            for name, p in params.items():
                torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert counters["lsrfx"]["fused"] == n_layers == 2  # exactly the adapted layers, nothing else
            assert counters["lsrfx"]["materialised"] == 0
        opt.step()
        opt.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["lsrfx"]["fused"] == 2  # the pass ran once: no recompile over the steps


def capture(model: nn.Module, *args) -> fx.GraphModule:
    graphs = []
    torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward)(*args)
    assert len(graphs) == 1
    return graphs[0]


def test_unadapted_graph_unchanged_and_pass_installed():
    torch._dynamo.reset()
    model, _ = tiny("bert")
    gm = capture(model.eval(), torch.randint(0, 100, (2, 5)))
    before = str(gm.graph)
    assert fuse_adapted_linears(gm.graph) == []
    assert str(gm.graph) == before
    assert installed()
    assert any(isinstance(p, LsrfxFusePass) for p in torch._inductor.config.pre_grad_custom_pass)


def test_install_chains_a_user_pass():
    def user_pass(graph: fx.Graph) -> None:
        pass

    old = torch._inductor.config.pre_grad_custom_pass
    try:
        torch._inductor.config.pre_grad_custom_pass = user_pass
        install()
        passes = torch._inductor.config.pre_grad_custom_pass
        assert isinstance(passes[0], LsrfxFusePass) and passes[1] is user_pass
        install()  # idempotent
        assert len(torch._inductor.config.pre_grad_custom_pass) == 2
        uninstall()
        assert torch._inductor.config.pre_grad_custom_pass is user_pass
    finally:
        torch._inductor.config.pre_grad_custom_pass = old
    assert installed()


compose = torch.ops.lsrfx.compose
kron = torch.ops.lsrfx.kron_sum
aten = torch.ops.aten
N_OUT, N_IN, R = 6, 8, 2


def consumers():
    """Each linear-like form, applied to a compose output ``c`` (``(out, in)``, or ``(in, out)`` if transposed)."""
    return {
        "F.linear": (False, lambda x, c, bias: torch.nn.functional.linear(x, c, bias)),
        "aten.linear": (False, lambda x, c, bias: aten.linear(x, c, bias)),
        "aten.linear.default": (False, lambda x, c, bias: aten.linear.default(x, c, bias)),
        "linear(T-stored c)": (True, lambda x, c, bias: torch.nn.functional.linear(x, c.t(), bias)),
        "torch.addmm": (True, lambda x, c, bias: torch.addmm(bias, x, c)),
        "aten.addmm.default": (True, lambda x, c, bias: aten.addmm.default(bias, x, c)),
        "aten.addmm": (True, lambda x, c, bias: aten.addmm(bias, x, c)),
        "torch.mm": (True, lambda x, c, bias: torch.mm(x, c) + bias),
        "aten.mm.default": (True, lambda x, c, bias: aten.mm.default(x, c) + bias),
        "aten.mm": (True, lambda x, c, bias: aten.mm(x, c) + bias),
        "torch.matmul": (True, lambda x, c, bias: torch.matmul(x, c) + bias),
        "aten.matmul.default": (True, lambda x, c, bias: aten.matmul.default(x, c) + bias),
        "operator.matmul": (True, lambda x, c, bias: operator.matmul(x, c) + bias),
        "mm(c.t())": (False, lambda x, c, bias: torch.mm(x, c.t()) + bias),
        "linear(x, c) with c stored (in,out)": ("odd", lambda x, c, bias: torch.nn.functional.linear(x, c, bias)),
    }


@pytest.mark.parametrize("lsr", [False, True], ids=["lowrank", "lsr"])
@pytest.mark.parametrize("form", list(consumers()))
def test_pass_matches_every_form(form, lsr):
    transposed, use = consumers()[form]
    # "odd": linear() consuming a compose(transposed=True): the adapter's (out, in) is the layer's (in, out)
    odd = transposed == "odd"
    stored_t = bool(transposed)
    a1, a2 = torch.randn(2, 2, 4), torch.randn(2, 1, 2)  # A: (R, N_IN)
    b1, b2 = torch.randn(2, 3, 2), torch.randn(2, 2, 1)  # B: (N_OUT, R)
    a, b = torch.randn(R, N_IN), torch.randn(N_OUT, R)
    w0 = torch.randn(N_IN, N_OUT) if stored_t else torch.randn(N_OUT, N_IN)
    d_in = N_OUT if odd else N_IN
    x, bias = torch.randn(5, d_in), torch.randn(N_IN if odd else N_OUT)

    def f(x, w0, bias, a, b, a1, a2, b1, b2):
        if lsr:
            a, b = kron(a1, a2), kron(b1, b2)
        return use(x, compose(w0, a, b, 0.5, stored_t), bias)

    gm = fx.symbolic_trace(f)
    inputs = (x, w0, bias, a, b, a1, a2, b1, b2)
    want = f(*inputs)
    decisions = fuse_adapted_linears(gm.graph, record=False)
    gm.recompile()
    assert [d.action for d in decisions] == ["fused"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert compose.default not in targets and compose not in targets  # dW is never formed
    assert (torch.ops.lsrfx.lsr_linear.default if lsr else torch.ops.lsrfx.lowrank_linear.default) in targets
    torch.testing.assert_close(gm(*inputs), want, atol=1e-5, rtol=1e-5)


def test_explain_reports_decisions_and_counts():
    model = adapted_tiny("gpt2", "lsr")
    text = lsrfx.explain(model, torch.randint(0, 100, (2, 5)))
    assert "fused ops: 2 of 2 adapted node(s)" in text
    assert text.count(": fused -> lsr_linear") == 2
    assert "--- after the lsrfx pass ---" in text and "FUSED" in text
    assert "=== graph breaks ===" in text
    plain, _ = tiny("bert")
    assert "fused ops: 0 of 0" in lsrfx.explain(plain.eval(), torch.randint(0, 100, (1, 4)))


def test_lsrfx_log_env(monkeypatch, caplog):
    import logging

    from lsrfx.passes.logs import LOGGER, configure_from_env

    monkeypatch.setenv("LSRFX_LOG", "1")
    configure_from_env()
    assert logging.getLogger(LOGGER).level == logging.INFO
    gm = fx.symbolic_trace(lambda x, w, a, b: torch.nn.functional.linear(x, compose(w, a, b, 1.0, False)))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fuse_adapted_linears(gm.graph)
    assert "1 of 1 adapted nodes fused" in caplog.text
