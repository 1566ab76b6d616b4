"""The schema of ``adapter_config.json`` in an lsrfx adapter directory, checked field by field before it is used.

peft's LoRA directories use the same file name; :mod:`lsrfx.export.peft_format` reads those (the content tells the
two apart: lsrfx's has ``"format": "lsrfx-adapters"``, peft's a ``peft_type``) into the same :class:`SavedAdapters`.

An adapter directory is data from outside the process: every field is validated here (type, range, size of the
file) and any problem is an :class:`LsrfxError` naming the file and the field, never a raw ``KeyError`` or
``TypeError`` from deep inside loading. The config never decides *what* is overwritten in a model: which tensors
load is derived from the model and the adapter method (:mod:`lsrfx.export.adapters_io`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsrfx.adapters import METHODS, AdapterConfig, make_config
from lsrfx.errors import LsrfxError

FORMAT = "lsrfx-adapters"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 64 << 20  # a config lists one fingerprint per layer: megabytes at most, never gigabytes
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "float8_e4m3fn")


@dataclass(frozen=True)
class SavedAdapters:
    """A validated ``adapter_config.json``: the method's config, the adapted layers with their base-weight
    fingerprints (in the order saved; ``None`` for a peft directory, which records none), the trained base
    parameters, and the tensor file's SHA-256 (``None`` in directories written before lsrfx recorded it, and in peft
    directories)."""

    config: AdapterConfig
    layers: dict[str, dict[str, Any] | None]
    trainable: list[str]
    targets: Any
    tensors_sha256: str | None


def parse_config(data: bytes, file: Path) -> dict:
    """The JSON object in ``data`` (the bytes of ``file``), or an :class:`LsrfxError` naming the file."""
    if len(data) > MAX_CONFIG_BYTES:
        raise LsrfxError(f"{file} is {len(data):,} bytes, more than any adapter config ({MAX_CONFIG_BYTES:,}); "
                         "it is not an lsrfx adapter config.")
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LsrfxError(f"{file} is not valid JSON ({exc}); the adapter directory is damaged.") from exc
    if not isinstance(config, dict):
        raise LsrfxError(f"{file} holds a JSON {type(config).__name__}, not an object; it is not an adapter config.")
    return config


def read_saved(config: dict, file: Path) -> SavedAdapters:
    """Validate an lsrfx config object (see the module docstring)."""
    def bad(field: str, why: str) -> LsrfxError:
        return LsrfxError(f"{file}: field '{field}' {why}; the adapter directory is damaged or was edited by hand. "
                          "Save the adapters again with lsrfx.save_adapters.")

    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise LsrfxError(f"{file} is not an lsrfx adapter config of format version {FORMAT_VERSION} "
                         f"(found format={config.get('format')!r}, version={config.get('format_version')!r}) nor a "
                         "peft adapter config (no 'peft_type'); pass a directory written by lsrfx.save_adapters or "
                         "by peft's save_pretrained.")
    for key in ("method", "options", "layers", "trainable"):
        if key not in config:
            raise bad(key, "is missing")
    method = config["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise bad("method", f"is {method!r}, not one of {sorted(METHODS)}")
    options = config["options"]
    if not isinstance(options, dict):
        raise bad("options", f"must be an object, not {type(options).__name__}")
    try:
        adapter_config = make_config(method, saved_options(method, options))
    except LsrfxError as exc:
        raise LsrfxError(f"{file}: {exc}") from exc
    layers = config["layers"]
    if not isinstance(layers, dict) or not layers:
        raise bad("layers", "must be a non-empty object of layer name -> base-weight fingerprint")
    for name, fp in layers.items():
        _check_fingerprint(name, fp, bad)
    trainable = config["trainable"]
    if not isinstance(trainable, list) or not all(isinstance(n, str) and n for n in trainable):
        raise bad("trainable", "must be a list of parameter names")
    if len(set(trainable)) != len(trainable):
        raise bad("trainable", "repeats a name")
    sha = config.get("tensors_sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.fullmatch(sha)):
        raise bad("tensors_sha256", "is not a SHA-256 hex digest")
    return SavedAdapters(adapter_config, dict(layers), list(trainable), config.get("targets"), sha)


def _check_fingerprint(name: Any, fp: Any, bad) -> None:
    field = f"layers.{name}"
    if not isinstance(name, str) or not name:
        raise bad("layers", f"has a layer name {name!r} that is not a module name")
    if not isinstance(fp, dict):
        raise bad(field, "must be a fingerprint object (shape, dtype, sha256)")
    shape = fp.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad(f"{field}.shape", f"is {shape!r}, not two positive integers")
    if fp.get("dtype") not in _DTYPES:
        raise bad(f"{field}.dtype", f"is {fp.get('dtype')!r}, not a weight dtype")
    if not isinstance(fp.get("sha256"), str) or not _SHA256.fullmatch(fp["sha256"]):
        raise bad(f"{field}.sha256", "is not a SHA-256 hex digest")
    if "quantization" in fp and not isinstance(fp["quantization"], str):
        raise bad(f"{field}.quantization", "must be a string")


def saved_options(method: str, options: dict) -> dict:
    """A saved config's options as keyword arguments: an option the file lacks because it was written before the
    option existed takes the value that reproduces that file's adapter (the config class's
    ``OPTIONS_BEFORE_THEY_EXISTED``), not today's default. Types and ranges are checked by the config class."""
    legacy = getattr(METHODS.get(method), "OPTIONS_BEFORE_THEY_EXISTED", {})
    return {**legacy, **options}
