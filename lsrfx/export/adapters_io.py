"""``save_adapters`` / ``load_adapters``: the small files of a fine-tune, bound to the base model they were trained on.

A directory holds ``adapters.safetensors`` (every adapter tensor once, CondLoRA's shared conversion pairs included
once, plus the base parameters trained through ``adapt(trainable=...)``) and ``adapter_config.json`` (format
version, lsrfx version, method and options, the adapted layers, the user's ``targets`` when they are
serialisable, a fingerprint per adapted layer: shape, dtype and SHA-256 of its frozen base weight, and
``tensors_sha256``, the SHA-256 of the whole ``adapters.safetensors`` file).

Loading checks the file's checksum first, so damaged adapter data (a flipped byte, a truncated copy) is an error
naming the file instead of NaN outputs; directories written before the checksum existed have none and load
unchecked. Then it checks every fingerprint, so adapters never land silently on a different base model. A model that
is not adapted yet is adapted from the saved config (same method, options and exact layer list) and then filled:
this is what a user loading a fine-tune into a freshly built base model expects, and it reproduces the trained
model's outputs exactly. An adapted model must carry the same method, options and layers; its adapter values are
replaced. On any error the model is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lsrfx.adapters import make_config
from lsrfx.api import adapt, adapt_state, remove_adapters
from lsrfx.errors import LsrfxError
from lsrfx.parametrization import adapted_layers, adapter_parameters, base_weight
from lsrfx.quantized_base import scheme
from lsrfx.utils import atomic_write, unwrap

FORMAT = "lsrfx-adapters"
FORMAT_VERSION = 1
TENSORS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def _full(t: Tensor) -> Tensor:
    """The whole tensor, plain, contiguous, on the CPU. A sharded DTensor (FSDP2) is gathered first, which is a
    collective: under FSDP2 every rank must call ``save_adapters`` / ``load_adapters``."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def _assign(p: Tensor, value: Tensor) -> None:
    """``p.copy_(value)`` in ``p``'s dtype, scattering ``value`` first when ``p`` is a sharded DTensor (FSDP2)."""
    value = value.to(p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
    p.copy_(value)


def _is_writer() -> bool:
    """Under torch.distributed only rank 0 writes files; every rank still takes part in gathering."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def fingerprint(weight: Tensor) -> dict[str, Any]:
    """Shape, dtype and SHA-256 of a base weight's bytes: any changed value, layout or precision changes it. A
    quantized (torchao) weight is hashed over its inner tensors (int data, scales) and adds its ``quantization``."""
    quantization = scheme(weight)
    parts = [weight] if quantization is None else [getattr(weight, n) for n in weight.__tensor_flatten__()[0]]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_full(part).reshape(-1).view(torch.uint8).numpy().tobytes())
    found = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
             "sha256": digest.hexdigest()}
    return found if quantization is None else {**found, "quantization": quantization}


def _serialisable_targets(targets: Any) -> Any:
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        return list(targets)
    return None  # a predicate: the exact layer list in "layers" still replays it


def save_adapters(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters of ``model`` (plain or compiled) to ``directory``; returns the directory.

    Files are replaced atomically (written under temporary names, then renamed). Under FSDP2 call it on every
    rank: sharded tensors are gathered and rank 0 writes.
    """
    from safetensors.torch import save

    import lsrfx

    root = unwrap(model)
    state = adapt_state(root)
    if state is None:
        raise LsrfxError(f"{type(root).__name__} has no lsrfx adapters to save; call lsrfx.adapt(model, ...) first.")
    modules = dict(root.named_modules())
    params = dict(root.named_parameters())
    tensors = {name: _full(p) for name, p in adapter_parameters(root).items()}
    trained_base = {n: _full(params[n]) for n in state.trainable if n in params}
    tensors.update(trained_base)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lsrfx_version": lsrfx.__version__,
        "method": state.config.method,
        "options": _jsonable(state.config.options()),
        "targets": _serialisable_targets(state.targets),
        "layers": {name: fingerprint(base_weight(modules[name])) for name in state.layers},
        "adapter_tensors": sorted(set(tensors) - set(trained_base)),
        "trainable": sorted(trained_base),
    }
    directory = Path(directory)
    if not _is_writer():
        return directory
    data = save(tensors, metadata={"format": "pt"})
    config["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / TENSORS_FILE, lambda f: Path(f).write_bytes(data))
        atomic_write(directory / CONFIG_FILE,
                      lambda f: Path(f).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    except OSError as exc:
        raise LsrfxError(f"cannot write adapters to {directory}: {exc.strerror or exc}; "
                         "choose a writable directory.") from exc
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (plain or compiled) and return ``model``.

    A model without adapters is adapted from the saved config first (``lsrfx.adapt``, which also installs the
    compile pass); an adapted one must match it, and its adapter tensors are overwritten in place, so a compiled
    model keeps its compiled code (hot-swap: no recompilation; the way to serve several adapters from one compiled
    base, tested over fp32 and int8 bases). Fails with
    an :class:`LsrfxError`, leaving the model unchanged, when the tensor file does not match its recorded SHA-256
    (damaged), when the base weights differ from the ones the adapters were trained on (fingerprint), or when
    method, options, layers or tensor shapes disagree.
    """
    directory = Path(directory)
    config = _read_config(directory)
    tensors = _read_tensors(directory / TENSORS_FILE, config.get("tensors_sha256"))
    root = unwrap(model)
    saved_config = make_config(config["method"], saved_options(config["method"], config["options"]))
    layers = list(config["layers"])
    _check_base(root, config["layers"])
    state = adapt_state(root)
    fresh = state is None
    if fresh:
        if any(True for _ in adapted_layers(root)):
            raise LsrfxError("the model holds lsrfx parametrizations but no adapt state; rebuild it from the base.")
        wanted = set(layers)
        adapt(model, saved_config, targets=lambda name, _m: name in wanted, trainable=config["trainable"])
    else:
        _check_same_adaptation(state, saved_config, layers)
    try:
        _fill(root, tensors, config)
    except LsrfxError:
        if fresh:
            _undo_adapt(model)
        raise
    return model


def _read_config(directory: Path) -> dict:
    file = directory / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise LsrfxError(f"cannot read {file}: {exc.strerror or exc}; pass the directory save_adapters wrote.") from exc
    except json.JSONDecodeError as exc:
        raise LsrfxError(f"{file} is not valid JSON ({exc}); the adapter directory is damaged.") from exc
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise LsrfxError(f"{file} is not an lsrfx adapter config of format version {FORMAT_VERSION} "
                         f"(found format={config.get('format')!r}, version={config.get('format_version')!r}).")
    return config


def _read_tensors(file: Path, sha256: str | None) -> dict[str, Tensor]:
    """The saved tensors, after checking the file's bytes against the SHA-256 recorded when it was written (files
    saved before lsrfx recorded one, ``sha256=None``, are not checked)."""
    from safetensors.torch import load

    try:
        data = file.read_bytes()
    except OSError as exc:
        raise LsrfxError(f"cannot read {file}: {exc.strerror or exc}; is it a save_adapters directory?") from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise LsrfxError(
            f"{file} is damaged: its SHA-256 differs from the one recorded in {CONFIG_FILE} when it was saved "
            f"({sha256[:16]}...); nothing was loaded. Restore the file from a good copy or save the adapters again."
        )
    try:
        return load(data)
    except Exception as exc:
        raise LsrfxError(f"cannot read {file}: {exc}; is it a save_adapters directory?") from exc


def _check_base(root: nn.Module, layers: dict[str, dict]) -> None:
    """Every saved layer exists and its base weight has the saved fingerprint."""
    modules = dict(root.named_modules())
    for name, saved in layers.items():
        module = modules.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise LsrfxError(
                f"the adapters were trained on a model with layer '{name}', which this {type(root).__name__} "
                "does not have; load them into the base model they were saved from."
            )
        weight = base_weight(module) if parametrize.is_parametrized(module, "weight") else module.weight
        found = fingerprint(weight)
        if found != saved:
            if found.get("quantization") != saved.get("quantization"):
                what = (f"quantization {found.get('quantization', 'none')} vs saved "
                        f"{saved.get('quantization', 'none')}: adapters are tied to the exact W0 they trained on")
            elif found["shape"] != saved["shape"] or found["dtype"] != saved["dtype"]:
                what = f"shape/dtype {found['shape']} {found['dtype']} vs saved {saved['shape']} {saved['dtype']}"
            else:
                what = "values"
            raise LsrfxError(
                f"base weight of layer '{name}' differs from the one these adapters were trained on ({what}); "
                "load them into the same base model (same checkpoint, dtype and layout) they were saved from."
            )


def _check_same_adaptation(state, saved_config, layers: list[str]) -> None:
    if state.config != saved_config:
        if state.config.method != saved_config.method:
            what = f"method {state.config.method!r} in the model, {saved_config.method!r} in the files"
        else:
            ours, theirs = state.config.options(), saved_config.options()
            what = ", ".join(f"{k}={ours[k]!r} in the model, {theirs[k]!r} in the files"
                             for k in ours if ours[k] != theirs.get(k))
        raise LsrfxError(
            f"the model is adapted with {state.config} but the saved adapters use {saved_config} ({what}); the "
            "model is unchanged. Load into a model adapted the same way, or into the plain base model (it is then "
            "adapted from the saved config)."
        )
    if list(state.layers) != layers:
        missing = sorted(set(layers) - set(state.layers))
        extra = sorted(set(state.layers) - set(layers))
        raise LsrfxError(f"the model's adapted layers differ from the saved ones (missing {missing[:5]}, extra "
                         f"{extra[:5]}); load into the plain base model so lsrfx adapts the saved layers.")


def _fill(root: nn.Module, tensors: dict[str, Tensor], config: dict) -> None:
    """Copy the saved tensors in after checking names and shapes of all of them."""
    params = dict(root.named_parameters())
    targets = dict(adapter_parameters(root))
    for name in config["trainable"]:
        targets[name] = params.get(name)
    expected = set(config["adapter_tensors"]) | set(config["trainable"])
    if set(targets) != expected or set(tensors) != expected:
        diff = sorted(set(targets) ^ expected) or sorted(set(tensors) ^ expected)
        raise LsrfxError(f"saved adapter tensors do not match the model's (e.g. {diff[:3]}); the files come from "
                         "a different lsrfx adapter layout.")
    for name, t in tensors.items():
        p = targets[name]
        if p is None or p.shape != t.shape:
            raise LsrfxError(f"saved tensor '{name}' has shape {tuple(t.shape)}, the model's "
                             f"{None if p is None else tuple(p.shape)}; the adapters belong to another model.")
    with torch.no_grad():
        for name, t in tensors.items():
            _assign(targets[name], t)


def _undo_adapt(model: nn.Module) -> None:
    """Reverse an ``adapt`` made by ``load_adapters`` (base weights restored untouched, freezing undone, the input
    recorder removed from ``model`` itself, which is the compiled wrapper for a compiled model)."""
    remove_adapters(model, fold=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def saved_options(method: str, options: dict) -> dict:
    """A saved config's options as keyword arguments: JSON lists back to tuples, and an option the file lacks
    because it was written before the option existed takes the value that reproduces that file's adapter (the
    config class's ``OPTIONS_BEFORE_THEY_EXISTED``), not today's default."""
    from lsrfx.adapters import METHODS

    legacy = getattr(METHODS.get(method), "OPTIONS_BEFORE_THEY_EXISTED", {})
    return {**legacy, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}}
