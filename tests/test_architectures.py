"""Coverage on the architectures people fine-tune, built from tiny random-weight `transformers` configs.

Every cell (architecture x method): adapt a ``torch.compile``d model -> two compiled training steps -> fold the
adapters in -> ``save_adapters`` / ``load_adapters`` into a freshly built base reproduces the outputs exactly.

Budget choices (the whole suite has ~10 minutes on 2 shared cores; measured here: a cold Inductor compile of one
tiny cell ~45 s, one ONNX export 4-8 s, one ``aot_eager`` training compile ~4 s):

* training compiles with ``backend="aot_eager"`` in the export cells (Dynamo captures the parametrized weights,
  the ``compose`` / ``kron_sum`` ops, and AOTAutograd builds forward and backward through their registered
  autograd) and ``backend="eager"`` (Dynamo capture only, ~10 % cheaper) in the others; Inductor only lowers the
  same graph and is exercised by the compile-pass tests. ``LSRFX_TEST_BACKEND=inductor`` runs the whole matrix on
  one backend.
* the ONNX leg (``merge_and_export`` -> onnxruntime, run here independently, equals eager PyTorch at fp32
  max abs diff <= 1e-4 on the example size and on a second batch/sequence size) runs for one method per
  architecture (``EXPORT_CELLS``, every method at least once). A merged graph does not depend on the method (same
  operators, only weight values differ; ``test_export`` shows it), so the other cells check the method-dependent
  part of the export, the merge of an independent copy, against the adapted model in eager PyTorch.

Models have one layer and hidden size 16 to 32, with large initial weights so that adapter effects dwarf the
tolerance.
"""

from __future__ import annotations

import copy
import inspect
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as tf

import lsrfx
from lsrfx.export.clone import independent_copy
from lsrfx.utils import unwrap

from conftest import TINY_OPTIONS

EXPORT_CELLS = {("bert", "lsr"), ("roberta", "genlora"), ("gpt2", "lora"), ("llama", "lsr"), ("t5", "condlora"),
                ("vit", "genlora")}
# Export cells train through AOTAutograd (the custom ops' autograd under compile); the others through Dynamo's
# capture only, which is where the parametrized weights enter the graph.
BACKEND = os.environ.get("LSRFX_TEST_BACKEND")

# Each cell compiles its own model; earlier compiles must not count against Dynamo's recompile limit.
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _text_batch(vocab: int, batch: int, seq: int, labels: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one row: the mask matters
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = torch.randint(0, 2, (batch,)) if labels == "class" else torch.randint(3, vocab, (batch, seq))
    return out


# The matrix builds its own models rather than conftest's tiny_bert / tiny_gpt2: all six architectures share one
# shape (one layer, hidden 16 to 32, training-mode dropout) and large initial weights (initializer_range 0.5), so
# that two training steps move the outputs far beyond the tolerance and 24 compiled cells stay within budget.
def bert(batch: int, seq: int):
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, problem_type="single_label_classification", initializer_range=0.5)
    return tf.BertForSequenceClassification(cfg), _text_batch(64, batch, seq, "class")


def roberta(batch: int, seq: int):
    cfg = tf.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1,
                           problem_type="single_label_classification", initializer_range=0.5)
    return tf.RobertaForSequenceClassification(cfg), _text_batch(64, batch, seq, "class")


def gpt2(batch: int, seq: int):
    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, initializer_range=0.5)
    return tf.GPT2LMHeadModel(cfg), _text_batch(64, batch, seq, "tokens")


def llama(batch: int, seq: int):
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.5)
    return tf.LlamaForCausalLM(cfg), _text_batch(64, batch, seq, "tokens")


def t5(batch: int, seq: int):
    cfg = tf.T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1, num_decoder_layers=1,
                      decoder_start_token_id=0, pad_token_id=0, initializer_factor=5.0)
    data = _text_batch(64, batch, seq, "tokens")
    data["labels"] = data["labels"][:, : max(seq - 2, 2)].contiguous()  # decoder length differs from the encoder's
    return tf.T5ForConditionalGeneration(cfg), data


def vit(batch: int, seq: int):
    cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3,
                       initializer_range=0.5)
    return tf.ViTForImageClassification(cfg), {"pixel_values": torch.randn(batch, 3, 8, 8),
                                               "labels": torch.randint(0, 3, (batch,))}


ARCHS = {"bert": bert, "roberta": roberta, "gpt2": gpt2, "llama": llama, "t5": t5, "vit": vit}


def build(arch: str, batch: int = 2, seq: int = 8, seed: int = 0):
    """The base model (eval-independent, fixed weights for ``seed``) and a training batch."""
    torch.manual_seed(seed)
    model, _ = ARCHS[arch](batch, seq)
    torch.manual_seed(seed + 1)
    _, data = ARCHS[arch](batch, seq)
    return model, data


def inference_inputs(model: torch.nn.Module, data: dict) -> dict:
    """The forward's inference keywords: labels dropped; T5 gets its decoder inputs as training derived them."""
    out = {k: v for k, v in data.items() if k != "labels"}
    if isinstance(model, tf.T5ForConditionalGeneration):
        out["decoder_input_ids"] = model._shift_right(data["labels"])
    return out


def eager_outputs(model: torch.nn.Module, inputs: dict) -> list[np.ndarray]:
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
            out = model(**inputs, **no_cache)
    finally:
        model.train(was_training)
    return [t.numpy() for t in out.values() if isinstance(t, torch.Tensor)]


def ort_outputs(path, inputs: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert set(names) == set(inputs), f"graph inputs {names} vs {sorted(inputs)}"
    return sess.run(None, {n: inputs[n].numpy() for n in names})


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b, strict=True))
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def ort_tolerance(want: list[np.ndarray]) -> float:
    """fp32 onnxruntime-vs-PyTorch tolerance, relative to the outputs' size as ``merge_and_export``'s own check
    (``lsrfx.export.verify``): 1e-4 x max(1, max |output|); T5's large-initialised outputs reach tens."""
    return 1e-4 * max(1.0, max(float(np.abs(w).max()) for w in want))


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapt_train_merge_reload(arch: str, method: str, tmp_path) -> None:
    model, data = build(arch)
    base = copy.deepcopy(model)
    backend = BACKEND or ("aot_eager" if (arch, method) in EXPORT_CELLS else "eager")
    compiled = lsrfx.adapt(torch.compile(model, backend=backend), method=method, **TINY_OPTIONS[method])
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        compiled(**data).loss.backward()
        opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the steps really ran compiled

    inputs = inference_inputs(model, data)
    want = eager_outputs(compiled, inputs)
    assert max_abs_diff(want, eager_outputs(base, inputs)) > 2e-3, "adapter effect must dwarf the tolerance"

    if (arch, method) in EXPORT_CELLS:
        report = lsrfx.merge_and_export(compiled, tmp_path / "model.onnx")  # inputs: the last (training) call
        assert max_abs_diff(ort_outputs(report.path, inputs), want) <= ort_tolerance(want)
        _, other = build(arch, batch=3, seq=5, seed=7)  # another batch and sequence size: dynamic axes
        other = inference_inputs(model, other)
        want_other = eager_outputs(compiled, other)
        assert max_abs_diff(ort_outputs(report.path, other), want_other) <= ort_tolerance(want_other)
    else:
        merged = lsrfx.merge(independent_copy(compiled))  # W0 + dW, which the adapted layers never formed
        assert max_abs_diff(eager_outputs(merged, inputs), want) <= 1e-5 * max(1.0, *(abs(w).max() for w in want))

    lsrfx.save_adapters(compiled, tmp_path / "adapters")
    fresh, _ = build(arch)
    lsrfx.load_adapters(fresh, tmp_path / "adapters")
    assert all(np.array_equal(x, y) for x, y in zip(eager_outputs(fresh, inputs), want, strict=True))
