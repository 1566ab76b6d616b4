"""Mixed precision under ``torch.compile`` for every method and every target of a Llama block (issue #23): bf16 and
fp16 autocast over fp32 weights, and bf16 weights with fp32 adapter masters, forward and backward, against the same
model run eagerly in the same precision.

The reproducer of the issue (LoRA on ``o_proj`` under bf16 autocast crashed with "expected m1 and m2 to have the
same dtype" in Inductor's code for ``merged_linear``) runs through Inductor. The matrix runs the lsrfx pass on
Dynamo's graph and then AOTAutograd without Inductor (``lsrfx_aot_eager``): the pass puts the same fused and merged
ops in the graph and their bodies run as traced, so a dtype mix fails the same way, at a fraction of Inductor's
compile time. Both fused and merged ops are exercised (``LSRFX_FUSE``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.parametrization import adapter_parameters
from lsrfx.passes.install import FUSE_PASS

from conftest import TINY_OPTIONS, tiny_llama

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_SCALE = 2.0**14
TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}  # relative, as tests/test_mixed_precision.py's bf16 tolerance


def lsrfx_aot_eager(gm, example_inputs):
    """Dynamo backend: the lsrfx pre-grad pass, then AOTAutograd with eager kernels (no Inductor code)."""
    FUSE_PASS(gm.graph)
    gm.recompile()
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def model(method: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    m = lsrfx.adapt(tiny_llama(num_hidden_layers=1).to(dtype).train(), method=method, targets=ALL_SEVEN,
                    **TINY_OPTIONS[method])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(m).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def run(m: nn.Module, autocast: torch.dtype | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        logits = m(input_ids=ids).logits
        loss = logits.float().square().mean()
    (loss * LOSS_SCALE).backward()  # as GradScaler does, so fp16 gradients stay above fp16's subnormal range
    return logits.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().float().clone()
                             for n, p in m.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def compare(compiled, eager, tol: float) -> None:
    (logits, grads), (want_logits, want_grads) = compiled, eager
    assert logits.dtype == want_logits.dtype, "compiled must give eager's output dtype"
    assert rel(logits, want_logits) <= tol
    assert grads.keys() == want_grads.keys() and grads
    total = sum(float(g.norm()) for g in want_grads.values())
    for name, g in want_grads.items():
        assert float((grads[name] - g).norm()) <= tol * max(float(g.norm()), 1e-2 * total), name


def test_the_issues_reproducer_compiles_under_bf16_autocast(uncached_compile) -> None:
    torch.manual_seed(0)
    m = lsrfx.adapt(tiny_llama(num_hidden_layers=1), method="lora", targets=["o_proj", "down_proj"],
                    **TINY_OPTIONS["lora"])
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = torch.compile(m)(ids).logits, m(ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    assert counters["lsrfx"]["fused"] + counters["lsrfx"]["merged"] == 2
    assert rel(got, want) <= TOL[torch.bfloat16]


# The fused ops for every method under bf16 autocast (the case of the issue) and with bf16 weights; fp16 autocast
# takes the same autocast rules with another dtype, checked on one method whose factors are parameters (LoRA) and
# one whose factors are ops (LSR-Adapt); the merged op (whose autocast rule differs: W0 joins the factors) under bf16
# autocast, for factors from the Kronecker op (LSR-Adapt) and from the RBF bank (GenLoRA). Each case is a cold
# compile: the pairs are chosen so that every op and rule runs without the whole cross product.
CASES = [(m, p, "always") for m in lsrfx.METHODS for p in ("bf16-autocast", "bf16-weights")]
CASES += [(m, "fp16-autocast", "always") for m in ("lora", "lsr")]
CASES += [(m, "bf16-autocast", "merged") for m in ("lsr", "genlora")]


@pytest.mark.parametrize("method, precision, fuse", CASES)
def test_compiled_mixed_precision_equals_eager(method: str, precision: str, fuse: str, monkeypatch) -> None:
    monkeypatch.setenv("LSRFX_FUSE", fuse)
    weights = torch.bfloat16 if precision == "bf16-weights" else torch.float32
    autocast = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
    eager = run(model(method, weights), autocast)
    compiled = run(torch.compile(model(method, weights), backend=lsrfx_aot_eager), autocast)
    fused = counters["lsrfx"]["fused"] + counters["lsrfx"]["merged"]
    assert fused >= len(ALL_SEVEN), dict(counters["lsrfx"])  # every adapted layer went through an lsrfx op
    compare(compiled, eager, TOL[torch.float16 if precision == "fp16-autocast" else torch.bfloat16])
