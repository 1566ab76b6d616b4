"""``merge_and_export(model, path, with_past=True)`` (issue 23 item 1): a decoder-only causal LM as one ONNX graph with
its key/value cache, in optimum's ``text-generation-with-past`` form, and the runtime config beside it.

Reference: this file's own greedy loop in onnxruntime (prompt from an empty past, then one token per call, the cache
fed back by name) against PyTorch ``generate`` on the adapted, unmerged model: equal tokens, logits of real positions
within 1e-4. The four methods run on Llama (grouped-query attention); Qwen2, GPT-2 and Mistral (grouped-query, a
sliding window shorter than the generated text) run one method each: the with-past graph is built the same way
whatever the method (the method only changes the merged weights, which the single-pass export tests cover per
method), so per-architecture coverage needs one method each.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.parametrization import adapter_parameters

from conftest import TINY_OPTIONS, tiny_bert, tiny_gpt2, tiny_llama

NEW_TOKENS = 16
ATOL = 1e-4


def randomize_adapters(model: nn.Module) -> None:
    """Non-zero adapters (fresh ones start at dW = 0, which would hide a missing adapter)."""
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0.0, 0.3)


def left_padded_prompt(vocab: int, pad: int, length: int = 8, padding: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0
    ids[1, :padding] = pad
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def ort_greedy(path, ids: torch.Tensor, mask: torch.Tensor, eos: list[int]) -> tuple[np.ndarray, np.ndarray, list]:
    """Greedy generation with the cache in onnxruntime, end-of-sequence suppressed (as ``min_new_tokens`` does):
    (tokens (batch, NEW_TOKENS), prompt logits, logits of every new token's choice)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions(mask).numpy()}
    for name in past_names:  # an empty past: (batch, kv_heads, 0, head_size)
        feed[name] = np.zeros((ids.shape[0], shapes[name][1], 0, shapes[name][3]), np.float32)
    out_names = [o.name for o in sess.get_outputs()]
    tokens, steps = [], []
    prompt_logits = None
    for _ in range(NEW_TOKENS):
        out = dict(zip(out_names, sess.run(None, feed), strict=True))
        prompt_logits = out["logits"] if prompt_logits is None else prompt_logits
        logits = out["logits"][:, -1]
        steps.append(logits)
        scores = logits.copy()
        scores[:, eos] = -np.inf
        token = scores.argmax(-1)[:, None]
        tokens.append(token)
        mask_np = np.concatenate([feed["attention_mask"], np.ones_like(token)], axis=1)
        feed = {"input_ids": token, "attention_mask": mask_np, "position_ids": feed["position_ids"][:, -1:] + 1}
        feed.update({name: out[name.replace("past_key_values.", "present.")] for name in past_names})
    return np.concatenate(tokens, axis=1), prompt_logits, steps


def check_generation(model: nn.Module, path, vocab: int, pad: int, eos: list[int]) -> None:
    ids, mask = left_padded_prompt(vocab, pad)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad, output_logits=True,
                              return_dict_in_generate=True)
        prompt_want = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.numpy()
    tokens, prompt_logits, steps = ort_greedy(path, ids, mask, eos)

    np.testing.assert_array_equal(tokens, want.sequences[:, ids.shape[1]:].numpy())
    real = mask.bool().numpy()
    assert np.abs(prompt_logits[real] - prompt_want[real]).max() <= ATOL
    for got, ref in zip(steps, want.logits, strict=True):
        assert np.abs(got - ref.numpy()).max() <= ATOL


def check_graph_and_config(report, path, config) -> None:
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    pasts = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *pasts]
    assert list(outputs) == ["logits", *[f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]]
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert inputs[pasts[0]] == ["batch_size", kv_heads, "past_sequence_length", head_size]
    assert outputs["present.0.key"] == ["batch_size", kv_heads, "past_sequence_length + sequence_length", head_size]
    assert report.with_past and report.merged and report.max_diff <= ATOL
    assert "greedy generation with the cache" in report.verification and "left-padded" in report.verification
    assert report.config_file == "model.json"
    written = json.loads((path.parent / "model.json").read_text())["model"]
    decoder = written["decoder"]
    assert (decoder["filename"], decoder["num_hidden_layers"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"], decoder["head_size"], decoder["hidden_size"]) == (
        "model.onnx", layers, heads, kv_heads, head_size, config.hidden_size)
    assert written["vocab_size"] == config.vocab_size
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"


@pytest.mark.parametrize("method", list(TINY_OPTIONS))
def test_llama_with_past_generates_like_pytorch(method: str, tmp_path) -> None:
    """Llama, 4 query / 2 key-value heads; LoRA on 2 layers, the structured methods on 1 (time)."""
    model = lsrfx.adapt(tiny_llama(num_hidden_layers=2 if method == "lora" else 1), method=method,
                        **TINY_OPTIONS[method])
    randomize_adapters(model)
    path = tmp_path / "model.onnx"

    report = lsrfx.merge_and_export(model, path, with_past=True)

    check_graph_and_config(report, path, model.config)
    check_generation(model, path, vocab=100, pad=0, eos=[2])
    assert json.loads((tmp_path / "model.json").read_text())["model"]["eos_token_id"] == 2


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def mistral() -> nn.Module:
    """Grouped-query attention and a sliding window (4) shorter than prompt + new tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)).eval()


@pytest.mark.parametrize(("build", "method"), [(qwen2, "lsr"), (mistral, "genlora")], ids=["qwen2", "mistral"])
def test_qwen2_and_mistral_with_past_generate_like_pytorch(build, method: str, tmp_path) -> None:
    model = lsrfx.adapt(build(), method=method, **TINY_OPTIONS[method])
    randomize_adapters(model)
    path = tmp_path / "model.onnx"

    report = lsrfx.merge_and_export(model, path, with_past=True)

    check_graph_and_config(report, path, model.config)
    check_generation(model, path, vocab=100, pad=0, eos=[2])


def test_gpt2_with_past_any_batch_and_a_later_plain_export_removes_the_config(tmp_path) -> None:
    """GPT-2: Conv1D projections, learned positions, no pad id, an eos id outside the tiny vocabulary."""
    model = lsrfx.adapt(tiny_gpt2(n_layer=1), method="condlora", **TINY_OPTIONS["condlora"])
    randomize_adapters(model)
    path = tmp_path / "model.onnx"

    report = lsrfx.merge_and_export(model, path, with_past=True)

    check_graph_and_config(report, path, model.config)
    check_generation(model, path, vocab=100, pad=0, eos=[])
    written = json.loads((tmp_path / "model.json").read_text())["model"]
    assert written["eos_token_id"] is None and written["pad_token_id"] == 0  # 50256 is no token of this model
    # A batch of 3 without a past: the batch axis is dynamic too.
    ids = torch.randint(0, 100, (3, 5))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 5), np.int64),
            "position_ids": np.tile(np.arange(5), (3, 1))}
    feed.update({i.name: np.zeros((3, 2, 0, 16), np.float32) for i in sess.get_inputs()
                 if i.name.startswith("past_key_values.")})
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert np.abs(sess.run(["logits"], feed)[0] - want).max() <= ATOL

    plain = lsrfx.merge_and_export(model, path, {"input_ids": ids})  # replaces the graph: no cache any more
    assert not plain.with_past and plain.config_file is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # the cached export's config is gone


def test_with_past_refuses_what_it_cannot_export_before_any_work(tmp_path) -> None:
    encoder = lsrfx.adapt(tiny_bert(), method="lora", targets=["query", "value"], r=2)
    with pytest.raises(lsrfx.LsrfxError, match=r"decoder-only transformers causal LM .* "
                                                r"BertForSequenceClassification is not one: .*without with_past"):
        lsrfx.merge_and_export(encoder, tmp_path / "model.onnx", with_past=True)
    assert list(tmp_path.iterdir()) == []

    llama = lsrfx.adapt(tiny_llama(num_hidden_layers=1), method="lora", r=2)
    mine = tmp_path / "model.json"
    mine.write_text('{"my": "own notes"}')
    with pytest.raises(lsrfx.LsrfxError, match=r"model\.json, which exists and was not written by lsrfx"):
        lsrfx.merge_and_export(llama, tmp_path / "model.onnx", with_past=True)
    with pytest.raises(lsrfx.LsrfxError, match="needs dynamic axes"):
        lsrfx.merge_and_export(llama, tmp_path / "other.onnx", with_past=True, dynamic=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"] and mine.read_text() == '{"my": "own notes"}'
