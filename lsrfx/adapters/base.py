"""What every adapter method shares: the layer it adapts, its config base class, and its module interface.

Every method yields factors ``A`` (``r x d_in``) and ``B`` (``d_out x r``) so that ``dW = scale * B @ A``; the
methods differ only in where ``A`` and ``B`` come from (see ``docs/architecture.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lsrfx.errors import LsrfxError


@dataclass(frozen=True)
class LayerSpec:
    """A linear-like layer to adapt, in PyTorch layout terms (``W0`` is ``d_out x d_in``)."""

    name: str
    d_out: int
    d_in: int
    transposed: bool  # weight stored (in, out), e.g. GPT-2 Conv1D
    dtype: torch.dtype
    device: torch.device

    @property
    def shape_text(self) -> str:
        """The weight's shape for messages, e.g. ``"768 x 768"`` (``d_out x d_in``)."""
        return f"{self.d_out} x {self.d_in}"

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapters keep fp32 master weights when the base is half precision (the mixed-precision convention)."""
        return self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32


class Adapter(nn.Module, abc.ABC):
    """One layer's adapter: ``factors(W0) -> (A, B)`` and a fixed ``scale``."""

    rank: int
    # Whether ``factors`` reads the frozen weight's values (CondLoRA); a quantized base is then dequantised for it.
    reads_base_weight: ClassVar[bool] = False

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.d_in, self.d_out = spec.d_in, spec.d_out

    @property
    def scale(self) -> float:
        """The fixed multiplier of ``B @ A`` (``alpha / rank``).

        Held as its exact integer ratio (``float.as_integer_ratio``; ``num / den`` gives back the same float): Dynamo
        specialises integer attributes of modules, but turns a float attribute into a symbol once a model with
        another value at the same module path has compiled in the process (automatic dynamic), then specialises it
        again inside the backend and compiles the graph a second time (``lsrfx finetune --compare --compile``,
        notebooks, benchmarks)."""
        return self._scale_num / self._scale_den

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale_num, self._scale_den = float(value).as_integer_ratio()

    @abc.abstractmethod
    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``A`` (``rank x d_in``) and ``B`` (``d_out x rank``) for the frozen weight ``w0`` (``d_out x d_in``)."""

    def eager_linear(self, x: Tensor, w0: Tensor, bias: Tensor | None) -> Tensor | None:
        """The whole layer ``x @ W0.T + bias + scale * (x @ A.T) @ B.T`` in eager training, for a method that has a
        cheaper form than the base matmul beside its factors (CondLoRA: its factors are products of ``W0`` that
        can share the base matmul's pass over it); ``None`` (the default): the generic low-rank path."""
        return None

    def delta_weight(self, w0: Tensor) -> Tensor:
        """The dense update ``scale * B @ A`` (``d_out x d_in``); for merging and tests, never the hot path."""
        a, b = self.factors(w0)
        return (b @ a) * self.scale

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, rank={self.rank}, scale={self.scale:g}"


def plain_and_uniform(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether an eager layer function (``Adapter.eager_linear``) may run: ``x`` and every given tensor are plain
    tensors or parameters (no DTensor or quantized subclass) of ``x``'s dtype, outside autocast. ``None`` entries (a
    missing bias) are skipped."""
    return not torch.is_autocast_enabled(x.device.type) and all(
        type(v) in (Tensor, nn.Parameter) and v.dtype == x.dtype for v in (x, *tensors) if v is not None)


def option_field(default: Any, help_text: str, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> Any:
    """A config field with its one-line help text (``metadata["help"]``), which the CLI shows for the field's flag,
    and the range its numbers must lie in: ``>= minimum``, ``> above``, ``<= maximum`` (checked with the field's
    type by :meth:`AdapterConfig.__post_init__`)."""
    bounds = {"min": minimum, "above": above, "max": maximum}
    return dataclasses.field(default=default, metadata={"help": help_text, **bounds})


# The largest ``alpha`` lsrfx accepts: far above any published recipe (the LSR-Adapt authors' scale 4096 at rank 4
# is alpha 16384), far below where ``alpha / r * B @ A`` overflows float32 for factors of ordinary size.
MAX_ALPHA = 1e6


def rank_field(default: int) -> Any:
    """The ``r`` option of methods whose update rank is one number."""
    return option_field(default, "rank of the update", minimum=1)


def alpha_field(default: float) -> Any:
    """The ``alpha`` option every method has: the update is scaled by ``alpha / rank``."""
    return option_field(default, "scale numerator: the update is scaled by alpha / rank", above=0,
                        maximum=MAX_ALPHA)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or repr(hint).replace("typing.", "")


def check_option(method: str, name: str, value: Any, hint: Any, bounds: dict) -> Any:
    """``value`` checked against the field's type ``hint`` and range, as the field will hold it (a JSON list as a
    tuple, an integral float never silently truncated); raises :class:`LsrfxError` naming the option."""
    given = value

    def fail(why: str) -> LsrfxError:
        return LsrfxError(f"{method}: option {name}={given!r} {why}.")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"option {name}: unsupported type {hint!r}")
        hint, origin, args = inner[0], typing.get_origin(inner[0]), typing.get_args(inner[0])
    if origin is Literal:
        if value not in args or type(value) is not type(args[0]):
            raise fail(f"is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"must be {len(args)} values ({_type_name(hint)})")
        return tuple(check_option(method, f"{name}[{i}]", v, a, bounds)
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("must be an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("must be a number")
        if not math.isfinite(value):
            raise fail("must be finite")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise fail("must be a string")
        return value
    elif hint is bool:
        if not isinstance(value, bool):
            raise fail("must be true or false")
        return value
    if bounds.get("min") is not None and not value >= bounds["min"]:
        raise fail(f"must be >= {bounds['min']:g}")
    if bounds.get("above") is not None and not value > bounds["above"]:
        raise fail(f"must be > {bounds['above']:g}")
    if bounds.get("max") is not None and not value <= bounds["max"]:
        raise fail(f"must be <= {bounds['max']:g}")
    return value


@dataclass
class AdapterConfig(abc.ABC):
    """Base of the per-method config dataclasses. ``method`` is the name ``adapt(method=...)`` takes; every field
    is declared with :func:`option_field`, so its help text lives next to it (the CLI makes a flag of each field)."""

    method: ClassVar[str]

    def __post_init__(self) -> None:
        """Check every field's type and range (the Python API, CLI flags and adapter files all pass through here),
        so a bad value is an :class:`LsrfxError` naming the option, never a raw ``TypeError`` later."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            checked = check_option(self.method, f.name, getattr(self, f.name), hints[f.name], dict(f.metadata))
            object.__setattr__(self, f.name, checked)

    def options(self) -> dict:
        return dataclasses.asdict(self)

    @abc.abstractmethod
    def check(self, spec: LayerSpec) -> None:
        """Raise :class:`LsrfxError` naming the layer, its shape and the fix if this config cannot adapt it."""

    def build(self, specs: list[LayerSpec]) -> list[Adapter]:
        """One adapter per layer, in order. Methods that share parameters across layers override this."""
        return [self.build_one(spec) for spec in specs]

    @abc.abstractmethod
    def build_one(self, spec: LayerSpec) -> Adapter:
        """The adapter for one layer (after :meth:`check` passed)."""

    @abc.abstractmethod
    def parameter_count(self, spec: LayerSpec) -> int:
        """Trainable parameters the adapter of this layer creates (a shared group's count for each of its layers):
        known before anything is allocated, so absurd options are refused by :func:`check_size`."""


# An adapter may hold at most this many times the parameters of the weight it adapts (plus a small allowance for
# tiny layers): every sensible configuration is far below it, and options such as separation_rank=10**9 are refused
# before they try to allocate tens of gigabytes.
MAX_ADAPTER_TO_WEIGHT = 4
SMALL_LAYER_ALLOWANCE = 4096


def check_size(config: AdapterConfig, spec: LayerSpec) -> None:
    """Refuse an adapter larger than :data:`MAX_ADAPTER_TO_WEIGHT` times its layer's weight, before allocating it."""
    n = config.parameter_count(spec)
    limit = MAX_ADAPTER_TO_WEIGHT * spec.d_out * spec.d_in + SMALL_LAYER_ALLOWANCE
    if n > limit:
        raise LsrfxError(
            f"{config.method}: the options {config.options()} would give layer '{spec.name}' (weight "
            f"{spec.shape_text}) an adapter of {n:,} parameters, more than {MAX_ADAPTER_TO_WEIGHT} times the "
            f"weight itself ({spec.d_out * spec.d_in:,}); nothing was allocated. Lower the rank-like options."
        )


def check_rank(spec: LayerSpec, r: int, method: str) -> None:
    """A rank-``r`` update of a ``d_out x d_in`` weight needs ``1 <= r <= min(d_out, d_in)``."""
    limit = min(spec.d_in, spec.d_out)
    if not 1 <= r <= limit:
        raise LsrfxError(
            f"{method}: rank r={r} is impossible for layer '{spec.name}' (weight {spec.shape_text}); "
            f"use 1 <= r <= {limit} or leave this layer out of `targets`."
        )


@dataclass
class RankConfig(AdapterConfig):
    """Base of the configs whose update is one rank-``r`` product scaled by ``alpha / r`` with LoRA's defaults
    (``r = alpha = 8``): LoRA and CondLoRA."""

    r: int = rank_field(8)
    alpha: float = alpha_field(8.0)

    def check(self, spec: LayerSpec) -> None:
        check_rank(spec, self.r, self.method)

    def parameter_count(self, spec: LayerSpec) -> int:
        return self.r * (spec.d_in + spec.d_out)
