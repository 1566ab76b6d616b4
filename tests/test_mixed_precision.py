"""Mixed precision and activation checkpointing, eager and compiled, against the fp32 eager reference.

Every comparison is of the loss and of every trainable parameter's gradient after one backward, as a relative
error ``||g - g_ref|| / ||g_ref||``. Tolerances (documented; measured values on this machine in brackets):

* bf16 autocast, fp32 weights, eager or compiled: ``REL_BF16 = 5e-2`` (measured with the shared ``TINY_OPTIONS``
  0.4e-2 to 1.1e-2, LSR-Adapt worst; GenLoRA at r = 4 and its default alpha = 32, scale 8, measured 3.0e-2);
* bf16 base weights (activations, LayerNorm, everything but the adapters in bf16), fp32 adapter masters:
  ``REL_BF16_WEIGHTS = 1e-1`` (measured 0.9e-2 to 1.2e-2, CondLoRA worst; GenLoRA at scale 8 measured 5.0e-2, its
  small RBF-width gradients; compiled BERT with activation checkpointing 0.9e-2);
* activation checkpointing (``torch.utils.checkpoint`` around adapted blocks, ``gradient_checkpointing_enable``),
  fp32, eager: bit-exact (recomputation repeats the same kernels); with bf16 autocast on top: ``REL_BF16``.

A gradient whose norm is below ``FLOOR = 1 %`` of the whole gradient's is measured against that floor: its own
relative error is cancellation noise. Adapter parameters are first moved off their ``dW = 0`` initialisation so that
every factor has a gradient. Each low-precision test also checks its run really was low precision (non-zero error),
so it cannot pass vacuously.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

import lsrfx
from lsrfx.parametrization import adapter_parameters

from conftest import TINY_OPTIONS, TOY_CLASSES, TOY_WIDTH, ToyNet, tiny_bert

REL_BF16 = 5e-2
REL_BF16_WEIGHTS = 1e-1
FLOOR = 1e-2
SEQ = 6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every adapter parameter off its initialisation (same values whatever the model's dtype)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def toy(method: str, dtype: torch.dtype = torch.float32, ckpt: bool = False) -> ToyNet:
    """The shared toy (two adapted blocks and a head; ``ckpt``: each block under ``torch.utils.checkpoint``)."""
    torch.manual_seed(0)
    model = ToyNet(ckpt=ckpt).to(dtype)
    lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("head",), **TINY_OPTIONS[method])
    perturb(model)
    return model


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, SEQ, TOY_WIDTH, generator=g), torch.randint(0, TOY_CLASSES, (4,), generator=g)


def loss_and_grads(model: nn.Module, inputs: dict, autocast: bool = False) -> tuple[torch.Tensor, dict]:
    """One forward/backward; returns the fp32 loss and the gradients by parameter name (of the unwrapped model,
    without the toy wrapper's ``net.``). The logits' dtype is kept in ``LAST_DTYPE``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    LAST_DTYPE[0] = logits.dtype
    loss = nn.functional.cross_entropy(logits.float(), inputs.get("labels", inputs.get("y")))
    loss.backward()
    root = lsrfx.utils.unwrap(model)
    grads = {n.removeprefix("net."): p.grad.detach().clone() for n, p in root.named_parameters() if p.requires_grad}
    return loss.detach(), grads


LAST_DTYPE: list[torch.dtype] = [torch.float32]


class ToyWrapper(nn.Module):
    """Calls the toy with ``x`` only, so toy and BERT share ``loss_and_grads(model, inputs)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def toy_inputs() -> dict:
    x, y = toy_batch()
    return {"x": x, "y": y}


def assert_close_rel(loss, grads, ref_loss, ref_grads, tol: float, exact_ok: bool = True) -> float:
    """Loss and every gradient within ``tol`` relative error; returns the worst. A gradient whose norm is below
    ``FLOOR`` of the whole gradient's is measured against that floor (its relative error is cancellation noise)."""
    assert set(grads) == set(ref_grads) and grads, "trainable parameters differ"
    total = float(torch.cat([g.double().flatten() for g in ref_grads.values()]).norm())
    worst = rel(loss, ref_loss)
    for name, g in grads.items():
        ref = ref_grads[name].double()
        err = float((g.double() - ref).norm()) / max(float(ref.norm()), FLOOR * total)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
        worst = max(worst, err)
    assert worst <= tol, f"loss: relative error {worst:.3g} > {tol}"
    if not exact_ok:
        assert worst > 0, "the low-precision run gave fp32-identical results: it did not run in low precision"
    return worst


# ---------------------------------------------------------------- eager


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_bf16_autocast_eager(method: str) -> None:
    ref = loss_and_grads(ToyWrapper(toy(method)), toy_inputs())
    model = toy(method)
    loss, grads = loss_and_grads(ToyWrapper(model), toy_inputs(), autocast=True)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in adapter_parameters(model).values()), "autocast must leave fp32 parameters and gradients"
    assert_close_rel(loss, grads, *ref, REL_BF16, exact_ok=False)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_bf16_weights_with_fp32_adapter_masters(method: str) -> None:
    ref_model = toy(method)
    ref = loss_and_grads(ToyWrapper(ref_model), toy_inputs())
    model = toy(method, torch.bfloat16)
    adapters = adapter_parameters(model)
    assert all(p.dtype == torch.float32 for p in adapters.values()), "adapters must keep fp32 master weights"
    # Same initial adapter values as the fp32 model, so the gradients are comparable.
    for name, p in adapter_parameters(ref_model).items():
        torch.testing.assert_close(adapters[name], p, rtol=0, atol=0)
    x, y = toy_batch()
    loss, grads = loss_and_grads(ToyWrapper(model), {"x": x.bfloat16(), "y": y})
    for name, g in grads.items():
        expected = torch.float32 if name in adapters else torch.bfloat16
        assert g.dtype == expected, f"{name}: gradient in {g.dtype}, expected {expected}"
    assert_close_rel(loss, grads, *ref, REL_BF16_WEIGHTS, exact_ok=False)
    # fp32 masters keep updates that bf16 storage would round away: Adam's first step moves each entry by ~lr =
    # 1e-5, below bf16's resolution at these magnitudes, and still moves every adapter tensor.
    before = {n: p.detach().clone() for n, p in adapters.items()}
    torch.optim.Adam(list(adapters.values()), lr=1e-5).step()
    for name, p in adapters.items():
        changed = (p != before[name]) & (p.grad != 0)
        assert changed.any(), f"{name}: a tiny update was lost"
        assert bool((p.bfloat16().float() == before[name].bfloat16().float())[changed].any()), \
            "the update was not below bf16 resolution, so this check proves nothing"


def test_checkpoint_around_adapted_blocks_is_exact() -> None:
    for method in lsrfx.METHODS:
        ref = loss_and_grads(ToyWrapper(toy(method)), toy_inputs())
        loss, grads = loss_and_grads(ToyWrapper(toy(method, ckpt=True)), toy_inputs())
        torch.testing.assert_close(loss, ref[0], rtol=0, atol=0)
        assert set(grads) == set(ref[1])
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[1][name], rtol=0, atol=0, msg=f"{method} {name}")


def bert(method: str, dtype: torch.dtype = torch.float32, gc: bool = False) -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = tiny_bert().to(dtype)
    lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("classifier",), **TINY_OPTIONS[method])
    perturb(model)
    model.train()
    if gc:
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    return model


def bert_inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, 64, (4, 12), generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g)}  # tiny_bert has 3 labels


@pytest.mark.parametrize("method", ["lsr", "condlora"])
def test_transformers_gradient_checkpointing_eager(method: str) -> None:
    ref = loss_and_grads(bert(method), bert_inputs())
    loss, grads = loss_and_grads(bert(method, gc=True), bert_inputs())
    torch.testing.assert_close(loss, ref[0], rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[1][name], rtol=0, atol=0, msg=name)
    # and under bf16 autocast, against the fp32 reference
    loss, grads = loss_and_grads(bert(method, gc=True), bert_inputs(), autocast=True)
    assert_close_rel(loss, grads, *ref, REL_BF16, exact_ok=False)


# ---------------------------------------------------------------- compiled


def test_compiled_bf16_autocast() -> None:
    """torch.compile under bf16 autocast vs the fp32 eager run and the eager autocast run (checkpointed blocks;
    compiled checkpointing is covered by the BERT test below, one compile each keeps the suite fast)."""
    ref = loss_and_grads(ToyWrapper(toy("lsr")), toy_inputs())
    eager = loss_and_grads(ToyWrapper(toy("lsr", ckpt=True)), toy_inputs(), autocast=True)
    assert LAST_DTYPE[0] == torch.bfloat16
    loss, grads = loss_and_grads(torch.compile(ToyWrapper(toy("lsr"))), toy_inputs(), autocast=True)
    assert LAST_DTYPE[0] == torch.bfloat16, "compiled autocast must give eager autocast's output dtype"
    assert_close_rel(loss, grads, *ref, REL_BF16, exact_ok=False)
    assert_close_rel(loss, grads, *eager, REL_BF16)


def test_compiled_bert_gradient_checkpointing_bf16_weights() -> None:
    """torch.compile + ``gradient_checkpointing_enable`` on BERT with bf16 weights and fp32 adapter masters."""
    ref = loss_and_grads(bert("condlora"), bert_inputs())
    half = bert("condlora", torch.bfloat16, gc=True)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(half).values())
    loss, grads = loss_and_grads(torch.compile(half), bert_inputs())
    assert_close_rel(loss, grads, *ref, REL_BF16_WEIGHTS, exact_ok=False)

