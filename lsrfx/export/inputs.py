"""Example inputs for export: where they come from, how they are cleaned, and how a second size is made from them.

``merge_and_export`` takes ``example_inputs`` as a tensor, a tuple of positional arguments, a dict of keyword
arguments, or an ``(args_tuple, kwargs_dict)`` pair. Without them it uses a few rows of the inputs of the model's
latest forward call (recorded once per call structure, see :mod:`lsrfx.recorder`), else a Hugging
Face model's ``dummy_inputs``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ShapesCollection
from torch.utils import _pytree as pytree

from lsrfx import recorder
from lsrfx.errors import LsrfxError
from lsrfx.recorder import Inputs

# Training-only keyword inputs of `transformers` models: not part of an inference graph.
LABEL_KEYS = ("labels", "start_positions", "end_positions", "next_sentence_label", "return_loss")
# Generation-state keyword inputs of `transformers` causal LMs (what `generate` passes to forward): the key/value
# cache (`cache` since transformers 5.2x, `past_key_values` before), the positions it is written at, and how many
# positions' logits to compute. A single-pass graph takes none of them.
CACHE_KEYS = ("cache", "past_key_values")
GENERATION_KEYS = (*CACHE_KEYS, "cache_position", "logits_to_keep", "num_logits_to_keep")


def normalize(example_inputs: Any) -> Inputs:
    """``(args, kwargs)`` from the accepted forms of ``example_inputs``."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return tuple(example_inputs[0]), dict(example_inputs[1])
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise LsrfxError(
        f"example_inputs of type {type(example_inputs).__name__} is not understood; pass a tensor, a tuple of "
        "positional arguments, a dict of keyword arguments, or an (args, kwargs) pair."
    )


def find_inputs(root: nn.Module, example_inputs: Any) -> tuple[Inputs, str]:
    """The inputs to export with and where they came from (``"given"``, the last forward, ``"dummy_inputs"``)."""
    if example_inputs is not None:
        return normalize(example_inputs), "given"
    recorded = recorder.latest(root)
    if recorded is not None:
        return recorded, f"last forward, first {recorder.ROWS} rows"
    dummy = hf_dummy_inputs(root)
    if dummy is not None:
        return ((), dummy), "dummy_inputs"
    raise LsrfxError(
        f"no example inputs for {type(root).__name__}: the model has not been called since lsrfx.adapt and has no "
        "usable Hugging Face dummy_inputs. Pass example_inputs= (a tensor, a tuple of positional arguments or a "
        "dict of keyword arguments for forward), or run one forward pass first."
    )


def hf_dummy_inputs(root: nn.Module) -> dict | None:
    """A ``transformers`` model's ``dummy_inputs`` on its device, when ``forward`` accepts all of their names."""
    try:
        dummy = getattr(root, "dummy_inputs", None)
    except Exception:  # some models build dummy inputs from config fields they do not have
        return None
    if not isinstance(dummy, dict) or not dummy:
        return None
    params = inspect.signature(root.forward).parameters
    if not all(k in params for k in dummy):
        return None
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in dummy.items()}


def clean(root: nn.Module, inputs: Inputs) -> Inputs:
    """Detached inputs without training-only keywords; an encoder-decoder's ``decoder_input_ids`` are derived from
    its ``labels`` (as its forward would) when they were not given. For a model whose forward takes a key/value
    cache, the generation-state keywords (:data:`GENERATION_KEYS`) are dropped: inputs recorded from ``generate``
    (a ``DynamicCache`` filled by the later steps, ``logits_to_keep=1``) become a plain forward over the prompt."""
    args, kwargs = inputs
    kwargs = dict(kwargs)
    labels = kwargs.get("labels")
    if (isinstance(labels, Tensor) and kwargs.get("decoder_input_ids") is None
            and hasattr(root, "prepare_decoder_input_ids_from_labels")):
        kwargs["decoder_input_ids"] = root.prepare_decoder_input_ids_from_labels(labels=labels)
    for key in LABEL_KEYS:
        kwargs.pop(key, None)
    if any(_accepts(root, key) for key in CACHE_KEYS):
        for key in GENERATION_KEYS:
            kwargs.pop(key, None)
    if "use_cache" in kwargs or _accepts(root, "use_cache"):
        kwargs["use_cache"] = False  # a key/value cache is generation state, not an output of the exported graph
    detach = lambda t: t.detach()  # noqa: E731
    return pytree.tree_map_only(Tensor, detach, (tuple(args), kwargs))


def split_constants(root: nn.Module, inputs: Inputs) -> tuple[Inputs, dict[str, Any]]:
    """``inputs`` without the plain (tensor-free) keyword values that ``forward`` takes through ``**kwargs``, and
    those values. ``transformers`` forwards take flags such as ``return_dict=True`` (which ``generate`` passes) that
    way, and ``torch.export`` with dynamic shapes fails on any ``**kwargs`` entry (``Must provide a tree_name``);
    export binds them to the copy's ``forward`` instead (:func:`functools.partial`), so they still apply."""
    args, kwargs = inputs
    try:
        params = inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        return inputs, {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return inputs, {}
    constants = {k: v for k, v in kwargs.items()
                 if k not in params and not any(isinstance(t, Tensor) for t in pytree.tree_leaves(v))}
    return (args, {k: v for k, v in kwargs.items() if k not in constants}), constants


def _accepts(root: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        return False


def attention_mask(inputs: Inputs) -> Tensor | None:
    """The ``attention_mask`` keyword input when it is a (batch, sequence) tensor, else ``None``: verification
    compares padded positions' outputs only where it is 1 (:func:`lsrfx.export.verify.max_difference`)."""
    mask = inputs[1].get("attention_mask")
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def tensors(inputs: Inputs) -> list[Tensor]:
    """The tensor leaves in the order the exported graph takes them."""
    return [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]


def resize(t: Tensor, dim: int, size: int) -> Tensor:
    """``t`` with ``size`` entries along ``dim``, cycling through the existing ones (values stay valid: token ids,
    masks and positions remain in range)."""
    index = torch.arange(size, device=t.device) % t.shape[dim]
    return t.index_select(dim, index)


def dynamic_dims(t: Tensor) -> tuple[int, ...]:
    """The axes treated as batch (0) and sequence (1) for a tensor input."""
    return tuple(range(min(t.dim(), 2)))


def widen(inputs: Inputs) -> Inputs:
    """Size-1 batch/sequence axes grown to 2: ``torch.export`` specialises size-1 axes, which would pin them."""
    def grow(t: Tensor) -> Tensor:
        for d in dynamic_dims(t):
            if t.shape[d] == 1:
                t = resize(t, d, 2)
        return t
    return pytree.tree_map_only(Tensor, grow, inputs)


def shapes_spec(inputs: Inputs) -> ShapesCollection:
    """Batch and sequence axes of every tensor input as ``Dim.AUTO``: ``torch.export`` keeps them symbolic where the
    model allows and specialises the rest (e.g. an image's channels)."""
    spec = ShapesCollection()
    for t in tensors(inputs):
        dims = dynamic_dims(t)
        if dims:
            spec[t] = {d: Dim.AUTO for d in dims}
    return spec


def second_size(inputs: Inputs, symbolic: list[dict[int, str]]) -> Inputs:
    """The inputs at a different size along each symbolic axis (``symbolic[i]``: axis -> symbol of tensor ``i``).

    Axes sharing a symbol change together; each symbol's size becomes ``n - 1`` when ``n >= 3`` (stays inside
    limits such as maximum positions), else ``n + 1``.
    """
    leaves, spec = pytree.tree_flatten(inputs)
    sizes: dict[str, int] = {}
    it = iter(symbolic)
    out = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            for axis, sym in next(it).items():
                n = sizes.setdefault(sym, leaf.shape[axis] - 1 if leaf.shape[axis] >= 3 else leaf.shape[axis] + 1)
                leaf = resize(leaf, axis, n)
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)
