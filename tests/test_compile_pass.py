"""The compile pass: compiled (Inductor) == eager for outputs and adapter gradients, the rewrite hits exactly the
adapted layers, leaves other graphs alone, matches every linear-like form, and causes no recompiles."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.parametrization import adapter_parameters
from lsrfx.passes import fuse_adapted_linears, install, installed, uninstall
from lsrfx.passes.install import LsrfxFusePass

from conftest import TINY_OPTIONS, tiny_bert, tiny_gpt2

STEPS = 5


@pytest.fixture
def no_inductor_cache():
    """Compile for real (the pass runs late, after cache lookup) and start from a clean Dynamo state."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def tiny(kind: str) -> tuple[nn.Module, list[str]]:
    """The shared tiny encoder (BERT) or decoder (GPT-2) without its head, cut to one layer so that exactly two
    layers are adapted (the counts below), and the two targets."""
    if kind == "bert":
        return tiny_bert(num_hidden_layers=1).bert, ["query", "value"]
    return tiny_gpt2(n_layer=1).transformer, ["c_attn", "mlp.c_fc"]


def adapted_tiny(kind: str, method: str) -> nn.Module:
    model, targets = tiny(kind)
    model = lsrfx.adapt(model.eval(), method=method, targets=targets, **TINY_OPTIONS[method])
    with torch.no_grad():  # random adapters (dW != 0), so gradients and outputs are not trivially equal
        for p in adapter_parameters(model).values():
            p.normal_(0.0, 0.2)
    return model


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


# Fused for every method on both layer kinds; merged (which takes any structure's dense A and B) for every method
# on one kind each, alternating, so that both kinds and every method go through merged_linear.
COMPILED_CASES = [(m, kind, "auto") for m in lsrfx.METHODS for kind in ("bert", "gpt2")]
COMPILED_CASES += [(m, ("bert", "gpt2")[i % 2], "merged") for i, m in enumerate(lsrfx.METHODS)]


@pytest.mark.parametrize(("method", "kind", "policy"), COMPILED_CASES,
                         ids=[f"{m}-{k}-{'fused' if p == 'auto' else p}" for m, k, p in COMPILED_CASES])
def test_compiled_equals_eager_fused_and_no_recompiles(no_inductor_cache, monkeypatch, kind, method, policy):
    """Outputs and gradients of the compiled model equal eager's, fused (what the rule picks for 14 tokens) and
    merged (``merged_linear``), on BERT's ``linear`` and GPT-2's ``Conv1D`` (``addmm``, ``(in, out)`` weights)."""
    monkeypatch.setenv("LSRFX_FUSE", policy)
    action = "fused" if policy == "auto" else "merged"
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
            assert counters["lsrfx"][action] == n_layers == 2  # exactly the adapted layers, nothing else
            assert sum(counters["lsrfx"].values()) == 2, dict(counters["lsrfx"])
        opt.step()
        opt.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["lsrfx"][action] == 2  # the pass ran once: no recompile over the steps


def test_a_second_model_with_another_scale_compiles_once(no_inductor_cache):
    """Two models of one structure whose adapters differ only in scale, compiled one after the other in one process
    (``lsrfx finetune --compare --compile``): the second also compiles once, its scale a constant, and matches
    eager. (Held as a float attribute, Dynamo's automatic dynamic made the second scale a symbol, specialised it
    again inside the backend and compiled the graph twice: the pass ran 4 times for 2 layers.)"""
    torch._dynamo.reset()
    ids = torch.randint(0, 100, (2, 7))
    for alpha in (2.0, 1.0):  # scale 1.0, then 0.5
        model, targets = tiny("bert")
        model = lsrfx.adapt(model.eval(), method="lora", targets=targets, r=2, alpha=alpha)
        with torch.no_grad():
            for p in adapter_parameters(model).values():
                p.normal_(0.0, 0.2)
        counters.clear()
        out = output(torch.compile(model), ids)
        assert counters["lsrfx"]["fused"] == 2, dict(counters["lsrfx"])
        torch.testing.assert_close(out, output(model, ids), atol=1e-5, rtol=1e-5)


def capture(model: nn.Module, *args) -> fx.GraphModule:
    graphs = []
    torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward)(*args)
    assert len(graphs) == 1
    return graphs[0]


def test_unadapted_graph_unchanged_and_pass_installed():
    torch._dynamo.reset()
    uninstall()
    adapted_tiny("bert", "lora")  # adapt installs the pass (importing lsrfx does not)
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

    install()
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


@pytest.mark.parametrize("policy", ["auto", "merged"])
@pytest.mark.parametrize("lsr", [False, True], ids=["lowrank", "lsr"])
@pytest.mark.parametrize("form", list(consumers()))
def test_pass_matches_every_form(form, lsr, policy, monkeypatch):
    monkeypatch.setenv("LSRFX_FUSE", policy)  # auto: no shapes in a symbolic trace, so fused by default
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
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert compose.default not in targets and compose not in targets  # no compose node (merged forms W0 + dW inside)
    if policy == "merged":
        assert [d.action for d in decisions] == ["merged"]
        assert torch.ops.lsrfx.merged_linear.default in targets
        assert (kron in targets or kron.default in targets) == lsr  # A and B stay the kron_sum nodes' outputs
    else:
        assert [d.action for d in decisions] == ["fused"]
        assert (torch.ops.lsrfx.lsr_linear.default if lsr else torch.ops.lsrfx.lowrank_linear.default) in targets
    torch.testing.assert_close(gm(*inputs), want, atol=1e-5, rtol=1e-5)


def test_explain_reports_decisions_and_counts():
    model = adapted_tiny("gpt2", "lsr")
    text = lsrfx.explain(model, torch.randint(0, 100, (2, 5)), graphs=True)
    assert "fused ops: 2 of 2 adapted node(s)" in text
    # Off CUDA LSR-Adapt fuses through lowrank_linear fed by its kron_sum nodes (which the pass batches across layers)
    assert text.count(": fused -> lowrank_linear") == 2
    assert text.count("[addmm, lsrfx::lowrank_linear]: fused") == 2  # Conv1D's addmm, fused op named in full
    assert text.count("A and B formed by kron_sum ops (off CUDA)") == 2
    assert "--- after the lsrfx pass ---" in text and "FUSED" in text
    assert "=== graph breaks ===" in text
    plain, _ = tiny("bert")
    assert "fused ops: 0 of 0" in lsrfx.explain(plain.eval(), torch.randint(0, 100, (1, 4)))


def test_explain_shows_merged_layers(monkeypatch):
    monkeypatch.setenv("LSRFX_FUSE", "merged")
    text = lsrfx.explain(adapted_tiny("gpt2", "lsr"), torch.randint(0, 100, (2, 5)), graphs=True)
    assert "fusion policy 'merged'" in text and "2 adapted node(s), 0 fused, 2 merged" in text
    assert text.count("[addmm, lsrfx::lowrank_linear]: merged -> merged_linear") == 2
    assert "MERGED" in text and "fused ops: 0 of 2 adapted node(s); merged: 2" in text


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


def test_skipped_node_is_left_unchanged_with_its_reason():
    """A node the pass can match but not fuse (addmm with beta != 1) is reported as skipped, graph untouched."""
    x, w0, bias = torch.randn(5, N_IN), torch.randn(N_IN, N_OUT), torch.randn(N_OUT)
    a, b = torch.randn(R, N_IN), torch.randn(N_OUT, R)
    gm = fx.symbolic_trace(lambda x, w0, bias, a, b: torch.addmm(bias, x, compose(w0, a, b, 0.5, True), beta=2))
    before = str(gm.graph)
    decisions = fuse_adapted_linears(gm.graph, record=False)
    assert [(d.action, d.reason, d.fused_op) for d in decisions] == [("skipped", "addmm with beta/alpha != 1", "")]
    assert str(gm.graph) == before
    gm.recompile()
    want = 2 * bias + x @ (w0 + 0.5 * (b @ a).t())
    torch.testing.assert_close(gm(x, w0, bias, a, b), want, atol=1e-5, rtol=1e-5)


IMPORT_PROBE = r"""
import json, logging
import torch._inductor.config as inductor_config
import lsrfx.passes
logger = logging.getLogger("lsrfx.compile")
at_import = {"pass": repr(inductor_config.pre_grad_custom_pass), "handlers": len(logger.handlers),
             "level": logger.level}
lsrfx.passes.install()
lsrfx.passes.install()
print(json.dumps({"at_import": at_import, "installed": lsrfx.passes.installed(),
                  "n_passes": len(inductor_config.pre_grad_custom_pass), "handlers": len(logger.handlers),
                  "level": logger.level}))
"""


def test_importing_passes_changes_no_config_and_install_applies_lsrfx_log():
    """LSRFX_LOG is set, yet ``import lsrfx.passes`` neither installs the pass nor touches the logger; install()
    does both, once."""
    import json
    import logging
    import os
    import subprocess
    import sys

    env = {**os.environ, "LSRFX_LOG": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["at_import"] == {"pass": "None", "handlers": 0, "level": logging.NOTSET}
    assert result["installed"] and result["n_passes"] == 1
    assert result["handlers"] == 1 and result["level"] == logging.INFO


def test_bogus_fusion_policy_raises_lsrfx_error(monkeypatch):
    from lsrfx.settings import fuse_policy

    monkeypatch.setenv("LSRFX_FUSE", "bogus")
    with pytest.raises(lsrfx.LsrfxError, match="LSRFX_FUSE='bogus'.*auto.*always.*never"):
        fuse_policy()
    gm = fx.symbolic_trace(lambda x, w, a, b: torch.nn.functional.linear(x, compose(w, a, b, 1.0, False)))
    with pytest.raises(lsrfx.LsrfxError, match="LSRFX_FUSE"):
        fuse_adapted_linears(gm.graph, record=False)
    with pytest.raises(lsrfx.LsrfxError, match="LSRFX_FUSE"):
        LsrfxFusePass().uuid()


# --- the cost model --------------------------------------------------------------------------------------------


def _decision(tokens: int, d_in: int, d_out: int, rank: int, **kw) -> str:
    from lsrfx.passes import cost_model

    return cost_model.decide(cost_model.Shape(tokens=tokens, d_in=d_in, d_out=d_out, rank=rank, training=True,
                                              **kw))[0]


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("rank", [1, 4, 8, 32, 128])
def test_cost_rule_is_monotone_in_tokens_and_width(monkeypatch, rank, input_grad):
    """Fused below one token count, materialised above it; and a layer that fuses still fuses when wider."""
    monkeypatch.delenv("LSRFX_FUSE", raising=False)
    tokens = [2**i for i in range(4, 18)]
    widths = [16, 32, 64, 128, 256, 384, 768, 1024, 2048, 4096]
    for d in widths:
        for d_out in (d, 2 * d, max(8, d // 3)):
            fused = [_decision(m, d, d_out, rank, input_grad=input_grad) == "fused" for m in tokens]
            assert fused == sorted(fused, reverse=True), (d, d_out, fused)  # True... then False...
    for m in tokens:
        fused = [_decision(m, d, d, rank, input_grad=input_grad) == "fused" for d in widths]
        assert fused == sorted(fused), (m, fused)  # False... then True...


def test_cost_rule_decisions_on_the_benchmark_layers(monkeypatch):
    """2,048 tokens (batch 16 x 128) at hidden 384 and 1,024: every method's default rank merges on CPU (one matmul
    through W0 + dW, rank-r factor gradients); never on CUDA (whose fused kernel computes x @ A.T inside the base
    matmul), and it fuses over a base of another dtype than the factors (merging would round dW); few tokens fuse;
    narrow layers fed many tokens materialise; without a backward, many tokens materialise; LSRFX_FUSE overrides."""
    from lsrfx.passes import cost_model

    monkeypatch.delenv("LSRFX_FUSE", raising=False)
    for d in (384, 1024):
        for r in (4, 8, 32):
            for input_grad in (True, False):
                assert _decision(2048, d, d, r, input_grad=input_grad) == "merged", (d, r, input_grad)
                assert _decision(2048, d, d, r, input_grad=input_grad, device="cuda") != "merged", (d, r)
                assert _decision(2048, d, d, r, input_grad=input_grad, same_dtype=False) == "fused", (d, r)
        assert _decision(256, d, d, 8) == "fused"
    assert _decision(8192, 64, 64, 8) == "materialised"
    infer = cost_model.Shape(tokens=8192, d_in=384, d_out=384, rank=8, training=False)
    assert cost_model.decide(infer)[0] == "materialised" and cost_model.costs(infer).merged is None
    assert cost_model.decide(cost_model.Shape(16, 384, 384, 8, training=False))[0] == "fused"
    c = cost_model.costs(cost_model.Shape(2048, 384, 384, 8, True, factor_flops=1e6))
    assert c.factors > 0 and c.merged < c.fused < c.materialised  # the factor cost is in every time
    monkeypatch.setenv("LSRFX_FUSE", "never")
    assert _decision(16, 384, 384, 8) == "materialised"
    monkeypatch.setenv("LSRFX_FUSE", "always")
    assert _decision(8192, 64, 64, 8) == "fused"
    monkeypatch.setenv("LSRFX_FUSE", "merged")
    assert _decision(16, 384, 384, 8) == "merged"
    assert _decision(16, 384, 384, 8, same_dtype=False) == "fused"  # never rounds dW to the base's dtype


@pytest.mark.parametrize(("d", "tokens", "form"), [(8, 3, "reductions"), (2048, 3, "stacked"), (2048, 1024, "stacked")])
def test_small_factor_products_become_reductions(d, tokens, form):
    """CondLoRA-style factors (``C_A @ W0.T``, ``W0 @ C_B.T``) are rewritten as broadcast-product reductions when
    small (Inductor fuses those into existing kernels); when large, they ride on the base matmul
    (``lsrfx::condlora_linear``) with few tokens and with many (1024: the stack pays at every token count); the
    result is the same."""
    r = 4  # 2 r d^2 flops per product: ~500 at d = 8, ~3e7 at d = 2048 (above cost_model.SMALL_PRODUCT_FLOPS)
    x, w0, bias = torch.randn(tokens, d), torch.randn(d, d) / d**0.5, torch.randn(d)
    ca, cb = torch.randn(r, d) / d**0.5, torch.randn(r, d) / d**0.5

    def f(x, w0, bias, ca, cb):
        return torch.nn.functional.linear(x, compose(w0, ca @ w0.t(), w0 @ cb.t(), 0.5, False), bias)

    gm = fx.symbolic_trace(f)
    want = f(x, w0, bias, ca, cb)
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) as mode:  # meta values, as Dynamo's graph has
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        FakeTensorProp(gm, mode).propagate(x, w0, bias, ca, cb)
    decisions = fuse_adapted_linears(gm.graph, record=False)
    gm.recompile()
    assert [d_.action for d_ in decisions] == ["fused"]
    assert ("generated as reductions" in decisions[0].reason) == (form == "reductions")
    assert (decisions[0].fused_op == "lsrfx::condlora_linear") == (form == "stacked")
    from lsrfx.kernels.factor_table import is_fused_op  # what explain marks FUSED

    assert sum(map(is_fused_op, gm.graph.nodes)) == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.matmul]
    torch.testing.assert_close(gm(x, w0, bias, ca, cb), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("method, op, calls", [("genlora", "rbf_bank", 1), ("lsr", "kron_sum", 2)])
def test_factor_ops_of_equal_shapes_are_batched(method, op, calls):
    """GenLoRA's RBF banks and LSR-Adapt's Kronecker sums of layers with equal shapes become one batched call on
    stacked inputs (so the generated code does not grow with the depth). BERT's query and value are both 32 x 32:
    their four banks share one shape (one call); LSR's A factors and B factors differ (two calls)."""
    model = adapted_tiny("bert", method)
    text = lsrfx.explain(model, torch.randint(0, 100, (2, 5)), graphs=True)
    after = text.split("--- after the lsrfx pass ---")[1]
    assert "stack_factors" in after and "unstack_factors" in after
    assert after.count(f"target=torch.ops.lsrfx.{op}.default") == calls  # of 4 calls before the pass


@pytest.mark.parametrize(("layer", "d_out", "d_in"), [("linear", 512, 512), ("linear", 384, 768), ("conv1d", 768, 384)])
def test_condlora_layers_with_few_tokens_compile_to_the_stacked_op(uncached_compile, layer, d_out, d_in):
    """Compiled, a CondLoRA layer whose factor products pay to ride on the base matmul (few tokens) becomes
    ``lsrfx::condlora_linear`` (forward and backward ops called by the generated code, no separate products); its
    output and gradients (a trainable bias's included) equal the eager formed-weight path's. Square, non-square,
    and GPT-2's ``Conv1D`` (``W0`` stored ``(in, out)``); sizes whose factor products are BLAS-sized (above
    ``cost_model.SMALL_PRODUCT_FLOPS`` at r = 8)."""
    from torch._inductor.utils import run_and_get_code
    from transformers.pytorch_utils import Conv1D

    from lsrfx.adapted_layer import formed_weight_path

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out) if layer == "linear" else Conv1D(d_out, d_in))
    lsrfx.adapt(model, method="condlora", targets=["0"], r=8)
    model[0].bias.requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(2, 9, d_in, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    with formed_weight_path():
        want = model(x)
        want_grads = torch.autograd.grad(want.square().sum(), params)
    compiled = torch.compile(model)

    def run():
        out = compiled(x)
        return out, torch.autograd.grad(out.square().sum(), params)

    (out, grads), code = run_and_get_code(run)
    text = "\n".join(code)
    assert "torch.ops.lsrfx.condlora_linear.default" in text and "condlora_linear_backward.default" in text
    assert "lowrank_linear" not in text
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
