"""The C++ Inductor generates for a compiled training step opens no OpenMP parallel region inside a loop.

torch 2.13's C++ backend does so for a reduction whose output ends in a dimension shorter than one vector (LSR's
``B`` ends in ``r2 = 2``, CondLoRA's ``W0 @ C_B.T`` in ``r = 8``, GenLoRA's centres in ``g = 2``): it then forks the
thread team inside every output iteration, hundreds of times per call, which a busy core turns into a scheduler
time slice each (``bench/train_step.py``'s busy scenario). lsrfx forms those factors transposed; this pins it for
every method at a transformer's layer size, on each path the compile pass can take: fused, merged and materialised.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import lsrfx

# Each method's defaults, as bench/train_step.py runs them (LoRA spelled out as peft's r = alpha = 8).
METHODS = {"lora": dict(r=8, alpha=8.0), "lsr": {}, "condlora": dict(r=8), "genlora": {}}


def parallel_regions(source: str) -> tuple[int, list[str]]:
    """``(all, nested)``: how many ``#pragma omp parallel`` the generated C++ in ``source`` has, and the kernels
    in which one sits inside a ``for`` loop (opened once per iteration of that loop)."""
    total, nested, kernel, scopes, loop_pending = 0, [], "", [], False
    for line in source.splitlines():
        stripped = line.strip()
        if found := re.match(r"^(\w+) = async_compile\.cpp", line):
            kernel, scopes, loop_pending = found.group(1), [], False
        if stripped.startswith("for("):
            loop_pending = True
        if stripped.startswith("#pragma omp parallel"):
            total += 1
            if any(scopes):
                nested.append(kernel)
        for ch in stripped:
            if ch == "{":
                scopes.append(loop_pending)
                loop_pending = False
            elif ch == "}" and scopes:
                scopes.pop()
    return total, nested


def test_detector_finds_a_nested_region() -> None:
    source = """cpp_fused_k = async_compile.cpp_pybinding([], r'''
    #pragma omp parallel
    {
    }
    for(int64_t x0=0; x0<4; x0+=1)
    {
        {
            #pragma omp parallel
            {
            }
        }
    }
''')"""
    assert parallel_regions(source) == (2, ["cpp_fused_k"])


ACTION = {"always": "fused", "merged": "merged", "never": "materialised"}


@pytest.mark.parametrize("fuse", list(ACTION), ids=list(ACTION.values()))
@pytest.mark.parametrize("method", list(METHODS))
def test_no_parallel_region_inside_a_loop(method: str, fuse: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method fused, merged (``merged_linear``) and materialised (``LSRFX_FUSE=never``: ``dW`` formed by the
    ``compose`` op); LSR-Adapt's merged and materialised ``A`` and ``B`` come from the ``kron_sum`` op."""
    monkeypatch.setenv("LSRFX_FUSE", fuse)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 384), nn.GELU(), nn.Linear(384, 384))
    lsrfx.adapt(model, method=method, targets=["0", "2"], **METHODS[method])
    compiled = torch.compile(model)
    x = torch.randn(8, 128, 384, requires_grad=True)
    counters.clear()

    def step() -> None:
        compiled(x).pow(2).mean().backward()

    # Two threads whatever the machine has, so that Inductor writes its OpenMP code; its caches off, so it compiles.
    with torch._inductor.config.patch({"cpp.threads": 2, "fx_graph_cache": False}):
        _, sources = run_and_get_code(step)
    assert counters["lsrfx"][ACTION[fuse]] == 2
    regions = [parallel_regions(source) for source in sources]
    assert len(sources) == 2 and all(total > 0 for total, _ in regions)  # forward and backward, both parallel
    nested = [kernel for _, kernels in regions for kernel in kernels]
    assert nested == [], f"{method}: OpenMP parallel regions inside loops in {nested}"


RANK_ONE = {"lora": dict(r=1), "lsr": dict(r1=1, r2=1, separation_rank=2), "condlora": dict(r=1),
            "genlora": dict(r=1)}


@pytest.mark.parametrize("fuse", ["always", "merged"])
@pytest.mark.parametrize("method", list(RANK_ONE))
def test_rank_one_factors_compiled_equal_eager(method: str, fuse: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank-1 ``B`` (``N x 1``) is both row- and column-major: its gradient's layout must still match, fused and
    merged."""
    monkeypatch.setenv("LSRFX_FUSE", fuse)  # the cost rule would materialise layers this small
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 24))
    lsrfx.adapt(model, method=method, targets=["0", "2"], **RANK_ONE[method])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # dW != 0, so that every factor gets a gradient
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 5, 32)
    model(x).pow(2).mean().backward()
    eager = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    counters.clear()
    with torch._inductor.config.patch({"fx_graph_cache": False}):
        torch.compile(model)(x).pow(2).mean().backward()
    assert counters["lsrfx"][ACTION[fuse]] == 2
    for name, p in params.items():
        torch.testing.assert_close(p.grad, eager[name], atol=1e-5, rtol=1e-4, msg=name)
