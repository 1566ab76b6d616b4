"""``merge_and_export``: the merged graph is the base graph (zero overhead), ``merge=False`` keeps adapters separate,
inputs are found, the caller's model is untouched, and every bad input of issue 4 fails clearly.

References are independent of the code under test: onnxruntime sessions run here, compared with eager PyTorch.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.api import adapt_state
from lsrfx.parametrization import adapted_layers, adapter_parameters

from conftest import tiny_bert, tiny_gpt2


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero adapters (fresh ones start at dW = 0, which would hide a missing adapter)."""
    with torch.no_grad():
        for p in adapter_parameters(lsrfx.utils.unwrap(model)).values():
            p.normal_(0.0, 0.5)


def ort_run(path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name].numpy() for i in sess.get_inputs()})


def torch_run(model: nn.Module, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**feeds)
    return [t.numpy() for t in (out.values() if isinstance(out, dict) else [out])]


def max_diff(a, b) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def op_types(path) -> Counter:
    return Counter((n.domain, n.op_type) for n in onnx.load(str(path)).graph.node)


def test_merged_export_is_the_base_graph_and_matches_pytorch(tmp_path) -> None:
    base = tiny_bert().bert  # the encoder: last_hidden_state and pooler_output
    model = lsrfx.adapt(copy.deepcopy(base), method="lsr", r1=1, r2=2, separation_rank=2,
                        targets=["query", "value", "intermediate.dense"])
    randomize_adapters(model)

    # Neither model has been called: both export with the Hugging Face dummy inputs (input_ids, 3 x 5).
    report = lsrfx.merge_and_export(model, tmp_path / "adapted.onnx")
    base_report = lsrfx.merge_and_export(base, tmp_path / "base.onnx")  # an un-adapted model: a plain export

    assert op_types(report.path) == op_types(base_report.path)  # same operators, same count: zero overhead
    assert not any("lsrfx" in d or t in ("compose", "kron_sum") for d, t in op_types(report.path))
    assert report.node_count == base_report.node_count == len(onnx.load(str(report.path)).graph.node)
    assert report.size == (tmp_path / "adapted.onnx").stat().st_size
    assert report.opset == next(o.version for o in onnx.load(str(report.path)).opset_import if o.domain == "")
    assert report.merged and report.max_diff is not None and report.max_diff <= 1e-4
    assert report.dynamic_axes == {"input_ids": [0, 1]}

    for shape in [(2, 8), (3, 5)]:  # two batch and sequence sizes through the dynamic axes
        feeds = {"input_ids": torch.randint(0, 64, shape)}
        want = torch_run(model, feeds)
        assert max_diff(want, torch_run(base, feeds)) > 1e-2  # the adapters matter far beyond the tolerance
        assert max_diff(ort_run(report.path, feeds), want) <= 1e-4
        assert max_diff(ort_run(base_report.path, feeds), torch_run(base, feeds)) <= 1e-4


def test_unmerged_export_keeps_adapter_tensors_separate(tmp_path) -> None:
    # GPT-2: Conv1D weights are stored (in, out), so this covers the transposed compose and LSR's kron_sum.
    model = lsrfx.adapt(tiny_gpt2(), method="lsr", r1=2, r2=1, separation_rank=3)
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 6))

    report = lsrfx.merge_and_export(model, tmp_path / "unmerged.onnx", {"input_ids": ids}, merge=False)

    proto = onnx.load(str(report.path))
    assert not report.merged and report.max_diff <= 1e-4
    assert {"Einsum", "MatMul"} <= {n.op_type for n in proto.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # standard ops: any onnxruntime runs it
    init_shapes = Counter(tuple(i.dims) for i in proto.graph.initializer)
    for name, p in adapter_parameters(model).items():
        assert init_shapes[tuple(p.shape)] >= 1, f"adapter tensor {name} {tuple(p.shape)} is not in the graph"
    feeds = {"input_ids": torch.randint(0, 64, (3, 4))}
    assert max_diff(ort_run(report.path, feeds)[:1], torch_run(model, feeds)[:1]) <= 1e-4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.value = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.value(torch.relu(self.query(x)))


def test_compiled_model_is_left_adapted_and_trainable(tmp_path) -> None:
    compiled = lsrfx.adapt(torch.compile(Tiny(), backend="eager"), method="lora", r=2)
    randomize_adapters(compiled)
    x = torch.randn(4, 3, 8)
    compiled(x)  # merge_and_export finds these inputs itself
    before = {k: v.clone() for k, v in compiled._orig_mod.state_dict().items()}
    flags = {n: p.requires_grad for n, p in compiled.named_parameters()}

    report = lsrfx.merge_and_export(compiled, tmp_path / "tiny.onnx")

    assert report.dynamic_axes == {"x": [0, 1]}
    assert max_diff(ort_run(report.path, {"x": x}), torch_run(compiled, {"x": x})) <= 1e-4
    state = compiled._orig_mod.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in compiled.named_parameters()} == flags
    assert len(list(adapted_layers(compiled._orig_mod))) == 2 and adapt_state(compiled) is not None
    opt = torch.optim.SGD([p for p in compiled.parameters() if p.requires_grad], lr=0.1)
    compiled(x).square().mean().backward()
    opt.step()
    lora_b = compiled._orig_mod.query.parametrizations.weight[0].adapter.lora_B
    assert not torch.equal(lora_b, before["query.parametrizations.weight.0.adapter.lora_B"])


def test_no_inputs_anywhere_names_example_inputs(tmp_path) -> None:
    model = lsrfx.adapt(Tiny(), method="lora", r=2)
    with pytest.raises(lsrfx.LsrfxError, match="example_inputs="):
        lsrfx.merge_and_export(model, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_fails_before_any_work(tmp_path) -> None:
    model = lsrfx.adapt(Tiny(), method="lora", r=2)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(lsrfx.LsrfxError, match="cannot write the ONNX file"):
        lsrfx.merge_and_export(model, blocker / "model.onnx", torch.randn(2, 8))
    with pytest.raises(lsrfx.LsrfxError, match="is a directory"):
        lsrfx.merge_and_export(model, tmp_path, torch.randn(2, 8))
    assert model.calls == 0  # failed before running the model at all


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.query(x)
        if h.sum() > 0:  # control flow on values: torch.export cannot capture this
            return h
        return -h


def test_unexportable_forward_names_the_failing_line_and_leaves_everything(tmp_path) -> None:
    model = lsrfx.adapt(DataDependent(), method="lora", r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = tmp_path / "model.onnx"
    target.write_text("previous export")
    with pytest.raises(lsrfx.LsrfxError) as info:
        lsrfx.merge_and_export(model, target, torch.randn(2, 8))
    message = str(info.value)
    assert "torch.export" in message and "example_inputs=" in message
    assert "test_export.py" in message and "h.sum() > 0" in message  # the failing part of the user's forward
    assert target.read_text() == "previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(list(adapted_layers(model))) == 1


def test_left_padded_batch_is_verified_at_its_real_positions(tmp_path) -> None:
    """Issue 23 item 3: a left-padded row's padded positions attend to nothing, and PyTorch's and onnxruntime's
    attention kernels (GPT-2's SDPA) give them different arbitrary values; verification compares the real ones."""
    model = lsrfx.adapt(tiny_gpt2(n_layer=1), method="lora", r=4, alpha=8.0)
    randomize_adapters(model)
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    report = lsrfx.merge_and_export(model, tmp_path / "model.onnx", {"input_ids": ids, "attention_mask": mask})

    assert "where attention_mask is 1" in report.verification
    for feeds in ({"input_ids": ids, "attention_mask": mask},
                  {"input_ids": torch.randint(0, 100, (3, 4)), "attention_mask": torch.tensor([[0, 0, 1, 1]] * 3)}):
        got = ort_run(report.path, feeds)[0]
        with torch.no_grad():
            want = model(**feeds).logits.numpy()
        real = feeds["attention_mask"].bool().numpy()
        assert np.abs(got[real] - want[real]).max() <= 1e-4


def test_verification_failure_reports_the_difference_and_writes_nothing(tmp_path) -> None:
    class Drifting(Tiny):  # a Python-side counter makes the traced graph differ from the reference call
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * self.calls

    model = lsrfx.adapt(Drifting(), method="lora", r=2)
    with pytest.raises(lsrfx.LsrfxError, match=r"differs by max abs [0-9.e+-]+ .* above the tolerance"):
        lsrfx.merge_and_export(model, tmp_path / "model.onnx", torch.randn(2, 8), dynamic=False)
    assert list(tmp_path.iterdir()) == []
