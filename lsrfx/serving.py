"""Serving adapters: named sets resident on one model, a set per batch row, and swaps that never tear a forward.

**Named sets.** Besides its own adapter (the one ``adapt`` created, trained, or filled by ``load_adapters(model,
dir)``; named :data:`DEFAULT`), a model can hold any number of frozen adapter sets loaded for serving with
``load_adapters(model, dir, name="a")``. A set is kept as each layer's formed rank-``r`` factors ``A`` and
``scale * B`` (what every method reduces to), so sets of different methods and ranks serve side by side.

**A set per row.** ``model(ids, adapter_names=["a", "b", None, ...])`` (peft's convention; ``generate`` passes it
through) or ``with lsrfx.use_adapters(model, names):`` runs each batch row with its own set (``None`` or
:data:`BASE`: no adapter). Each adapted layer then computes ``x W0^T + b + (x A_i^T) B_i^T`` with the row's factors
gathered from a per-layer stack: one batched low-rank product per layer, never a loop over sets; under
``torch.compile`` the row assignment is a tensor input, so changing it recompiles nothing. The assignment is per
thread, so threads serving different sets at once do not see each other's.

**Swaps that never tear a forward.** Every call of the adapted model holds a shared lock for its duration (as does a
``use_adapters`` block, e.g. around a whole ``generate``), and every change of adapter values (``load_adapters``
into an adapted model, adding or deleting a named set) takes it exclusively: a change waits until the calls already
running finish, new calls wait for the change (at most :data:`SWAP_TIMEOUT` seconds, then an :class:`LsrfxError`
and nothing changed). So a forward that starts before a swap runs entirely on the old values, one that starts after
entirely on the new. A failed load changes nothing, while forwards go on. Readers are re-entrant per thread; a
change requested from inside a forward is an error rather than a deadlock.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lsrfx.adapters import AdapterConfig
from lsrfx.errors import LsrfxError
from lsrfx.factor_cache import end_call, inference_factors, refresh_for_call
from lsrfx.parametrization import (
    AdaptedWeight,
    adapted_layers,
    base_weight,
    layers_generation,
    named_adapter_parameters,
)
from lsrfx.quantized_base import dense
from lsrfx.targets import layer_spec
from lsrfx.utils import unwrap

DEFAULT = "default"  # the model's own adapter
BASE = "__base__"  # no adapter (peft's name for it); ``None`` means the same
SWAP_TIMEOUT = 60.0  # seconds a change waits for running forwards before it gives up
ROWS_KWARG = "adapter_names"


class SwapLock:
    """Many readers (forwards) or one writer (a change of adapter values); writers first, readers re-entrant per
    thread, the writer's wait bounded."""

    def __reduce__(self) -> tuple:
        """A copy (``copy.deepcopy`` of the model, pickling) gets a fresh, unheld lock."""
        return (SwapLock, ())

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._local = threading.local()

    def acquire_read(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1

    def release_read(self) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextlib.contextmanager
    def writing(self, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold the lock exclusively for ``what`` (named in errors)."""
        if getattr(self._local, "depth", 0):
            raise LsrfxError(f"cannot {what} from inside a forward of the same model (this thread is running one); "
                             "change adapters between calls.")
        timeout = SWAP_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise LsrfxError(
                            f"could not {what}: waited {timeout:g} s for {self._readers} running forward(s) or "
                            "use_adapters block(s) of this model to finish; nothing was changed. Retry later, or end "
                            "long-running use_adapters blocks sooner."
                        )
                    self._cond.wait(remaining)
                self._writing = True
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Mutex:
    """``threading.Lock`` that a copy of the model (deep copy, pickle) gets fresh."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple:
        return (Mutex, ())

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@dataclass
class AdapterSet:
    """A frozen named set: per adapted layer, ``A`` (``r x d_in``) and ``scale * B`` (``d_out x r``)."""

    name: str
    method: str
    factors: dict[str, tuple[Tensor, Tensor]]
    source: str = ""

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.factors.values())


@dataclass
class Serving:
    """What a model serves besides its own adapter: the named sets (in the order of their stack slots), the lock,
    and a version bumped at every change so that each layer rebuilds its stack once."""

    sets: dict[str, AdapterSet] = field(default_factory=dict)
    lock: SwapLock = field(default_factory=SwapLock)
    version: int = 0
    refreshing: Mutex = field(default_factory=lambda: Mutex())  # one reader at a time refreshes the stacks
    layers: tuple = ()  # the model's adapted layers, as (name, module, parametrization), for the call hooks
    layers_key: tuple | None = None  # (the model's id, parametrization.layers_generation()) they were listed at

    def slot(self, name: str | None) -> int:
        """The stack slot of a row's set: 0 base, 1 the model's own adapter, then the named sets."""
        if name is None or name == BASE:
            return 0
        if name == DEFAULT:
            return 1
        if name in self.sets:
            return 2 + list(self.sets).index(name)
        raise LsrfxError(f"adapter set {name!r} is not loaded on this model; loaded: {self.names()} (and None / "
                         f"{BASE!r} for no adapter). Load it with lsrfx.load_adapters(model, dir, name={name!r}).")

    def names(self) -> list[str]:
        return [DEFAULT, *self.sets]


_SERVING_ATTR = "_lsrfx_serving"
_serving_guard = threading.Lock()


def serving_of(model: nn.Module) -> Serving:
    """The :class:`Serving` record of an adapted model (created on first use)."""
    root = unwrap(model)
    serving = root.__dict__.get(_SERVING_ATTR)
    if serving is None:
        with _serving_guard:
            serving = root.__dict__.get(_SERVING_ATTR)
            if serving is None:
                serving = Serving()
                object.__setattr__(root, _SERVING_ATTR, serving)
    return serving


def forget(model: nn.Module) -> None:
    """Drop the named sets and the lock record (``merge`` / ``remove_adapters``)."""
    unwrap(model).__dict__.pop(_SERVING_ATTR, None)


# --- rows -------------------------------------------------------------------------------------------------------

class _ThreadState(threading.local):
    """Per thread: the row assignment of the running call, and what each nested call replaced. Class-level defaults
    give every thread the same attributes, so a compiled graph's guards read alike in every thread (a missing
    attribute in a new thread would fail them and recompile)."""

    rows: Rows | None = None

    def __init__(self) -> None:
        self.calls: list = []


_local = _ThreadState()


@dataclass(frozen=True)
class Rows:
    """This thread's row assignment: the stack slot of every batch row, the names (for messages), and which model's
    stacks the slots index (``id`` of its :class:`Serving` record): another adapted model called meanwhile in the same
    thread ignores them."""

    index: Tensor
    names: tuple
    owner: int

    def apply_to(self, param: AdaptedWeight) -> bool:
        """Whether these rows are for the model ``param``'s layer belongs to."""
        return param.__dict__.get("_lsrfx_rows_owner") == self.owner


def active_rows() -> Rows | None:
    """The row assignment of the call running in this thread (read by adapted layers; ``None``: no per-row sets)."""
    return _local.rows


def _rows_for(root: nn.Module, names: Sequence[str | None]) -> Rows:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise LsrfxError(f"{ROWS_KWARG} must be a list with one adapter set name (or None) per batch row, got "
                         f"{names!r}.")
    serving = serving_of(root)
    slots = [serving.slot(n) for n in names]
    device = next((p.device for p in root.parameters()), torch.device("cpu"))
    return Rows(torch.tensor(slots, dtype=torch.long, device=device), tuple(names), id(serving))


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run every call of ``model`` inside the block with one adapter set per batch row (``names[i]`` for row ``i``;
    ``None`` for no adapter), e.g. around ``model.generate(...)``. The block holds the model's shared lock, so no
    swap changes the sets it uses until it ends."""
    root = unwrap(model)
    serving = serving_of(root)
    with serving.lock.reading():
        rows = _rows_for(root, names)
        refresh_stacks(root, serving)
        previous = active_rows()
        _local.rows = rows
        try:
            yield
        finally:
            _local.rows = previous


# --- the per-row forward --------------------------------------------------------------------------------------


def rows_delta(param: AdaptedWeight, x: Tensor, rows: Rows) -> Tensor:
    """``(x A_i^T) (s B_i)^T`` with each row's factors gathered from the layer's stack: two batched matmuls."""
    if x.shape[0] != rows.index.shape[0]:
        raise LsrfxError(f"{ROWS_KWARG} names {rows.index.shape[0]} rows but an adapted layer "
                         f"({param.adapter.d_out} x {param.adapter.d_in}) sees an input of shape {tuple(x.shape)}, "
                         f"batch {x.shape[0]}; give one name per batch row of the model's input (generate with "
                         "num_beams or num_return_sequences > 1 multiplies the rows).")
    a = param.rows_A[rows.index]  # (batch, r, d_in)
    b = param.rows_B[rows.index]  # (batch, d_out, r)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
    return delta.reshape(*x.shape[:-1], b.shape[1])


def served_layers(root: nn.Module, serving: Serving) -> tuple[tuple[str, nn.Module, AdaptedWeight], ...]:
    """``adapted_layers(root)``, listed again only when a layer gained or lost its adapter since (the call hooks
    run at every forward, e.g. every generated token: walking every module each time costs more than the
    adapters' own arithmetic in a small model)."""
    key = (id(root), layers_generation())
    if serving.layers_key != key:
        serving.layers = tuple(adapted_layers(root))
        serving.layers_key = key
    return serving.layers


def refresh_stacks(root: nn.Module, serving: Serving) -> None:
    """Bring every adapted layer's stack of row factors up to date: rebuilt after a set changed, the model's own
    adapter's slot refreshed when its values changed (both outside any compiled graph, which only reads them)."""
    with serving.refreshing:
        for name, module, param in served_layers(root, serving):
            _refresh_layer_stack(name, module, param, serving)


def _refresh_layer_stack(name: str, module: nn.Module, param: AdaptedWeight, serving: Serving) -> None:
    """One layer's stack: slot 0 zeros (no adapter), 1 the model's own adapter, then each named set (zeros where a
    set does not adapt this layer), every rank padded with zeros to the largest."""
    a_own, b_own = inference_factors(module, param)
    key = (id(serving), serving.version, param.__dict__.get("_lsrfx_key"))
    if param.__dict__.get("_lsrfx_rows_key") == key:
        return
    d_out, d_in = b_own.shape[0], a_own.shape[1]
    entries = [(a_own, b_own * param.adapter.scale)]
    entries += [s.factors.get(name, (None, None)) for s in serving.sets.values()]
    rank = max(a.shape[0] for a, _ in entries if a is not None)
    dtype, device = a_own.dtype, a_own.device
    with torch.inference_mode(False), torch.no_grad():
        stack_a = torch.zeros(len(entries) + 1, rank, d_in, dtype=dtype, device=device)
        stack_b = torch.zeros(len(entries) + 1, d_out, rank, dtype=dtype, device=device)
        for i, (a, b) in enumerate(entries, start=1):
            if a is not None:
                stack_a[i, : a.shape[0]] = a.to(device, dtype)
                stack_b[i, :, : b.shape[1]] = b.to(device, dtype)
    _set_buffer(param, "rows_A", stack_a)
    _set_buffer(param, "rows_B", stack_b)
    param.__dict__["_lsrfx_rows_key"] = key
    param.__dict__["_lsrfx_rows_owner"] = id(serving)


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """Update a non-persistent buffer in place when its shape and dtype allow (compiled graphs keep reading the same
    tensor), else register the new one."""
    old = module._buffers.get(name)
    with torch.inference_mode(False), torch.no_grad():
        if old is not None and old.shape == value.shape and old.dtype == value.dtype and old.device == value.device:
            old.copy_(value)
        else:
            module.register_buffer(name, value.detach().clone(), persistent=False)


# --- the call hooks ---------------------------------------------------------------------------------------------


@torch.compiler.disable
def _before_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on the adapted model: take the shared lock, and set this thread's rows from
    ``adapter_names`` (removed from the call's keywords)."""
    root = unwrap(module)
    serving = serving_of(root)
    serving.lock.acquire_read()
    try:
        names = kwargs.pop(ROWS_KWARG, None) if ROWS_KWARG in kwargs else None
        calls = _local.calls
        if names is not None:
            rows = _rows_for(root, names)
            refresh_stacks(root, serving)
            calls.append((active_rows(), _NO_CHANGE))
            _local.rows = rows
        elif active_rows() is not None:
            refresh_stacks(root, serving)
            calls.append((_NO_CHANGE, _NO_CHANGE))
        elif not torch.is_grad_enabled():
            calls.append((_NO_CHANGE, refresh_inference(root, serving)))
        else:
            calls.append((_NO_CHANGE, _NO_CHANGE))
    except BaseException:
        serving.lock.release_read()
        raise
    return args, kwargs


_NO_CHANGE = object()


@torch.compiler.disable
def _after_call(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward hook (always called, errors included): restore the caller's rows and release the lock."""
    calls = _local.calls
    if calls:
        rows, mark = calls.pop()
        if rows is not _NO_CHANGE:
            _local.rows = rows
        if mark is not _NO_CHANGE:
            end_call(mark)
    serving_of(module).lock.release_read()


def refresh_inference(root: nn.Module, serving: Serving) -> object | None:
    """Bring every layer's kept inference factors up to date before a call without gradients (a compiled graph reads
    them; eager layers then use them without checking again); returns the enclosing call's mark
    (:func:`~lsrfx.factor_cache.refresh_for_call`)."""
    with serving.refreshing:
        return refresh_for_call(served_layers(root, serving))


def install_hooks(model: nn.Module) -> None:
    """Register the call hooks on ``model`` (the object ``adapt`` was given: the compiled wrapper for a compiled
    model, whose hooks run outside the compiled frame), and let a ``transformers`` model's ``generate`` take
    ``adapter_names`` as peft's does (the whole generation then runs in one :func:`use_adapters` block)."""
    remove_hooks(model)
    model.register_forward_pre_hook(_before_call, with_kwargs=True)
    model.register_forward_hook(_after_call, with_kwargs=True, always_call=True)
    root = unwrap(model)
    if callable(getattr(type(root), "generate", None)):
        root.__dict__["generate"] = functools.partial(_generate, root)


def _generate(root: nn.Module, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
    """``root.generate``, with ``adapter_names`` (one set per batch row) applied to every step of the generation."""
    generate = type(root).generate.__get__(root)
    if adapter_names is None:
        return generate(*args, **kwargs)
    with use_adapters(root, adapter_names):
        return generate(*args, **kwargs)


def remove_hooks(model: nn.Module) -> None:
    unwrap(model).__dict__.pop("generate", None)
    for module in {id(model): model, id(unwrap(model)): unwrap(model)}.values():
        for table in (module._forward_pre_hooks, module._forward_hooks):
            for key, fn in list(table.items()):
                if fn in (_before_call, _after_call):
                    del table[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)


# --- named sets -------------------------------------------------------------------------------------------------


def build_set(root: nn.Module, name: str, config: AdapterConfig, layers: Sequence[str], tensors: dict[str, Tensor],
              source: str = "") -> AdapterSet:
    """A named set from checked adapter tensors: its adapters are built for ``layers`` as ``adapt`` would (in the
    model's module order), filled, and reduced to each layer's ``A`` and ``scale * B`` (then dropped: a served set
    needs only its factors)."""
    modules = dict(root.named_modules())
    layers = [n for n in modules if n in set(layers)]
    specs = [layer_spec(n, modules[n]) for n in layers]
    adapters = config.build(specs)
    params = named_adapter_parameters(zip(layers, adapters, strict=True))
    factors = {}
    with torch.inference_mode(False), torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
        for spec, adapter in zip(specs, adapters, strict=True):
            w0 = base_weight(modules[spec.name])
            w0 = dense(w0.t() if spec.transposed else w0)
            a, b = adapter.factors(w0)
            factors[spec.name] = (a.detach().contiguous(), (b * adapter.scale).detach().contiguous())
    return AdapterSet(name, config.method, factors, source)


def add_set(model: nn.Module, adapter_set: AdapterSet) -> None:
    """Make ``adapter_set`` servable under its name (replacing a set of that name) once running calls finished."""
    if adapter_set.name in (DEFAULT, BASE):
        raise LsrfxError(f"{adapter_set.name!r} is reserved ({DEFAULT!r}: the model's own adapter, {BASE!r}: none); "
                         "choose another name.")
    serving = serving_of(model)
    with serving.lock.writing(f"load adapter set {adapter_set.name!r}"):
        serving.sets[adapter_set.name] = adapter_set
        serving.version += 1


def delete_adapters(model: nn.Module, name: str) -> None:
    """Remove the named set ``name`` from ``model`` (once running calls finished)."""
    serving = serving_of(model)
    if name not in serving.sets:
        raise LsrfxError(f"adapter set {name!r} is not loaded on this model; loaded named sets: {list(serving.sets)}.")
    with serving.lock.writing(f"delete adapter set {name!r}"):
        del serving.sets[name]
        serving.version += 1


def loaded_adapters(model: nn.Module) -> list[str]:
    """The names a row may use: :data:`DEFAULT` (the model's own adapter), then the named sets."""
    return serving_of(model).names()
