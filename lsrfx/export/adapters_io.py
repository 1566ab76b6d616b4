"""``save_adapters`` / ``load_adapters``: the small files of a fine-tune, bound to the base model they were trained on.

A directory holds ``adapters.safetensors`` (every adapter tensor once, CondLoRA's shared conversion pairs included
once, plus the base parameters trained through ``adapt(trainable=...)``) and ``adapter_config.json`` (format
version, lsrfx version, method and options, the adapted layers, the user's ``targets`` when they are
serialisable, a fingerprint per adapted layer: shape, dtype and SHA-256 of its frozen base weight, and
``tensors_sha256``, the SHA-256 of the whole ``adapters.safetensors`` file).

An adapter directory is data, never a description of what to overwrite:

* which tensors load is derived from the model and the method (the tensors ``adapt`` creates for the saved layers),
  and the file must hold exactly those, each with the model's shape and dtype and finite values; a trained base
  parameter loads only under a name the model lists as a plain parameter (never an adapted layer's ``W0``) and, in
  an adapted model, only one the model itself trains;
* every config field is validated (:mod:`lsrfx.export.adapter_config`), the tensor file must be a regular file no
  larger than those tensors, and its SHA-256 must match the recorded one;
* every fingerprint must match, so adapters never land silently on a different base model.

All of it is checked before the model changes: a failed load leaves the model exactly as it was. A model that is not
adapted yet is adapted from the saved config (same method, options and layers) and then filled; an adapted model
must carry the same method, options and set of layers, and its adapter values are replaced in place (hot-swap: a
compiled model keeps its compiled code), the trained base parameters the new set does not carry going back to their
base values. Saving replaces the whole directory in one step (:func:`lsrfx.atomic_files.publish_directory`), and
loading reads one version of it (:func:`lsrfx.atomic_files.read_directory`), so a reader never sees half a save.

peft's LoRA directories load through the same path, under the same rules (:mod:`lsrfx.export.peft_format` turns
their config into the layers, LoRA options and trained parameters, and their tensor names into lsrfx's; peft records
no base-weight fingerprints), and ``save_adapters(..., format="peft")`` writes one for any method.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lsrfx import atomic_files, serving
from lsrfx.adapters import LayerSpec
from lsrfx.adapters.base import check_size
from lsrfx.api import AdaptState, adapt, adapt_state, remove_adapters
from lsrfx.errors import LsrfxError
from lsrfx.export import peft_format
from lsrfx.export.adapter_config import CONFIG_FILE, FORMAT, FORMAT_VERSION, SavedAdapters, parse_config, read_saved
from lsrfx.parametrization import adapted_layers, adapter_parameters, base_weight, layer_of, named_adapter_parameters
from lsrfx.quantized_base import is_quantized, scheme
from lsrfx.utils import unwrap
from lsrfx.version import __version__

TENSORS_FILE = "adapters.safetensors"
# Files an adapter directory may hold; anything else means it is not a dedicated adapter directory, and saving
# (which replaces the whole directory) refuses to delete it.
ADAPTER_FILES = frozenset({CONFIG_FILE, TENSORS_FILE, "adapter_model.safetensors", "README.md"})
HEADER_ALLOWANCE = 1 << 20  # bytes of safetensors header beyond the tensor data a file may carry


@dataclass(frozen=True)
class Expected:
    """What one saved tensor must be: the model's tensor it loads into (``None`` while the model is not adapted:
    a meta-device stand-in gives shape and dtype), its shape and dtype."""

    target: Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype


def _full(t: Tensor) -> Tensor:
    """The whole tensor, plain, contiguous, on the CPU. A sharded DTensor (FSDP2) is gathered first, which is a
    collective: under FSDP2 every rank must call ``save_adapters`` / ``load_adapters``."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def _assign(p: Tensor, value: Tensor) -> None:
    """``p.copy_(value)``, scattering ``value`` first when ``p`` is a sharded DTensor (FSDP2)."""
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


def check_finite_tensors(tensors: dict[str, Tensor], doing: str) -> None:
    """Refuse NaN/inf adapter values, naming the layer and tensor (``doing``: what was refused, for the message)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LsrfxError(
                f"{doing} refused: tensor '{name}' of layer '{layer_of(name)}' holds {bad} non-finite value(s) "
                "(NaN or inf). The adapter diverged during training (lower the learning rate or the scale, check "
                "the loss for NaN); use the last good adapters."
            )


def _check_materialised(root: nn.Module, doing: str) -> None:
    if any(p.is_meta for p in root.parameters()):
        raise LsrfxError(f"cannot {doing}: the model's parameters are on the meta device and hold no values; "
                         "materialise it first (model.to_empty(device=...), then load the base weights).")


def save_adapters(model: nn.Module, directory: str | os.PathLike, *,
                  format: Literal["lsrfx", "peft"] = "lsrfx") -> Path:
    """Write the adapters of ``model`` (plain, compiled or wrapped for data parallelism) to ``directory``.

    ``format="lsrfx"`` (default) writes lsrfx's own directory: the method's own tensors, its options and the base
    weights' fingerprints; the one to resume training from. ``format="peft"`` writes a peft LoRA directory
    (``PeftModel.from_pretrained(base, directory)`` reproduces the model; :mod:`lsrfx.export.peft_format`): LoRA as
    itself, any other method as its formed rank-``r`` factors (``r * (d_in + d_out)`` values per layer, LoRA's
    size), the trained base parameters under ``modules_to_save``. lsrfx loads both.

    The directory is replaced as a whole, in one step: a crash or a concurrent reader never sees half a save, and
    concurrent savers of the same directory run one after another. It must be a directory of adapter files only
    (others are refused, never deleted). Non-finite adapter values are refused, naming the layer. Under FSDP2 call
    it on every rank: sharded tensors are gathered and rank 0 writes. Returns the directory.
    """
    from safetensors.torch import save

    if format not in ("lsrfx", "peft"):
        raise LsrfxError(f"save_adapters: format={format!r} is not one of 'lsrfx' (lsrfx's own directory, to "
                         "resume training from) or 'peft' (a peft LoRA directory).")
    root = unwrap(model)
    state = adapt_state(root)
    if state is None:
        raise LsrfxError(f"{type(root).__name__} has no lsrfx adapters to save; call lsrfx.adapt(model, ...) first.")
    _check_materialised(root, "save adapters")
    modules = dict(root.named_modules())
    params = dict(root.named_parameters())
    tensors = {name: _full(p) for name, p in adapter_parameters(root).items()}
    trained_base = {n: _full(params[n]) for n in state.trainable if n in params}
    check_finite_tensors({**tensors, **trained_base}, "save_adapters")
    directory = Path(directory)
    if format == "peft":
        metadata = {"lsrfx_version": __version__, "lsrfx_method": state.config.method,
                    "lsrfx_options": json.dumps(_jsonable(state.config.options()), sort_keys=True)}
        files = peft_format.peft_files(root, state, _full, metadata=metadata)
        if _is_writer():
            write_adapter_directory(directory, files)
        return directory
    tensors.update(trained_base)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lsrfx_version": __version__,
        "method": state.config.method,
        "options": _jsonable(state.config.options()),
        "targets": _serialisable_targets(state.targets),
        "layers": {name: fingerprint(base_weight(modules[name])) for name in state.layers},
        "adapter_tensors": sorted(set(tensors) - set(trained_base)),
        "trainable": sorted(trained_base),
    }
    if not _is_writer():
        return directory
    data = save(tensors, metadata={"format": "pt"})
    config["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    write_adapter_directory(directory, {TENSORS_FILE: data,
                                        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()})
    return directory


def write_adapter_directory(directory: Path, files: dict[str, bytes]) -> None:
    """Replace ``directory`` by one holding exactly ``files``, in one step; refuse a directory that holds anything
    but adapter files (it is not ours to delete)."""
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in ADAPTER_FILES)
        if foreign:
            raise LsrfxError(
                f"{directory} holds files that are not adapter files ({', '.join(foreign[:5])}); saving replaces the "
                f"whole directory in one step, so save into a directory of its own, e.g. {directory / 'adapters'}."
            )
    elif directory.exists():
        raise LsrfxError(f"{directory} exists and is not a directory; choose a directory for the adapters.")
    try:
        with atomic_files.publish_directory(directory) as stage:
            for name, data in files.items():
                (stage / name).write_bytes(data)
    except OSError as exc:
        raise LsrfxError(f"cannot write adapters to {directory}: {exc.strerror or exc} (nothing was changed there); "
                         "choose a writable directory with free space.") from exc


def load_adapters(model: nn.Module, directory: str | os.PathLike, *, name: str | None = None) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` into ``model`` (plain or compiled) and return ``model``.

    ``directory`` may also be a peft LoRA directory (``save_pretrained`` of a peft ``LoraConfig`` model): it loads
    as lsrfx LoRA (:mod:`lsrfx.export.peft_format` says what is read, ignored and refused), in every way below.

    Without ``name`` they become the model's own adapter: a model without adapters is adapted from the saved config
    first (``lsrfx.adapt``, which also installs the compile pass); an adapted one must carry the same method,
    options and layers, and its adapter tensors are overwritten in place, so a compiled model keeps its compiled
    code (hot-swap: no recompilation). The swap waits for running calls of the model to finish and holds new ones
    until it is done (:mod:`lsrfx.serving`), so no forward mixes two sets.

    With ``name``, they are loaded as a frozen named set beside the model's own adapter, for serving a set per batch
    row (``model(ids, adapter_names=[...])``, :func:`lsrfx.use_adapters`); any method and rank, on layers the model
    adapts (a base model is first adapted from this set's config). Loading a name again replaces that set.

    Everything is checked before the model changes (see the module docstring); any failure is an
    :class:`LsrfxError` naming the file, field, tensor or layer, and leaves the model exactly as it was.
    """
    directory = Path(directory)
    root = unwrap(model)
    state = adapt_state(root)
    if state is None and any(True for _ in adapted_layers(root)):
        raise LsrfxError("the model holds lsrfx parametrizations but no adapt state; rebuild it from the base.")
    named = name is not None and name != serving.DEFAULT
    if named and state is not None:
        saved, tensors = atomic_files_read(directory, root,
                                           lambda saved: expected_named_set(root, saved, state, name))
        adapter_set = serving.build_set(root, name, saved.config, list(saved.layers), tensors, str(directory))
        serving.add_set(model, adapter_set)
        return model
    saved, tensors = atomic_files_read(directory, root, lambda saved: expected_tensors(root, saved, state))
    if state is None:
        wanted = set(saved.layers)
        adapt(model, saved.config, targets=lambda layer, _m: layer in wanted, trainable=saved.trainable)
        try:
            _copy_in(root, tensors, adapt_state(root), reset=False)
            if named:
                adapter_set = serving.build_set(root, name, saved.config, list(saved.layers),
                                                {n: t for n, t in tensors.items() if n not in saved.trainable},
                                                str(directory))
                serving.add_set(model, adapter_set)
        except BaseException:
            remove_adapters(model, fold=False)
            raise
    else:
        with serving.serving_of(root).lock.writing(f"load adapters from {directory}"):
            _copy_in(root, tensors, state, reset=True)
    return model


def expected_named_set(root: nn.Module, saved: SavedAdapters, state: AdaptState, name: str) -> dict[str, Expected]:
    """The tensors of a named set: those ``adapt`` would create for its layers, which the model must adapt; a named
    set carries no trained base parameters (they would change every row)."""
    missing = [layer for layer in saved.layers if layer not in state.layers]
    if missing:
        raise LsrfxError(
            f"adapter set {name!r} adapts layer(s) this model does not ({missing[:3]}); a named set may only use "
            f"layers the model adapts ({len(state.layers)} layers, e.g. {state.layers[:2]}). Adapt the base with "
            "targets covering every set's layers first."
        )
    if saved.trainable:
        raise LsrfxError(
            f"adapter set {name!r} carries trained base parameters {saved.trainable[:3]}, which would change every "
            "row of a batch, not only its own; a named set serves adapters only. Load it without a name (as the "
            "model's own adapter) instead."
        )
    return expected_tensors(root, saved, None)


def atomic_files_read(directory: Path, root: nn.Module, expect) -> tuple[SavedAdapters, dict[str, Tensor]]:
    """The validated config and tensors of one version of ``directory``, an lsrfx or a peft adapter directory (told
    apart by the config's content, :func:`peft_format.is_peft_config`). ``expect(saved)`` gives the tensors the
    model needs (:func:`expected_tensors`), which bound the size of the tensor file and are checked one by one;
    a peft directory's tensors are first renamed to lsrfx's names (:func:`peft_format.peft_tensors`)."""
    config_file = directory / CONFIG_FILE

    def read(read_file) -> tuple[SavedAdapters, dict[str, Tensor]]:
        raw = parse_config(_read(read_file, CONFIG_FILE, directory), config_file)
        peft = peft_format.read_peft_config(raw, config_file, root) if peft_format.is_peft_config(raw) else None
        saved = read_saved(raw, config_file) if peft is None else peft.saved
        expected = expect(saved)
        limit = sum(e.dtype.itemsize * _numel(e.shape) for e in expected.values()) + HEADER_ALLOWANCE
        if peft is not None:
            buffers = dict(root.named_buffers(remove_duplicate=False))
            limit += sum(buffers[b].numel() * buffers[b].element_size() for b in peft.buffers.values())
        name = TENSORS_FILE if peft is None else peft_format.PEFT_TENSORS_FILE
        tensors_file = directory / name
        try:
            data = _read(read_file, name, directory, limit)
        except FileNotFoundError as exc:
            if peft is not None and _exists(read_file, peft_format.PEFT_PICKLE_FILE):
                raise LsrfxError(f"{directory} holds {peft_format.PEFT_PICKLE_FILE}, a pickle (loading one can run "
                                 f"code), and no {name}; lsrfx reads safetensors only. Save the adapter with peft's "
                                 "save_pretrained(..., safe_serialization=True).") from exc
            raise
        if saved.tensors_sha256 is not None and hashlib.sha256(data).hexdigest() != saved.tensors_sha256:
            raise LsrfxError(
                f"{tensors_file} is damaged: its SHA-256 differs from the one recorded in {CONFIG_FILE} when it was "
                f"saved ({saved.tensors_sha256[:16]}...); nothing was loaded. Restore the file from a good copy or "
                "save the adapters again."
            )
        tensors = _parse_safetensors(data, tensors_file)
        if peft is not None:
            tensors = peft_format.peft_tensors(peft, tensors, expected, root, tensors_file)
        return saved, check_tensors(tensors, expected, tensors_file)

    try:
        return atomic_files.read_directory(directory, read)
    except FileNotFoundError as exc:
        raise LsrfxError(f"cannot read {directory}: {exc.strerror or exc} ({exc.filename}); pass the directory "
                         "save_adapters (or peft's save_pretrained) wrote.") from exc
    except NotADirectoryError as exc:
        raise LsrfxError(f"cannot read adapters from {directory}: it is not a directory.") from exc
    except OSError as exc:
        raise LsrfxError(f"cannot read {directory}: {exc.strerror or exc}; pass the directory save_adapters "
                         "wrote.") from exc


def _exists(read_file, name: str) -> bool:
    try:
        read_file(name, 0)
    except atomic_files.FileTooLarge:
        return True
    except OSError:
        return False
    return True


def _read(read_file, name: str, directory: Path, limit: int | None = None) -> bytes:
    try:
        return read_file(name, limit)
    except atomic_files.NotARegularFile as exc:
        raise LsrfxError(f"{directory / name} is not a regular file (a device, pipe or directory); refusing to "
                         "read it. Adapter directories hold plain files only.") from exc
    except atomic_files.FileTooLarge as exc:
        raise LsrfxError(f"{directory / name} is {exc.strerror}: larger than the adapters this model can hold, so "
                         "it was not read. It belongs to another model or is damaged.") from exc
    except IsADirectoryError as exc:
        raise LsrfxError(f"{directory / name} is a directory, not an adapter file.") from exc


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _parse_safetensors(data: bytes, file: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    if len(data) < 8 or struct.unpack("<Q", data[:8])[0] > len(data) - 8:
        raise LsrfxError(f"cannot read {file}: not a safetensors file (truncated or of another format).")
    try:
        return load(data)
    except Exception as exc:
        raise LsrfxError(f"cannot read {file}: {exc}; is it a save_adapters directory?") from exc


def expected_tensors(root: nn.Module, saved: SavedAdapters, state: AdaptState | None) -> dict[str, Expected]:
    """Every tensor the file must hold, derived from the model and the method, never from the file's own lists:
    the adapter tensors ``adapt`` creates for the saved layers, and the trained base parameters the config names,
    each checked to be a plain parameter of the model (and, in an adapted model, one it trains)."""
    check_base(root, saved.layers)
    if state is None:
        # layer_spec_of: a named set's layers are adapted already (a parametrized Conv1D keeps its orientation)
        specs = [_meta_spec(peft_format.layer_spec_of(name, m)) for name, m in _saved_modules(root, saved)]
        for spec in specs:
            saved.config.check(spec)
            check_size(saved.config, spec)
        expected = {n: Expected(None, shape, dtype) for n, (shape, dtype) in _adapter_shapes(saved, specs).items()}
    else:
        check_same_adaptation(state, saved)
        expected = {n: Expected(p, tuple(p.shape), p.dtype) for n, p in adapter_parameters(root).items()}
    expected.update(_expected_trainable(root, saved, state))
    return expected


_SHAPES: dict[tuple[str, tuple[LayerSpec, ...]], dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}


def _adapter_shapes(saved: SavedAdapters, specs: list[LayerSpec]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name, shape and dtype of every tensor ``adapt`` creates for ``specs`` with the saved config, from adapters
    built on the meta device; kept per (config, layers), since a server loads the same kinds of sets again and
    again and building (and initialising) the adapters costs more than the rest of a load."""
    key = (repr(saved.config), tuple(specs))
    shapes = _SHAPES.get(key)
    if shapes is None:
        adapters = named_adapter_parameters(zip((s.name for s in specs), saved.config.build(specs), strict=True))
        shapes = {n: (tuple(p.shape), p.dtype) for n, p in adapters.items()}
        if len(_SHAPES) >= 64:
            _SHAPES.clear()
        _SHAPES[key] = shapes
    return shapes


def _meta_spec(spec: LayerSpec) -> LayerSpec:
    """``spec`` on the meta device: adapters built from it give names, shapes and dtypes without allocating."""
    return LayerSpec(spec.name, spec.d_out, spec.d_in, spec.transposed, spec.dtype, torch.device("meta"))


def _saved_modules(root: nn.Module, saved: SavedAdapters) -> list[tuple[str, nn.Module]]:
    """The saved layers in the model's module order (the order ``adapt`` builds them in)."""
    return [(name, m) for name, m in root.named_modules() if name in saved.layers]


def _expected_trainable(root: nn.Module, saved: SavedAdapters, state: AdaptState | None) -> dict[str, Expected]:
    params = dict(root.named_parameters())
    out = {}
    for name in saved.trainable:
        p = params.get(name)
        if p is None or ".parametrizations." in name:
            raise LsrfxError(
                f"the adapter config lists '{name}' as a trained base parameter, but the model has no such plain "
                "parameter (an adapted layer's W0 or an adapter tensor never loads from the trained list); the "
                "directory was edited or belongs to another model. Nothing was loaded."
            )
        if state is not None and name not in state.trainable:
            raise LsrfxError(
                f"the adapters carry the trained base parameter '{name}', which this adapted model does not train "
                f"(its trainable parameters: {state.trainable[:6] or 'none'}); a hot-swap may only replace what the "
                "model trains. Load into a fresh base model, or adapt with trainable including it."
            )
        out[name] = Expected(p if state is not None else None, tuple(p.shape), p.dtype)
    return out


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, Expected], file: Path) -> dict[str, Tensor]:
    """The file's tensors, exactly the expected names, each with the expected shape and dtype and finite."""
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise LsrfxError(f"{file} holds tensors this model's adapters do not have: {extra[:5]}; only the adapter "
                         "tensors of the saved layers and the trained parameters load. Nothing was loaded.")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LsrfxError(f"{file} lacks tensors the adapters need: {missing[:5]}; the files come from a different "
                         "lsrfx adapter layout or were edited. Nothing was loaded.")
    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != want.shape:
            raise LsrfxError(f"saved tensor '{name}' has shape {tuple(t.shape)}, the model's {want.shape}; the "
                             "adapters belong to another model. Nothing was loaded.")
        if t.dtype != want.dtype:
            raise LsrfxError(f"saved tensor '{name}' is {str(t.dtype).removeprefix('torch.')}, the model's "
                             f"{str(want.dtype).removeprefix('torch.')}; lsrfx does not convert adapter values. "
                             "Nothing was loaded.")
    check_finite_tensors(tensors, f"loading {file}")
    return tensors


def check_base(root: nn.Module, layers: dict[str, dict | None]) -> None:
    """Every saved layer exists and its base weight has the saved fingerprint (when one was saved: peft directories
    record none)."""
    modules = dict(root.named_modules())
    for name, saved in layers.items():
        module = modules.get(name)
        adapted = module is not None and parametrize.is_parametrized(module, "weight")
        if module is None or (not adapted and getattr(module, "weight", None) is None):
            raise LsrfxError(
                f"the adapters were trained on a model with layer '{name}', which this {type(root).__name__} "
                "does not have; load them into the base model they were saved from."
            )
        weight = base_weight(module) if adapted else module.weight  # module.weight would form W0 + dW
        if weight.is_meta:
            raise LsrfxError(f"cannot load adapters: layer '{name}' has its weight on the meta device (no values to "
                             "check against the saved fingerprint); materialise the model and load the base weights "
                             "first.")
        if saved is None:
            continue
        found = _kept_fingerprint(module, weight) if adapted else fingerprint(weight)
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


def _kept_fingerprint(module: nn.Module, weight: Tensor) -> dict[str, Any]:
    """An adapted layer's base fingerprint, hashed again only when ``W0`` changed (another tensor, or an in-place
    write, which bumps its version): hot-swaps on a served model check the same weights at every load."""
    if is_quantized(weight):  # a torchao tensor's inner data can change without its version: hash it each time
        return fingerprint(weight)
    key = (id(weight), weight.data_ptr(), weight._version)
    kept = module.__dict__.get("_lsrfx_fingerprint")
    if kept is None or kept[0] != key:
        kept = (key, fingerprint(weight))
        module.__dict__["_lsrfx_fingerprint"] = kept
    return kept[1]


def check_same_adaptation(state: AdaptState, saved: SavedAdapters) -> None:
    """An adapted model can take a saved set in place only if method, options and the set of layers agree."""
    ours, theirs = state.config, saved.config
    if ours != theirs:
        if ours.method != theirs.method:
            what = f"method {ours.method!r} in the model, {theirs.method!r} in the files"
        else:
            mine, other = ours.options(), theirs.options()
            what = ", ".join(f"{k}={mine[k]!r} in the model, {other[k]!r} in the files"
                             for k in mine if mine[k] != other.get(k))
        raise LsrfxError(
            f"the model is adapted with {ours} but the saved adapters use {theirs} ({what}); the model is "
            "unchanged. Load into a model adapted the same way, or into the plain base model (it is then adapted "
            "from the saved config)."
        )
    if set(state.layers) != set(saved.layers):
        missing = sorted(set(saved.layers) - set(state.layers))
        extra = sorted(set(state.layers) - set(saved.layers))
        raise LsrfxError(
            f"the model's adapted layers differ from the saved ones: {len(missing)} saved layer(s) not adapted in "
            f"the model (e.g. {missing[:3]}), {len(extra)} adapted layer(s) not in the files (e.g. {extra[:3]}); the "
            "model is unchanged. Load into the plain base model so lsrfx adapts exactly the saved layers."
        )


def _copy_in(root: nn.Module, tensors: dict[str, Tensor], state: AdaptState, *, reset: bool) -> None:
    """Copy checked tensors into the model's adapter and trained parameters. ``reset``: the trained base
    parameters the set does not carry go back to their base values (a hot-swap must not keep the previous set's
    head). Nothing here can fail on valid input, so the model is never left half-filled."""
    targets = {**adapter_parameters(root), **dict(root.named_parameters())}
    stale = [n for n in state.trainable if n not in tensors] if reset else []
    unknown = [n for n in stale if n not in state.base_values]
    if unknown:
        raise LsrfxError(f"the adapters do not carry the trained parameter(s) {unknown[:5]}, whose base values are "
                         "unknown (the model was adapted on the meta device); load into a fresh base model instead.")
    with torch.no_grad():
        for name, t in tensors.items():
            _assign(targets[name], t)
        for name in stale:
            _assign(targets[name], state.base_values[name])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

