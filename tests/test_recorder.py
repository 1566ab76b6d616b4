"""The inputs ``merge_and_export`` falls back on (``lsrfx/export/recorded_inputs.py``): recorded without a graph
break or a recompile in either order of ``adapt`` and ``compile``, a few detached rows rather than the caller's
batch, copied once per call structure (not per step), gone after ``merge``, and enough to export after one forward
call in both orders."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.parametrization import adapter_parameters
from lsrfx.recorder import ROWS, latest
from lsrfx.utils import unwrap

from conftest import TINY_OPTIONS, TOY_WIDTH, ToyNet, tiny_llama, tiny_mlp

ORDERS = ["compile(adapt(m))", "adapt(compile(m))"]


def adapted(order: str) -> nn.Module:
    """``ToyNet`` with LoRA on its query/value layers, compiled before or after ``adapt``, adapters nonzero.

    A user-defined root module, as every real model is: ``torch.compile`` runs its hooks outside the compiled
    frame. (A bare ``torch.nn`` container as the root, e.g. ``nn.Sequential``, has its hooks traced instead; there the
    recorder costs one graph break before the first op, see ``lsrfx/export/recorded_inputs.py``.)
    """
    if order == "compile(adapt(m))":
        model = torch.compile(lsrfx.adapt(ToyNet(), method="lora", r=2), backend="eager")
    else:
        model = lsrfx.adapt(torch.compile(ToyNet(), backend="eager"), method="lora", r=2)
    with torch.no_grad():
        for p in adapter_parameters(unwrap(model)).values():
            p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("order", ORDERS)
def test_recording_adds_no_graph_break_and_no_recompile(order: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    model = adapted(order)
    calls = [torch.randn(5, 3, TOY_WIDTH) for _ in range(3)]
    for x in calls:
        model(x)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1  # one capture, reused: the hook costs no recompile
    assert torch.equal(latest(model)[0][0], calls[0][:ROWS])  # and it did record, under compile


def test_same_structure_is_recorded_once_a_new_structure_again() -> None:
    """A training loop pays one copy, not one per step; a call of another structure replaces the record."""
    model = lsrfx.adapt(Masked(), method="lora", r=2)
    first = torch.randn(6, 3, 4)
    bias = torch.randn(1, 4)
    model(first, torch.ones(6, 3), bias, scale=0.5)
    kept = latest(model)[0][0]
    model(torch.randn(4, 7, 4), torch.ones(4, 7), bias, scale=0.5)  # other sizes, same structure: nothing copied
    assert latest(model)[0][0] is kept and torch.equal(kept, first[:ROWS])
    second = torch.randn(6, 3, 4)
    model(second, torch.ones(6, 3), bias, scale=2.0)  # another plain argument value: recorded again
    assert torch.equal(latest(model)[0][0], second[:ROWS]) and latest(model)[1]["scale"] == 2.0
    third = torch.randn(6, 3, 4, dtype=torch.float64)
    model.double()
    model(third, torch.ones(6, 3, dtype=torch.float64), bias.double())  # another dtype, no keyword: recorded again
    assert latest(model)[0][0].dtype == torch.float64 and latest(model)[1] == {}


def test_explain_sees_one_graph_without_breaks() -> None:
    model = lsrfx.adapt(ToyNet(), method="lora", r=2)
    explanation = torch._dynamo.explain(model)(torch.randn(5, 3, TOY_WIDTH))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    assert latest(model) is not None


@pytest.mark.parametrize("order", ORDERS)
def test_export_without_example_inputs_after_one_forward(order: str, tmp_path) -> None:
    model = adapted(order)
    model(torch.randn(6, 3, TOY_WIDTH))

    report = lsrfx.merge_and_export(model, tmp_path / "model.onnx")

    assert report.dynamic_axes == {"x": [0, 1]}
    x = torch.randn(4, 5, TOY_WIDTH)  # other batch and sequence sizes than the recorded ones
    with torch.no_grad():
        want = model(x).numpy()
    got = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4


class Masked(nn.Module):
    """A model taking a batch, a per-row mask, a batch-independent bias row and a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.query(x) * mask.unsqueeze(-1) * scale + bias


def test_recorded_inputs_are_a_few_detached_rows_not_the_batch() -> None:
    model = lsrfx.adapt(Masked(), method="lora", r=2)
    x = torch.randn(6, 3, 4, requires_grad=True)
    mask = torch.ones(6, 3)
    bias = torch.randn(1, 4)
    model(x, mask, bias=bias, scale=0.5)

    (rec_x, rec_mask), rec_kwargs = latest(model)
    torch.testing.assert_close(rec_x, x[:ROWS].detach(), rtol=0, atol=0)
    torch.testing.assert_close(rec_mask, mask[:ROWS], rtol=0, atol=0)
    torch.testing.assert_close(rec_kwargs["bias"], bias, rtol=0, atol=0)  # leading size 1, not the batch: whole
    assert rec_kwargs["scale"] == 0.5
    assert not rec_x.requires_grad
    for recorded, given in ((rec_x, x), (rec_mask, mask), (rec_kwargs["bias"], bias)):
        assert recorded.untyped_storage().data_ptr() != given.untyped_storage().data_ptr()  # copies, not views

    batch = weakref.ref(x)
    del x
    gc.collect()
    assert batch() is None  # nothing lsrfx holds keeps the caller's batch alive

    with torch.inference_mode():
        model(torch.randn(3, 3, 4), torch.ones(3, 3), bias)
    assert latest(model)[0][0].shape == (ROWS, 3, 4) and not latest(model)[0][0].is_inference()

    owner = weakref.ref(model)
    del model
    gc.collect()
    assert owner() is None  # the recording does not keep the model alive either


def test_merge_stops_recording() -> None:
    model = lsrfx.adapt(tiny_mlp(), method="lora", r=2)
    model(torch.randn(2, 12))
    assert latest(model) is not None
    lsrfx.merge(model)
    assert latest(model) is None
    model(torch.randn(2, 12))
    assert latest(model) is None and len(model._forward_pre_hooks) == 0


def test_export_right_after_generate(tmp_path) -> None:
    """Issue 23 item 2: the recorded inputs are generate's first call (a ``DynamicCache`` that the later steps fill for
    the whole batch, ``logits_to_keep=1``, ``return_dict=True``); export takes them as a plain forward over the
    prompt, and the recording does not keep generate's cache alive."""
    model = lsrfx.adapt(tiny_llama(num_hidden_layers=1), method="lora", **TINY_OPTIONS["lora"])
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0.0, 0.3)
    ids = torch.randint(3, 100, (3, 7))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert not any(type(v).__name__.endswith("Cache") for v in latest(model)[1].values())

    report = lsrfx.merge_and_export(model, tmp_path / "model.onnx")

    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    new = torch.randint(3, 100, (2, 5))  # another batch and length; every position's logits, not only the last
    feeds = {"input_ids": new, "attention_mask": torch.ones_like(new), "position_ids": torch.arange(5).expand(2, 5)}
    feeds = {i.name: feeds[i.name] for i in sess.get_inputs()}
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
    got = sess.run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]
    assert got.shape == (2, 5, 100) and np.abs(got - want).max() <= 1e-4
