"""The adapter methods: one config dataclass and one module per method, registered by name."""

from __future__ import annotations

import dataclasses

from lsrfx.adapters.base import Adapter, AdapterConfig, LayerSpec
from lsrfx.adapters.condlora import CondLoRAConfig
from lsrfx.adapters.genlora import GenLoRAConfig
from lsrfx.adapters.lora import LoRAConfig
from lsrfx.adapters.lsr import LSRConfig
from lsrfx.errors import LsrfxError

METHODS: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (LoRAConfig, LSRConfig, CondLoRAConfig, GenLoRAConfig)
}


def make_config(method: str, options: dict) -> AdapterConfig:
    """The config for ``method`` built from keyword ``options``, with errors that list what is valid."""
    if method not in METHODS:
        raise LsrfxError(f"unknown method {method!r}; choose one of {sorted(METHODS)}.")
    cls = METHODS[method]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LsrfxError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}.")
    return cls(**options)


__all__ = [
    "METHODS",
    "Adapter",
    "AdapterConfig",
    "CondLoRAConfig",
    "GenLoRAConfig",
    "LSRConfig",
    "LayerSpec",
    "LoRAConfig",
    "make_config",
]
