"""The graph ``merge_and_export(..., with_past=True)`` writes for a decoder-only ``transformers`` causal LM: one ONNX
graph with the key/value cache in optimum's ``text-generation-with-past`` form, and the config file beside it.

Graph (``L`` layers, ``H`` key/value heads, head size ``D``; integer inputs are int64, the past has the model's
dtype):

* inputs ``input_ids`` (batch_size, sequence_length), ``attention_mask`` (batch_size, past_sequence_length +
  sequence_length), ``position_ids`` (batch_size, sequence_length), and for each layer ``i < L``
  ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` (batch_size, H, past_sequence_length, D);
* outputs ``logits`` (batch_size, sequence_length, vocab) and ``present.{i}.key`` / ``present.{i}.value``
  (batch_size, H, past_sequence_length + sequence_length, D): the past with this call's keys and values appended.

The same graph runs the prompt, with a past of length 0 (tensors of shape (batch_size, H, 0, D)), and every later
step (optimum's "merged" decoder switches between two subgraphs on a ``use_cache_branch`` input; this graph needs
no switch). Runtime recipe, as
``transformers``' ``generate``: for the prompt, ``position_ids = cumsum(attention_mask) - 1`` with 0 at padded
positions (left padding); for each new token, its position is the row's last position + 1, ``attention_mask``
gets a column of ones, and ``present.*`` are fed back as ``past_key_values.*``.

How: :class:`WithPast` takes those flat tensors, builds a ``DynamicCache`` from the past, calls the merged model
with ``use_cache=True`` and returns the logits and the flattened cache. ``torch.export`` traces it (non-strict) at
batch 2, 3 new tokens and 4 past tokens (sizes 0 and 1 would be specialised), with named dims for the batch,
sequence and past axes. In the architectures tested (Llama, Qwen2, GPT-2, Mistral) nothing traced depends on the
past being non-empty (the cache is a concatenation, the mask is built from shapes), so onnxruntime runs the graph
with an empty past as well; verification (:mod:`lsrfx.export.decode_check`) starts from an empty past, so a model
for which that does not hold is refused rather than written (with ``verify=False`` nothing checks it). Sliding-window layers (Mistral) keep the whole past in the graph; the attention mask
applies the window, as in ``transformers``' own exporter.

Config file: ``<path stem>.json`` beside the graph (``model.onnx`` -> ``model.json``), see :func:`runtime_config`.
Its field names follow onnxruntime-genai's ``genai_config.json`` (``model`` / ``decoder`` / ``inputs`` /
``outputs``, ``%d`` for the layer index); it is not tested with onnxruntime-genai, which also wants tokenizer files
and a ``search`` section. An export never overwrites a ``<stem>.json`` that lsrfx did not write
(:func:`check_config_path`), and an export without the cache removes the one an earlier cached export left
(:func:`stale_config`).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from lsrfx.errors import LsrfxError
from lsrfx.version import __version__

PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# Axis names of the graph's inputs and outputs (optimum's).
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQUENCE}"
# Trace sizes: none may be 0 or 1, which torch.export would specialise.
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 3, 4
CONFIG_MARK = "lsrfx decoder with past"


@dataclass(frozen=True)
class DecoderSpec:
    """What the graph and a runtime need to know about a causal LM: its cache geometry and special token ids."""

    architecture: str
    model_type: str
    cache_arg: str  # the forward keyword of the cache: "cache" (transformers >= 5.2x) or "past_key_values"
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    context_length: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int  # a valid token id: the config's pad id, else its eos id, else 0 (padding is masked anyway)

    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids",
                *[name % i for i in range(self.layers) for name in (PAST_KEY, PAST_VALUE)]]

    def output_names(self) -> list[str]:
        return ["logits", *[name % i for i in range(self.layers) for name in (PRESENT_KEY, PRESENT_VALUE)]]

    def empty_past(self, batch: int, device: torch.device | str = "cpu") -> list[Tensor]:
        """The past of a prompt: ``2 * layers`` tensors of shape (batch, kv_heads, 0, head_size)."""
        return [torch.zeros(batch, self.kv_heads, 0, self.head_size, dtype=self.dtype, device=device)
                for _ in range(2 * self.layers)]


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def decoder_spec(root: nn.Module) -> DecoderSpec:
    """The :class:`DecoderSpec` of ``root``, or an :class:`LsrfxError` saying why ``with_past=True`` does not apply."""
    name = type(root).__name__
    config = getattr(root, "config", None)
    try:
        params = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        params = {}
    cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
    missing = [a for a in ("input_ids", "attention_mask", "position_ids") if a not in params]
    reason = ("it has no transformers config" if config is None
              else "it is an encoder-decoder model" if getattr(config, "is_encoder_decoder", False)
              else "its forward takes no key/value cache (no 'cache' or 'past_key_values' argument)"
              if cache_arg is None
              else f"its forward takes no {', '.join(missing)}" if missing
              else "it has no generate method" if not hasattr(root, "generate") else None)
    if reason:
        raise LsrfxError(
            f"with_past=True exports a decoder-only transformers causal LM (Llama, Qwen2, GPT-2, Mistral, ...) with its "
            f"key/value cache; {name} is not one: {reason}. Export it without with_past."
        )
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_size = getattr(text, "head_dim", None) or hidden // heads
    vocab = int(text.vocab_size)
    generation = getattr(root, "generation_config", None)
    eos = tuple(i for i in _ids(getattr(generation, "eos_token_id", None) or getattr(config, "eos_token_id", None))
                if 0 <= i < vocab)
    pad = getattr(generation, "pad_token_id", None)
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    bos = getattr(generation, "bos_token_id", None)
    bos = bos if bos is not None else getattr(config, "bos_token_id", None)
    dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
    return DecoderSpec(
        architecture=name, model_type=str(getattr(config, "model_type", "")), cache_arg=cache_arg,
        layers=int(text.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_size=int(head_size),
        hidden_size=hidden, vocab_size=vocab, dtype=dtype,
        context_length=getattr(text, "max_position_embeddings", None),
        bos_token_id=bos if isinstance(bos, int) and 0 <= bos < vocab else None, eos_token_ids=eos,
        pad_token_id=pad if isinstance(pad, int) and 0 <= pad < vocab else (eos[0] if eos else 0),
    )


def cache_tensors(cache: Any) -> list[Tensor]:
    """The keys and values of a ``transformers`` cache, layer by layer: ``[k0, v0, k1, v1, ...]``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):  # transformers < 4.56
        return [t for k, v in zip(cache.key_cache, cache.value_cache, strict=True) for t in (k, v)]
    return [t for pair in cache for t in pair[:2]]  # the legacy tuple of (key, value) pairs


class WithPast(nn.Module):
    """``model`` as a function of flat tensors: ``(input_ids, attention_mask, position_ids, *past) -> (logits,
    *present)``, past and present as ``[k0, v0, k1, v1, ...]`` of shape (batch, kv_heads, length, head_size)."""

    def __init__(self, model: nn.Module, spec: DecoderSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.spec.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.spec.cache_arg: cache})
        present = out[self.spec.cache_arg] if self.spec.cache_arg in out else cache  # updated in place
        return (out["logits"], *cache_tensors(present))


def trace_inputs(spec: DecoderSpec, device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
    """Inputs to trace :class:`WithPast` with: batch 2, 3 new tokens after 4 past ones, no padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (TRACE_BATCH, TRACE_SEQUENCE), generator=g).to(device)
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQUENCE, dtype=torch.long, device=device)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQUENCE, device=device).expand(TRACE_BATCH, -1)
    past = [torch.randn(TRACE_BATCH, spec.kv_heads, TRACE_PAST, spec.head_size, generator=g).to(device, spec.dtype)
            for _ in range(2 * spec.layers)]
    return (ids, mask, positions.contiguous(), *past)


def dynamic_shapes(spec: DecoderSpec) -> tuple:
    """``torch.export`` dims for :func:`trace_inputs`: batch, sequence and past named; the mask's length (past +
    sequence, which a ``Dim`` cannot express as a sum of two dims) left to ``Dim.AUTO``."""
    batch, sequence, past = Dim(BATCH), Dim(SEQUENCE), Dim(PAST)
    return ({0: batch, 1: sequence}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: sequence},
            tuple({0: batch, 2: past} for _ in range(2 * spec.layers)))


def check_present(spec: DecoderSpec, outputs: tuple[Tensor, ...]) -> None:
    """The eager outputs of :class:`WithPast` on :func:`trace_inputs` have the shapes the graph's names promise."""
    want = (TRACE_BATCH, spec.kv_heads, TRACE_PAST + TRACE_SEQUENCE, spec.head_size)
    shapes = [tuple(t.shape) for t in outputs[1:]]
    if len(shapes) != 2 * spec.layers or any(s != want for s in shapes):
        raise LsrfxError(
            f"{spec.architecture}'s key/value cache does not have the layout with_past=True exports: expected "
            f"{2 * spec.layers} tensors (a key and a value per layer of {spec.layers}) of shape (batch, kv_heads="
            f"{spec.kv_heads}, length, head_size={spec.head_size}) = {want}, got {len(shapes)} of shapes "
            f"{sorted(set(shapes))}. Export it without with_past."
        )


def name_axes(model) -> None:
    """Give the graph's symbolic axes optimum's names (``batch_size``, ``sequence_length``, ...) in place, an
    ``onnx_ir`` model of :class:`WithPast`. The exporter's symbols (``s10``) are read off the inputs' shapes (in
    :meth:`DecoderSpec.input_names` order); expressions of them are renamed term by term (``s15 + s70`` ->
    ``past_sequence_length + sequence_length``) on every value of the graph."""
    import onnx_ir as ir

    graph = model.graph
    places = {0: {0: BATCH, 1: SEQUENCE}, 1: {0: BATCH, 1: TOTAL}, 2: {0: BATCH, 1: SEQUENCE}}
    symbols: dict[str, str] = {}
    for i, value in enumerate(graph.inputs):
        dims = value.shape.dims if value.shape is not None else ()
        for axis, name in places.get(i, {0: BATCH, 2: PAST}).items():
            dim = dims[axis] if axis < len(dims) else None
            if isinstance(dim, ir.SymbolicDim) and dim.value and re.fullmatch(r"[A-Za-z_]\w*", dim.value):
                symbols.setdefault(dim.value, name)
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in symbols) + r")\b")

    def rename(value) -> None:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in shape.dims):
            return
        value.shape = ir.Shape([ir.SymbolicDim(pattern.sub(lambda m: symbols[m.group(1)], d.value))
                                if isinstance(d, ir.SymbolicDim) and d.value else d for d in shape.dims])

    for value in (*graph.inputs, *graph.outputs):
        rename(value)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            rename(value)


def config_path(path: Path) -> Path:
    """Where the runtime config of the graph at ``path`` goes: ``<stem>.json`` beside it."""
    return path.with_name(path.stem + ".json")


def _is_ours(file: Path, graph_name: str) -> bool:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(data, dict) and data.get("format") == CONFIG_MARK
            and data.get("model", {}).get("decoder", {}).get("filename") == graph_name)


def check_config_path(path: Path) -> None:
    """Refuse, before any work, a ``with_past`` export whose config file would replace a file lsrfx did not write
    (or the graph itself)."""
    target = config_path(path)
    if target == path:
        raise LsrfxError(f"with_past=True writes its runtime config to {target.name} beside the graph, which is the "
                         f"graph's own name {path.name}; give the graph an .onnx name.")
    if target.exists() and not _is_ours(target, path.name):
        raise LsrfxError(f"with_past=True writes the runtime config of {path.name} to {target}, which exists and was "
                         "not written by lsrfx for this graph; nothing was written. Move that file or export to "
                         "another name.")


def stale_config(path: Path) -> Path | None:
    """The config an earlier ``with_past`` export of ``path`` left beside it (it would describe a cache the new
    graph does not have), or ``None``."""
    target = config_path(path)
    return target if target != path and target.is_file() and _is_ours(target, path.name) else None


def runtime_config(spec: DecoderSpec, path: Path, opset: int) -> dict[str, Any]:
    """What a runtime needs to drive the graph: the cache geometry, the special token ids, the input and output
    names (``%d``: the layer index) and the feeding recipe of the module docstring."""
    eos = list(spec.eos_token_ids)
    return {
        "format": CONFIG_MARK,
        "lsrfx_version": __version__,
        "model": {
            "type": spec.model_type,
            "architecture": spec.architecture,
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": spec.pad_token_id,
            "vocab_size": spec.vocab_size,
            "context_length": spec.context_length,
            "decoder": {
                "filename": path.name,
                "opset": opset,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": spec.heads,
                "num_key_value_heads": spec.kv_heads,
                "head_size": spec.head_size,
                "hidden_size": spec.hidden_size,
                "past_dtype": str(spec.dtype).removeprefix("torch."),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY,
                           "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
                "past_shape": [BATCH, spec.kv_heads, PAST, spec.head_size],
            },
        },
        "recipe": {
            "prompt": f"past_key_values.* of shape ({BATCH}, {spec.kv_heads}, 0, {spec.head_size}); left padding; "
                      "position_ids = cumsum(attention_mask) - 1, 0 where attention_mask is 0",
            "next_token": "input_ids = the new token per row; attention_mask gets a column of ones; position_ids = "
                          "the row's last position + 1; past_key_values.* = the previous present.*",
        },
    }
