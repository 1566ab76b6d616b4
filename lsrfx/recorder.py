"""Example inputs for ``merge_and_export`` recorded from the model's own forward calls, without holding a batch.

``adapt`` calls :func:`start_recording`: a forward pre-hook on the model it was given stores a detached copy of
at most the first :data:`ROWS` rows of the call's tensors, in a table keyed weakly by the root module. It copies on
the first call and again only when a call's structure differs from the recorded one (:func:`signature`: argument
names and nesting, each tensor's rank and dtype, the values of plain Python arguments), so a training loop pays no
copy and no allocation per step; a different sequence length or batch size is the same structure (export makes
those axes dynamic anyway). So ``merge_and_export(model, path)`` needs no example inputs after any forward, the
caller's batch is never kept alive (only a few rows are copied), and the core (``lsrfx.api``) carries no export
state: it sits below the API and the export, which both read it.
``merge`` / ``remove_adapters`` call :func:`stop_recording`.

A ``transformers`` key/value cache among the inputs (``generate`` passes a ``DynamicCache`` that its later steps
fill for the whole batch) is recorded as ``None``: it is generation state, which export drops anyway
(:func:`lsrfx.export.inputs.clean`), and keeping a reference would keep the whole batch's keys and values alive.

Rows are cut along axis 0 of every tensor whose axis 0 has the size of the first tensor's (the batch); other
tensors (position ids of shape ``(1, seq)``, scalars) are copied whole. For a model whose inputs are not batch-first
and carry a square mask (``nn.Transformer`` with ``batch_first=False``), pass ``example_inputs=`` to export.

The hook is ``torch.compiler.disable``d, so it always runs eagerly. ``torch.compile`` calls a user-defined root
module's hooks outside the compiled frame, so for real models (``transformers`` models, any ``nn.Module`` subclass
with its own ``forward``) ``torch.compile(lsrfx.adapt(m))`` and ``lsrfx.adapt(torch.compile(m))`` both keep one graph
without breaks (tested). Where Dynamo traces the hook instead (a bare ``torch.nn`` container such as
``nn.Sequential`` as the root, or an adapted submodule called inside a larger compiled model) it costs one graph
break at that call; adapting the outermost, user-defined model avoids it.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lsrfx.utils import unwrap

Inputs = tuple[tuple, dict]

ROWS = 2  # rows kept per batched tensor: size 2 is the smallest batch torch.export keeps symbolic

_recorded: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Inputs]] = weakref.WeakKeyDictionary()


def start_recording(model: nn.Module) -> None:
    """Record the inputs of ``model``'s forward calls from now on (idempotent). ``model`` may be compiled: the
    hook then sits on the ``OptimizedModule`` wrapper, outside the compiled region."""
    _remove_hook(model)
    model.register_forward_pre_hook(_record, with_kwargs=True)


def stop_recording(model: nn.Module) -> None:
    """Remove the hook from ``model`` and the module behind it, and forget what was recorded for them."""
    root = unwrap(model)
    for module in {id(model): model, id(root): root}.values():
        _remove_hook(module)
    _recorded.pop(root, None)


def latest(model: nn.Module) -> Inputs | None:
    """The recorded ``(args, kwargs)`` of ``model``'s latest forward call (rows of the first call of the latest
    call's structure), or ``None`` if it was not called."""
    entry = _recorded.get(unwrap(model))
    return None if entry is None else entry[1]


PLAIN = (bool, int, float, str, type(None))


def signature(inputs: Inputs) -> tuple:
    """What makes two calls' inputs interchangeable as export examples: the pytree structure, and per leaf a
    tensor's rank, dtype and layout or a plain value itself (other objects by type)."""
    leaves, spec = pytree.tree_flatten(inputs)

    def leaf(v: object) -> object:
        if isinstance(v, Tensor):
            return ("tensor", v.dim(), v.dtype, v.layout)
        return ("value", type(v), v) if isinstance(v, PLAIN) else ("object", type(v))

    return (str(spec), tuple(leaf(v) for v in leaves))


def is_kv_cache(value: object) -> bool:
    """Whether ``value`` is a ``transformers`` key/value cache (``DynamicCache``, ``StaticCache``, ...), by its
    interface, so that ``transformers`` need not be imported."""
    return type(value).__name__.endswith("Cache") and hasattr(value, "get_seq_length")


def few_rows(inputs: Inputs) -> Inputs:
    """A detached copy of ``inputs`` with at most :data:`ROWS` rows of each batched tensor (see the module doc).

    Non-tensor values are kept as they are (references), except key/value caches, which become ``None``. The copy
    is an ordinary tensor even under ``torch.inference_mode`` (an inference tensor could not be traced by
    ``torch.export`` later).
    """
    inputs = pytree.tree_map(lambda v: None if is_kv_cache(v) else v, inputs, is_leaf=is_kv_cache)
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    batch = next((t.shape[0] for t in leaves if t.dim() > 0), None)

    def copy(t: Tensor) -> Tensor:
        if t.dim() > 0 and t.shape[0] == batch and t.layout == torch.strided:
            t = t[:ROWS]
        return t.detach().clone()

    with torch.inference_mode(False):
        return pytree.tree_map_only(Tensor, copy, inputs)


@torch.compiler.disable
def _record(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: keep :func:`few_rows` of this call's inputs for the root module, unless inputs of the same
    :func:`signature` are already kept.

    It looks the root up through ``module`` (no closure), so a ``deepcopy`` of the model records under the copy.
    """
    root = unwrap(module)
    key = signature((args, kwargs))
    entry = _recorded.get(root)
    if entry is None or entry[0] != key:
        _recorded[root] = (key, few_rows((args, kwargs)))


def _remove_hook(module: nn.Module) -> None:
    """Drop :func:`_record` from ``module``'s forward pre-hooks (found by identity, so deep copies work too)."""
    for key, fn in list(module._forward_pre_hooks.items()):
        if fn is _record:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
