"""What every adapter method shares: the layer it adapts, its config base class, and its module interface.

Every method yields factors ``A`` (``r x d_in``) and ``B`` (``d_out x r``) so that ``dW = scale * B @ A``; the
methods differ only in where ``A`` and ``B`` come from (see ``docs/architecture.md``).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

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

    def delta_weight(self, w0: Tensor) -> Tensor:
        """The dense update ``scale * B @ A`` (``d_out x d_in``); for merging and tests, never the hot path."""
        a, b = self.factors(w0)
        return (b @ a) * self.scale

    def extra_repr(self) -> str:
        return f"d_out={self.d_out}, d_in={self.d_in}, rank={self.rank}, scale={self.scale:g}"


def option_field(default: Any, help_text: str) -> Any:
    """A config field with its one-line help text (``metadata["help"]``), which the CLI shows for the field's flag."""
    return dataclasses.field(default=default, metadata={"help": help_text})


def rank_field(default: int) -> Any:
    """The ``r`` option of methods whose update rank is one number."""
    return option_field(default, "rank of the update")


def alpha_field(default: float) -> Any:
    """The ``alpha`` option every method has: the update is scaled by ``alpha / rank``."""
    return option_field(default, "scale numerator: the update is scaled by alpha / rank")


@dataclass
class AdapterConfig(abc.ABC):
    """Base of the per-method config dataclasses. ``method`` is the name ``adapt(method=...)`` takes; every field
    is declared with :func:`option_field`, so its help text lives next to it (the CLI makes a flag of each field)."""

    method: ClassVar[str]

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
