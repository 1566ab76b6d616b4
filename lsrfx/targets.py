"""Finding the linear-like layers of a model and choosing which to adapt (``targets``, as peft's ``target_modules``).

``targets`` may be a list of module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``), a
single string, ``"all-linear"`` (peft's meaning: every linear layer except the output head: a ``transformers``
model's output embeddings, else a classification head), or a predicate ``(name, module) -> bool``. A string is read as one suffix first (``"query"``, as
``["query"]``: the layers whose name equals it or ends with ``"." + it``); only when no layer has that suffix is it
read as a regular expression matched against the whole name (``re.fullmatch``, e.g.
``".*attention.*(query|value)"``). An error for a string says how it was read. The default adapts the attention
query and value projections under their common names and, if a model has none, every linear layer except the output
head.

``trainable`` (:func:`match_parameter_names`) takes module or parameter names; a bare string is one name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from torch import nn
from torch.nn.utils import parametrize

from lsrfx.adapters.base import LayerSpec
from lsrfx.errors import LsrfxError
from lsrfx.parametrization import stored_weight

Targets = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]  # noqa: UP007 (a runtime alias)

# query/value projection names of the architectures people fine-tune (BERT/RoBERTa/ViT, Llama/OPT/BART/Mistral,
# T5, DistilBERT, GPT-2's fused c_attn, GPT-NeoX/Falcon/Bloom's fused query_key_value, MPT's Wqkv).
DEFAULT_ATTENTION_NAMES = ("query", "value", "q_proj", "v_proj", "q", "v", "q_lin", "v_lin", "c_attn",
                           "query_key_value", "Wqkv")
# Module-name components that mark a model's output head, which the fallback default leaves alone.
OUTPUT_HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "head", "cls", "output_head"})


def weight_is_transposed(module: nn.Module) -> bool | None:
    """``False`` for ``nn.Linear`` (weight ``out x in``), ``True`` for GPT-2's ``Conv1D`` (weight ``in x out``),
    ``None`` for anything lsrfx does not adapt."""
    if isinstance(module, nn.Linear):
        return False
    cls = parametrize.type_before_parametrizations(module)  # an adapted Conv1D's class is ParametrizedConv1D
    if cls.__name__ == "Conv1D" and hasattr(module, "nf") and stored_weight(module) is not None:
        return True
    return None


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """The :class:`LayerSpec` of an adaptable layer (``nn.Linear`` or GPT-2's ``Conv1D``) in ``d_out x d_in`` terms."""
    transposed = bool(weight_is_transposed(module))
    w = stored_weight(module)  # an adapted layer's W0: never form W0 + dW just to read a shape
    d_out, d_in = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    return LayerSpec(name, d_out, d_in, transposed, w.dtype, w.device)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable layer by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if name and weight_is_transposed(m) is not None}


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _is_output_head(name: str) -> bool:
    return any(part in OUTPUT_HEAD_NAMES for part in name.split("."))


ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


def output_head(model: nn.Module, layers: dict[str, nn.Module]) -> set[str]:
    """The output layer ``"all-linear"`` leaves out, as peft does: a ``transformers`` model's output embeddings
    (``lm_head``), else a classification head under a common name (``classifier``, ``score``, ...)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        return {n for n, m in layers.items() if m is head}
    return {n for n in layers if n.split(".")[0] in OUTPUT_HEAD_NAMES}


def select_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the layers ``targets`` picks, or an :class:`LsrfxError` that lists the layers that exist."""
    layers = linear_layers(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head(model, layers)
        chosen = [n for n in layers if n not in heads]
        if not chosen:
            raise LsrfxError(f"targets={targets!r} found no linear layer besides the output head. "
                             f"{describe_layers(layers)}")
        return chosen
    if targets is None:
        chosen = [n for n in layers if any(_suffix_match(n, s) for s in DEFAULT_ATTENTION_NAMES)]
        if not chosen:
            chosen = [n for n in layers if not _is_output_head(n)]
    elif callable(targets):
        chosen = [n for n, m in layers.items() if targets(n, m)]
    elif isinstance(targets, str):
        chosen = _string_targets(layers, targets)
    elif isinstance(targets, Iterable):
        targets = list(targets)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise LsrfxError(f"targets={targets!r}: give module-name suffixes (strings), a regex or a predicate.")
        chosen = [n for n in layers if any(_suffix_match(n, t) for t in targets)]
    else:
        raise LsrfxError(f"targets={targets!r}: give module-name suffixes, a regular expression or a predicate.")
    if not chosen:
        raise LsrfxError(f"targets={targets!r} matched no linear layer. {describe_layers(layers)}")
    return chosen


def _string_targets(layers: dict[str, nn.Module], targets: str) -> list[str]:
    """A string target: the layers with that name suffix, else the layers whose whole name the regex matches."""
    chosen = [n for n in layers if _suffix_match(n, targets)]
    if chosen:
        return chosen
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise LsrfxError(f"targets={targets!r} (a string: read as a module-name suffix, then as a regular expression) "
                         f"is no layer's suffix and not a valid regular expression: {exc}. "
                         f"{describe_layers(layers)}") from exc
    chosen = [n for n in layers if pattern.fullmatch(n)]
    if not chosen:
        raise LsrfxError(f"targets={targets!r} (a string: read as a module-name suffix, then as a regular expression "
                         f"matched against the whole name) matched no linear layer. {describe_layers(layers)}")
    return chosen


def describe_layers(layers: dict[str, nn.Module]) -> str:
    """A short list of the linear layers that exist, by their distinct last name component."""
    if not layers:
        return "The model has no nn.Linear or Conv1D layer."
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return f"The model's linear layers end in: {suffixes} (e.g. '{next(iter(layers))}')."


def match_parameter_names(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Parameter names under the modules (or equal to the names) given in ``trainable``, e.g. ``["classifier"]``;
    a bare string is one name (``"classifier"``), never split into characters."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in model.named_parameters()]
    found: list[str] = []
    for pattern in patterns:
        rx = re.compile(rf"(^|\.){re.escape(pattern)}(\.|$)")
        hits = [n for n in names if rx.search(n)]
        if not hits:
            heads = sorted({n.split(".")[-2] for n in names if "." in n})
            raise LsrfxError(
                f"trainable={list(patterns)!r}: {pattern!r} matches no parameter; name a module or parameter "
                f"such as one of {heads[:12]}."
            )
        found += [n for n in hits if n not in found]
    return found
