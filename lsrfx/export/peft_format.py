"""peft's LoRA adapter directories, in and out: every lsrfx model can be served by peft (and by the servers that read
peft's format), and a peft LoRA adapter loads into lsrfx as lsrfx LoRA.

peft's directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
...) and ``adapter_model.safetensors`` with ``base_model.model.<layer>.lora_A.weight`` (``r x d_in``) and
``.lora_B.weight`` (``d_out x r``), ``dW = lora_alpha / r * B @ A`` (``/ sqrt(r)`` with rsLoRA), in that orientation
for GPT-2's ``Conv1D`` too, and the modules it trained whole (``modules_to_save``) as
``base_model.model.<module>.<state_dict key>``. lsrfx's own directories share the config's file name; the content
tells them apart (:func:`is_peft_config`: ``peft_type`` and no lsrfx ``format``).

**In** (:func:`read_peft_config`, :func:`peft_tensors`). A peft directory is data from outside, held to the rules of
lsrfx's own (:mod:`lsrfx.export.adapters_io`): every config field is validated, the adapted layers and trained
modules are found in *this* model with peft's own matching rules (``target_modules`` as a list: a name equal to an
entry or ending in ``"." + entry``; as a string: a regular expression matching the whole name; ``exclude_modules``;
``modules_to_save`` by name suffix, a module matched by no entry ignored, as peft does), the tensor file must hold
exactly the tensors those need, each with the model's shape, a float dtype it converts to exactly, finite values.
What lsrfx cannot reproduce is refused naming the field (DoRA, a bias other than ``"none"``, a LoRA bias, ranks or
alphas that differ between layers, ``layers_to_transform``, initialisations that rewrite the base weights when peft
loads the adapter, any other peft feature set to a non-default value) or the tensor. Ignored, as they do not change
what the loaded adapter computes: ``lora_dropout`` (no dropout at inference; lsrfx LoRA has none when trained
further), ``fan_in_fan_out`` (the orientation comes from the layer's type: peft overrides the flag per layer the
same way), ``task_type``, ``inference_mode`` and the provenance fields. The adapter loads as ``LoRAConfig(r,
alpha)``; with rsLoRA ``alpha = lora_alpha * sqrt(r)`` (the float whose ``alpha / r`` is peft's scale exactly).
``modules_to_save`` loads as lsrfx ``trainable``; its buffers, which peft saves too, must equal the model's (lsrfx
loads trained parameters, never buffers). peft directories record no fingerprint of the base weights, so unlike an
lsrfx directory nothing can tell whether the base model is the one the adapter was trained on (peft cannot either).

**Out** (:func:`peft_files`). Every method's update is ``scale * B @ A`` with rank-``r`` factors: LoRA is written as
itself (``lora_alpha = alpha``), LSR-Adapt, CondLoRA and GenLoRA as their formed factors ``A`` and ``scale * B``
with ``lora_alpha = r`` (peft's scale is then exactly 1). The trained base parameters go under ``modules_to_save``
(their smallest modules, written whole, as peft does); ``target_modules`` is a regular expression that matches
exactly the adapted layers. The written config is checked by matching it against the model with the rules used to
read it, so peft selects exactly those layers and modules.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lsrfx.adapters import LayerSpec, LoRAConfig
from lsrfx.errors import LsrfxError
from lsrfx.export.adapter_config import CONFIG_FILE, SavedAdapters
from lsrfx.parametrization import (
    ADAPTER_INFIX,
    adapted_layers,
    adapted_weight,
    adapter_parameters,
    base_weight,
    named_adapter_parameters,
)
from lsrfx.quantized_base import dense
from lsrfx.targets import layer_spec, weight_is_transposed

PEFT_TENSORS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
# ``init_lora_weights`` values that only choose starting values (which the saved tensors replace). The others
# (pissa, olora, corda, loftq, lora_ga, mica) rewrite the base weights or the layer when peft loads the adapter.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Fields that describe the adapter's origin or training, never what the loaded adapter computes.
_IGNORED = frozenset({"base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
                      "peft_version", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
                      "eva_config", "layers_pattern"})
# Fields read below, each with its own check.
_READ = frozenset({"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "modules_to_save",
                   "use_rslora", "fan_in_fan_out", "bias", "use_dora", "rank_pattern", "alpha_pattern",
                   "layers_to_transform", "lora_dropout", "init_lora_weights"})
# What a non-default value of a field means, for the message (any other unknown field: the generic reason).
_UNSUPPORTED = {
    "lora_bias": "lora_B carries a trained bias, which an lsrfx low-rank update B @ A does not have",
    "target_parameters": "LoRA on bare parameters (e.g. mixture-of-experts weights) is not an adapted linear layer",
    "trainable_token_indices": "trained embedding rows (trainable tokens) are not an adapter lsrfx has",
    "layer_replication": "layer replication changes the model's architecture",
    "megatron_config": "Megatron's parallel linear layers are not nn.Linear",
    "alora_invocation_tokens": "Activated LoRA applies the update only after its invocation tokens, lsrfx to "
                               "every token",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "use_bdlora": "BD-LoRA's block-diagonal factors are applied by its own layer",
    "loftq_config": "LoftQ replaces the base weights by quantized ones when the adapter is created",
}


def layer_spec_of(name: str, module: nn.Module) -> LayerSpec:
    """:func:`lsrfx.targets.layer_spec` of a layer, adapted or not: an adapted layer's orientation is its
    parametrization's (its class is then ``parametrize``'s generated ``ParametrizedConv1D``, which
    :func:`~lsrfx.targets.weight_is_transposed` does not recognise)."""
    param = adapted_weight(module)
    if param is None:
        return layer_spec(name, module)
    w = base_weight(module)
    d_out, d_in = (w.shape[1], w.shape[0]) if param.transposed else tuple(w.shape)
    return LayerSpec(name, d_out, d_in, param.transposed, w.dtype, w.device)


def _transposed(module: nn.Module) -> bool | None:
    """Whether a layer stores its weight ``(in, out)`` (Conv1D), ``None`` if lsrfx cannot adapt it."""
    param = adapted_weight(module)
    return param.transposed if param is not None else weight_is_transposed(module)


def is_peft_config(config: dict) -> bool:
    """Whether an ``adapter_config.json`` object is peft's (it names a ``peft_type`` and no lsrfx ``format``)."""
    return "peft_type" in config and "format" not in config


@dataclass(frozen=True)
class PeftAdapters:
    """A validated peft LoRA config, resolved against one model: the lsrfx view (:class:`SavedAdapters`: a LoRA
    config, the adapted layers without fingerprints, the trained parameters) and the file's tensor names, mapped to
    lsrfx's adapter tensors and the model's parameters, and to the model's buffers (which must be unchanged)."""

    saved: SavedAdapters
    names: dict[str, str]
    buffers: dict[str, str]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _neutral(value: Any) -> bool:
    """A field value that switches nothing on: peft's defaults for the features lsrfx refuses."""
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


# --- reading ------------------------------------------------------------------------------------------------------


class _Fields:
    """Field checks of one config file, with messages naming the file and field."""

    def __init__(self, config: dict, file: Path) -> None:
        self.config, self.file = config, file

    def error(self, field: str, why: str) -> LsrfxError:
        value = self.config.get(field)
        return LsrfxError(f"{self.file}: peft field '{field}' = {_shown(value)}: {why}. Nothing was loaded.")

    def get(self, field: str, default: Any = None) -> Any:
        return self.config.get(field, default)

    def regex(self, field: str, pattern: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise self.error(field, f"is not a valid regular expression ({exc})") from exc


def read_peft_config(config: dict, file: Path, root: nn.Module) -> PeftAdapters:
    """Validate a peft config object and resolve it against ``root`` (see the module docstring)."""
    f = _Fields(config, file)
    if config.get("peft_type") != "LORA":
        raise f.error("peft_type", "lsrfx loads peft LoRA adapters only (peft_type 'LORA'); other peft methods "
                                   "have no lsrfx equivalent")
    _check_unsupported(f)
    r, alpha = f.get("r", 8), f.get("lora_alpha", 8)
    if not _is_int(r) or r < 1:
        raise f.error("r", "must be a positive integer")
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise f.error("lora_alpha", "must be a finite number > 0")
    for field in ("use_rslora", "fan_in_fan_out", "inference_mode", "ensure_weight_tying"):
        if not isinstance(f.get(field, False), bool):
            raise f.error(field, "must be true or false")
    if not _neutral(f.get("use_dora")):
        raise f.error("use_dora", "DoRA rescales every output column of the adapted weight by a trained magnitude; "
                                  "an lsrfx adapter is a plain low-rank update and cannot represent it (merge the "
                                  "DoRA adapter into the base with peft's merge_and_unload, or train LoRA)")
    if f.get("bias", "none") != "none":
        raise f.error("bias", "peft trained and saved base-layer biases with the adapter; lsrfx loads LoRA "
                              "factors and modules_to_save only (bias must be 'none')")
    dropout = f.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout <= 1:
        raise f.error("lora_dropout", "must be a number in [0, 1]")
    init = f.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PLAIN_INITS):
        raise f.error("init_lora_weights", "this initialisation makes peft rewrite the base weights (or the layer) "
                                           "when it loads the adapter, which lsrfx does not reproduce; save the "
                                           "adapter as a plain LoRA (peft's path_initial_model_for_weight_"
                                           "conversion) and load that")
    layers_to_transform = f.get("layers_to_transform")
    if layers_to_transform is not None and layers_to_transform != []:
        raise f.error("layers_to_transform", "lsrfx does not reproduce peft's layer-index selection; give the "
                                             "layers in target_modules instead")

    target = f.get("target_modules")
    if isinstance(target, str):
        if target == "all-linear":
            raise f.error("target_modules", "'all-linear' is expanded by peft when it creates an adapter; a saved "
                                            "adapter lists its modules")
        target_rx = f.regex("target_modules", target)
    elif _string_list(target) and target:
        target_rx = None
    else:
        raise f.error("target_modules", "must be a non-empty list of module names or a regular expression")
    exclude = f.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        exclude_rx = f.regex("exclude_modules", exclude)
    elif exclude is None or exclude == "" or _string_list(exclude):
        exclude_rx = None
    else:
        raise f.error("exclude_modules", "must be a list of module names, a regular expression or null")
    to_save = f.get("modules_to_save")
    if to_save is not None and not _string_list(to_save):
        raise f.error("modules_to_save", "must be a list of module names or null")
    to_save = list(to_save or [])
    save_rx = [f.regex("modules_to_save", rf"(^|.*\.){m}($|\..*)") for m in to_save]

    names = _peft_module_names(root)
    modules = dict(root.named_modules())

    def targeted(key: str) -> bool:  # peft's check_target_module_exists (layers_to_transform refused above)
        if exclude_rx is not None and exclude_rx.fullmatch(key):
            return False
        if isinstance(exclude, list) and (key in exclude or any(key.endswith("." + e) for e in exclude)):
            return False
        if any(rx.match(key) for rx in save_rx):  # peft never adapts inside a module it trains whole
            return False
        if target_rx is not None:
            return target_rx.fullmatch(key) is not None
        return key in target or any(key.endswith("." + t) for t in target)

    layers = [key for key in names if targeted(key)]
    if not layers:
        raise f.error("target_modules", f"matches no module of this {type(root).__name__} (after exclude_modules "
                                        "and modules_to_save); the adapter belongs to another model")
    for key in layers:
        if _transposed(modules[key]) is None:
            raise f.error("target_modules", f"selects '{key}', a {type(modules[key]).__name__}; lsrfx adapts "
                                            "nn.Linear and GPT-2 Conv1D layers only")
    r, alpha = _uniform_rank_and_alpha(f, layers, r, alpha)
    if f.get("use_rslora", False):
        alpha = _alpha_for_scale(alpha / math.sqrt(r), r)
    try:
        lora = LoRAConfig(r=r, alpha=float(alpha))
    except LsrfxError as exc:
        raise LsrfxError(f"{file}: {str(exc).rstrip('.')} (from peft's r and lora_alpha). Nothing was "
                         "loaded.") from exc

    every = [name for name, _ in root.named_modules(remove_duplicate=False)]
    inner = _lsrfx_internals(root)
    matched = [key for key in every if not key.startswith(inner) and any(key.endswith(t) for t in to_save)]
    trained, buffers = _modules_to_save(f, root, list(dict.fromkeys(matched)), layers)
    names_map = {}
    for layer in layers:
        for part in ("lora_A", "lora_B"):
            names_map[f"{PREFIX}{layer}.{part}.weight"] = f"{layer}{ADAPTER_INFIX}{part}"
    names_map.update(trained)
    saved = SavedAdapters(lora, {layer: None for layer in layers}, sorted(trained.values()), target, None)
    return PeftAdapters(saved, names_map, buffers)


def _check_unsupported(f: _Fields) -> None:
    """Every field lsrfx neither reads nor ignores must hold peft's default (a feature switched off)."""
    for field, value in f.config.items():
        if field in _READ or field in _IGNORED or _neutral(value):
            continue
        why = _UNSUPPORTED.get(field, "a peft feature lsrfx does not reproduce (lsrfx loads plain LoRA: set only "
                                      "when this field is null, false or empty)")
        raise f.error(field, why)


def _lsrfx_internals(root: nn.Module) -> tuple[str, ...]:
    """Name prefixes of an adapted model's lsrfx parametrization modules, which the base model does not have."""
    return tuple(f"{name}.parametrizations" for name, _, _ in adapted_layers(root))


def _peft_module_names(root: nn.Module) -> list[str]:
    """The module names peft would see in the base model (``named_modules``, lsrfx's internals left out)."""
    inner = _lsrfx_internals(root)
    return [name for name, _ in root.named_modules() if not name.startswith(inner)]


def _pattern_key(patterns: Iterable[str], key: str, f: _Fields, field: str) -> str:
    """peft's ``get_pattern_key``: the first pattern that matches the end of ``key`` at a name boundary."""
    for pattern in patterns:
        if f.regex(field, rf"(.*\.)?({pattern})$").match(key):
            return pattern
    return key


def _uniform_rank_and_alpha(f: _Fields, layers: list[str], r: int, alpha: float) -> tuple[int, float]:
    """The rank and alpha every layer gets from ``rank_pattern`` / ``alpha_pattern`` (peft's rules); refused unless
    they are the same for all layers (an lsrfx LoRA has one rank and one alpha)."""
    found = {}
    for field, default, valid in (("rank_pattern", r, lambda v: _is_int(v) and v >= 1),
                                  ("alpha_pattern", alpha, lambda v: _is_number(v) and math.isfinite(v) and v > 0)):
        pattern = f.get(field) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            raise f.error(field, "must map module-name patterns to " + ("ranks" if field == "rank_pattern"
                                                                         else "alphas"))
        per_layer = {layer: pattern.get(_pattern_key(pattern, layer, f, field), default) for layer in layers}
        values = sorted(set(per_layer.values()))
        if len(values) > 1:
            shown = ", ".join(f"{v} for {next(k for k, x in per_layer.items() if x == v)!r}" for v in values[:2])
            raise f.error(field, f"gives the adapted layers different values ({shown}); an lsrfx LoRA has one "
                                 "rank and one alpha for all its layers")
        found[field] = values[0]
    return found["rank_pattern"], found["alpha_pattern"]


def _alpha_for_scale(scale: float, r: int) -> float:
    """An alpha whose ``alpha / r`` (lsrfx's scale) is exactly ``scale`` (rsLoRA's ``lora_alpha / sqrt(r)``)."""
    alpha = scale * r
    for candidate in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if candidate / r == scale:
            return candidate
    return alpha  # not reached for ranks in practice; off by one rounding of the scale at most


def _modules_to_save(f: _Fields, root: nn.Module, matched: list[str],
                     layers: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The file tensors of the modules peft trains whole: ``{file name: parameter name}`` (loaded as lsrfx
    ``trainable``) and ``{file name: buffer name}`` (which must equal the model's)."""
    modules = dict(root.named_modules(remove_duplicate=False))
    for a in matched:
        if not a:
            raise f.error("modules_to_save", "selects the whole model")
        inner = [b for b in (*matched, *layers) if b.startswith(a + ".")]
        if a in layers or inner:
            what = "an adapted layer" if a in layers else f"which holds '{inner[0]}'"
            raise f.error("modules_to_save", f"selects '{a}', {what} (adapted, or selected as well); lsrfx trains a "
                                             "module whole or adapts its layers, and each module once")
    aliases: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    buffer_names = {name for name, _ in root.named_buffers(remove_duplicate=False)}
    trained, buffers = {}, {}
    for module in matched:
        for local, tensor in modules[module].state_dict(keep_vars=True).items():
            full = f"{module}.{local}"
            if isinstance(tensor, nn.Parameter):
                names = aliases.get(id(tensor), [full])
                if len(names) > 1:
                    raise f.error("modules_to_save", f"selects '{module}', whose parameter '{full}' is shared with "
                                                     f"{[n for n in names if n != full][:2]} (tied weights): peft "
                                                     "trains an untied copy, lsrfx would change both")
                trained[PREFIX + full] = full
            elif full in buffer_names:
                buffers[PREFIX + full] = full
    return trained, buffers


def peft_tensors(peft: PeftAdapters, tensors: dict[str, Tensor], expected: dict, root: nn.Module,
                 file: Path) -> dict[str, Tensor]:
    """The file's tensors under lsrfx's names: exactly the expected names, each with the model's shape, its dtype
    (lower-precision floats are converted, exactly) and finite values, every failure naming peft's tensor; buffers
    checked equal to the model's and dropped. The caller then checks them again like any lsrfx file."""
    unknown = sorted(set(tensors) - set(peft.names) - set(peft.buffers))
    if unknown:
        raise LsrfxError(f"{file} holds tensors lsrfx does not load from a peft LoRA adapter for this model: "
                         f"{unknown[:4]}{_hint(unknown)}. Nothing was loaded.")
    missing = sorted(set(peft.names) - set(tensors))
    if missing:
        raise LsrfxError(f"{file} lacks tensors its adapter_config.json implies for this model: {missing[:4]} "
                         "(the layers target_modules selects and the modules_to_save parameters); the adapter "
                         "belongs to another model or was edited. Nothing was loaded.")
    own = dict(root.named_buffers(remove_duplicate=False))
    for name, buffer in peft.buffers.items():
        if name in tensors and not _same(tensors[name], own[buffer]):
            raise LsrfxError(f"{file}: buffer '{name}' of a modules_to_save module differs from the model's "
                             f"'{buffer}'; lsrfx loads trained parameters, not buffers. Nothing was loaded.")
    out = {}
    for name, lsrfx_name in peft.names.items():
        t, want = tensors[name], expected[lsrfx_name]
        if tuple(t.shape) != want.shape:
            what = f"layer '{lsrfx_name.split(ADAPTER_INFIX)[0]}'" if ADAPTER_INFIX in lsrfx_name else "the model"
            raise LsrfxError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, {what} needs {want.shape} "
                             f"(r={peft.saved.config.r}); the adapter belongs to another model or its rank differs. "
                             "Nothing was loaded.")
        if t.dtype != want.dtype:
            if not _exact_upcast(t.dtype, want.dtype):
                raise LsrfxError(f"{file}: tensor '{name}' is {str(t.dtype).removeprefix('torch.')}, the model's "
                                 f"{str(want.dtype).removeprefix('torch.')}; lsrfx converts only lower-precision "
                                 "floats, which convert exactly. Nothing was loaded.")
            t = t.to(want.dtype)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LsrfxError(f"{file}: tensor '{name}' holds {int((~torch.isfinite(t)).sum())} non-finite value(s) "
                             "(NaN or inf); the adapter diverged in training. Nothing was loaded.")
        out[lsrfx_name] = t
    return out


def _hint(unknown: list[str]) -> str:
    if any(".lora_magnitude_vector" in n for n in unknown):
        return " (DoRA magnitudes: set use_dora in the config? lsrfx cannot load DoRA)"
    if any(".lora_embedding_" in n for n in unknown):
        return " (LoRA on an embedding: lsrfx adapts linear layers only)"
    if any(".lora_B.bias" in n for n in unknown):
        return " (a bias on lora_B: lsrfx adapters have none)"
    if any(n.endswith(".bias") for n in unknown):
        return " (base-layer biases: lsrfx loads them only as modules_to_save)"
    return ""


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.detach().cpu()))


def _exact_upcast(have: torch.dtype, want: torch.dtype) -> bool:
    """Whether every ``have`` value is exactly a ``want`` value (bf16/fp16 -> fp32/fp64, fp32 -> fp64)."""
    wider = {torch.float16: (torch.float32, torch.float64), torch.bfloat16: (torch.float32, torch.float64),
             torch.float32: (torch.float64,)}
    return want in wider.get(have, ())


# --- writing ------------------------------------------------------------------------------------------------------


def peft_files(root: nn.Module, state: Any, full: Any, *, metadata: dict[str, str]) -> dict[str, bytes]:
    """The two files of a peft LoRA directory holding ``root``'s adapters (see the module docstring). ``full``
    makes a tensor whole, plain and on the CPU (gathering a sharded one). The caller has checked the adapter and
    trained tensors; formed factors that overflow are refused here."""
    from safetensors.torch import save

    modules = dict(root.named_modules())
    layers = [name for name, _, _ in adapted_layers(root)]
    factors, rank, alpha = _formed_factors(root, state, layers, full)
    owners = _owners(root, state.trainable, layers)
    tensors = {}
    for layer in layers:
        a, b = factors[layer]
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = b.contiguous()
    for owner in owners:
        for local, t in modules[owner].state_dict(keep_vars=True).items():
            tensors[f"{PREFIX}{owner}.{local}"] = full(t)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LsrfxError(f"save_adapters(format='peft') refused: the formed tensor '{name}' holds non-finite "
                             "values (scale * B overflows its dtype); nothing was written.")
    target = "^(?:" + "|".join(re.escape(layer) for layer in layers) + ")$"
    name_or_path = getattr(getattr(root, "config", None), "name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": name_or_path if isinstance(name_or_path, str) and name_or_path else None,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": target,
        "exclude_modules": None,
        "fan_in_fan_out": all(_transposed(modules[layer]) for layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": owners or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    _check_peft_selects(root, config, layers, owners)
    return {PEFT_TENSORS_FILE: save(tensors, metadata={"format": "pt", **metadata}),
            CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def _formed_factors(root: nn.Module, state: Any, layers: list[str],
                    full: Any) -> tuple[dict[str, tuple[Tensor, Tensor]], int, float]:
    """Each layer's ``(A, B)`` in peft's terms, the rank and ``lora_alpha``: LoRA's own tensors and alpha; any other
    method's formed factors ``A`` and ``scale * B``, zero-padded to one rank, with ``lora_alpha = r``. Computed on
    CPU copies of the adapters built like ``adapt`` builds them (the global random state is left as it was)."""
    modules = dict(root.named_modules())
    live = adapter_parameters(root)
    if state.config.method == "lora":
        out = {layer: (full(live[f"{layer}{ADAPTER_INFIX}lora_A"]), full(live[f"{layer}{ADAPTER_INFIX}lora_B"]))
               for layer in layers}
        return out, state.config.r, state.config.alpha
    specs = []
    for layer in layers:
        spec = layer_spec_of(layer, modules[layer])
        specs.append(LayerSpec(spec.name, spec.d_out, spec.d_in, spec.transposed, spec.dtype, torch.device("cpu")))
    out = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        adapters = state.config.build(specs)
        for name, p in named_adapter_parameters(zip(layers, adapters, strict=True)).items():
            p.copy_(full(live[name]))
        for spec, adapter in zip(specs, adapters, strict=True):
            w0 = full(dense(base_weight(modules[spec.name])))
            a, b = adapter.factors(w0.t() if spec.transposed else w0)
            out[spec.name] = (a.detach().clone(), (b * adapter.scale).detach())
    rank = max(a.shape[0] for a, _ in out.values())
    for layer, (a, b) in out.items():
        if a.shape[0] < rank:  # zero rows of A and columns of B: the same update at the common rank
            out[layer] = (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
                          torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1))
    return out, rank, rank


def _owners(root: nn.Module, trainable: list[str], layers: list[str]) -> list[str]:
    """The smallest modules holding the trained base parameters: peft's ``modules_to_save``."""
    params = dict(root.named_parameters())
    aliases: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        aliases[id(p)] = aliases.get(id(p), 0) + 1
    owners: list[str] = []
    for name in trainable:
        if name not in params:
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise LsrfxError(f"cannot save in peft's format: the trained parameter '{name}' belongs to the model "
                             "itself, and peft's modules_to_save names submodules; save in lsrfx's format instead.")
        if aliases[id(params[name])] > 1:
            raise LsrfxError(f"cannot save in peft's format: the trained parameter '{name}' is tied to another "
                             "module's; peft trains an untied copy of a modules_to_save module, so it would not "
                             "reproduce this model. Save in lsrfx's format instead.")
        inner = [layer for layer in layers if layer == owner or layer.startswith(owner + ".")]
        if inner:
            raise LsrfxError(f"cannot save in peft's format: the trained parameter '{name}' belongs to '{owner}', "
                             f"which holds adapted layers ({inner[:2]}); peft adapts no layer inside a "
                             "modules_to_save module. Save in lsrfx's format instead.")
        if owner not in owners:
            owners.append(owner)
    return sorted(owners)


def _check_peft_selects(root: nn.Module, config: dict, layers: list[str], owners: list[str]) -> None:
    """The written config, read back with peft's matching rules, selects exactly ``layers`` and ``owners``."""
    read = read_peft_config(config, Path("<peft config being saved>"), root)
    wrapped = {n for n in _peft_module_names(root) if any(n.endswith(o) for o in owners)}
    if set(read.saved.layers) != set(layers) or wrapped != set(owners):
        extra = sorted((wrapped - set(owners)) | (set(read.saved.layers) ^ set(layers)))
        raise LsrfxError(f"cannot save in peft's format: peft selects modules by name, and the config would also "
                         f"select (or miss) {extra[:3]} (modules_to_save {owners}, matched by name suffix); save in "
                         "lsrfx's format instead.")
