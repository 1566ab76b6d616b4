"""The user-facing verbs: ``adapt`` a model, ``merge`` the adapters back in, ``summary`` of what was adapted."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from lsrfx import adapted_layer, passes, quantized_base, serving, state_dict_hooks
from lsrfx.adapters import AdapterConfig, LayerSpec, make_config
from lsrfx.adapters.base import check_size
from lsrfx.diagnostics import delta_effective_ranks
from lsrfx.errors import LsrfxError
from lsrfx.parametrization import ORIGINAL_KEY, AdaptedWeight, adapted_layers, adapter_parameters, base_weight
from lsrfx.recorder import start_recording, stop_recording
from lsrfx.targets import Targets, layer_spec, match_parameter_names, select_targets
from lsrfx.utils import is_parallel_wrapper, unwrap

log = logging.getLogger("lsrfx")

ModelT = TypeVar("ModelT", bound=nn.Module)
STATE_ATTR = "_lsrfx_state"


@dataclass
class AdaptState:
    """What ``adapt`` did to a model, kept on the root module so ``merge``/export/save can undo or replay it.

    It holds no export state: the inputs export falls back on are recorded by :mod:`lsrfx.recorder`.
    """

    config: AdapterConfig
    layers: list[str]
    trainable: list[str]
    targets: Any
    frozen: list[str] = field(default_factory=list)  # parameters adapt froze; merge unfreezes them
    # The base values of the ``trainable`` parameters when ``adapt`` ran (CPU copies): what a hot-swap restores
    # when the new adapter set does not carry a parameter the previous one trained.
    base_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def adapt_state(model: nn.Module) -> AdaptState | None:
    """The :class:`AdaptState` of an adapted model (plain or compiled), ``None`` if it is not adapted."""
    return getattr(unwrap(model), STATE_ATTR, None)


def adapt(
    model: ModelT,
    config: AdapterConfig | None = None,
    *,
    method: str = "lsr",
    targets: Targets = None,
    trainable: str | tuple[str, ...] | list[str] = (),
    **options: Any,
) -> ModelT:
    """Insert adapters into ``model``'s target layers, freeze the rest, and return the same object.

    ``model`` may be a plain ``nn.Module`` or what ``torch.compile`` returns (it stays compiled). Give either a
    ``config`` (e.g. ``LSRConfig(r1=2, r2=2)``) or a ``method`` name with its ``options``. ``targets``: module-name
    suffixes, a string (read as one suffix, else as a full-name regex) or a predicate (default: attention
    query/value projections, else every linear layer but the output head). ``trainable``: base modules/parameters
    to keep trainable, e.g. ``"classifier"`` or ``("classifier", "pooler")``.
    On bad input an :class:`LsrfxError` names the layer, shape and fix, and the model is left untouched.

    Besides the model, ``adapt`` sets up two things: it installs lsrfx's fusion pass into Inductor's pre-grad
    passes (:func:`lsrfx.passes.install`: idempotent, applies ``LSRFX_LOG``; graphs without lsrfx ops pass through
    unchanged), so that ``torch.compile`` fuses the adapters; and it records a few rows of each forward call's
    inputs (:mod:`lsrfx.recorder`), so ``merge_and_export`` needs no example inputs after a forward.

    Checkpoints: an adapted layer's ``state_dict`` also holds ``weight`` = ``W0 + dW``, which plain models (a Hugging
    Face ``from_pretrained``) load, and a base checkpoint's ``weight`` loads into an adapted model as ``W0``
    (:mod:`lsrfx.state_dict_hooks`). A ``meta``-device model may be adapted: ``to_empty`` re-initialises the adapters.
    """
    _refuse_wrappers(model)
    root = unwrap(model)
    if adapt_state(root) is not None or any(True for _ in adapted_layers(root)):
        raise LsrfxError(
            "this model is already adapted by lsrfx; call lsrfx.merge(model) first to fold the current adapters "
            "in, or lsrfx.load_adapters(model, dir) to replace their values."
        )
    if config is None:
        config = make_config(method, options)
    elif options:
        raise LsrfxError(f"pass either config= or method options, not both (got options {sorted(options)}).")
    elif not isinstance(config, AdapterConfig):
        raise LsrfxError(f"config must be an lsrfx adapter config such as LoRAConfig(), got {type(config).__name__}.")

    names = select_targets(root, targets)
    modules = dict(root.named_modules())
    specs = [layer_spec(n, modules[n]) for n in names]
    for spec in specs:
        config.check(spec)
        check_size(config, spec)
        _check_not_sharded(spec, modules[spec.name].weight)
        quantized_base.check_quantized_base(spec, modules[spec.name].weight)
        _check_finite(spec, quantized_base.dense(modules[spec.name].weight))
    trainable_names = match_parameter_names(root, trainable)
    _check_trainable_not_adapted(names, trainable_names)
    adapters = config.build(specs)

    # Validation is over: from here on the model changes.
    frozen = [n for n, p in root.named_parameters() if p.requires_grad and n not in trainable_names]
    params = dict(root.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    for spec, adapter in zip(specs, adapters, strict=True):
        module = modules[spec.name]
        adapted_layer.install(module, adapter, spec.transposed)
        state_dict_hooks.install_hooks(module)
    with torch.no_grad():
        base_values = {n: params[n].detach().to("cpu", copy=True) for n in trainable_names
                       if not params[n].is_meta}
    state = AdaptState(config, names, trainable_names, targets, frozen, base_values)
    object.__setattr__(root, STATE_ATTR, state)
    start_recording(model)
    serving.install_hooks(model)
    passes.install()
    n_adapter = sum(p.numel() for p in adapter_parameters(root).values())
    log.info("lsrfx: adapted %d layers with %s (%s trainable adapter parameters): %s",
             len(names), config.method, f"{n_adapter:,}", ", ".join(names))
    return model


def _refuse_wrappers(model: nn.Module) -> None:
    """Refuse a model already wrapped for data-parallel training: ``DistributedDataParallel`` and FSDP register the
    parameters they synchronise when they are built, so adapters added afterwards would silently train apart on
    each rank. (``nn.DataParallel`` replicates at every call, so adapting the model inside it is fine.)"""
    for module in unwrap(model).modules():
        if type(module).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            raise LsrfxError(_WRAPPED_TOO_EARLY.format(type(module).__name__))
    current = model
    while True:
        if type(current).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
            raise LsrfxError(_WRAPPED_TOO_EARLY.format(type(current).__name__))
        inner = getattr(current, "_orig_mod", None) or (current.module if is_parallel_wrapper(current) else None)
        if inner is None:
            return
        current = inner


_WRAPPED_TOO_EARLY = (
    "the model is already wrapped in {0}, which fixed the set of parameters it synchronises across ranks when it "
    "was built: adapter parameters added now would not be synchronised. Call lsrfx.adapt on the plain model first, "
    "then wrap it: model = {0}(lsrfx.adapt(model, ...))."
)


def _check_not_sharded(spec: LayerSpec, weight: torch.Tensor) -> None:
    """Refuse a weight that FSDP2's ``fully_shard`` already sharded (a DTensor): adapters must exist before
    sharding, so that FSDP2 shards them with their layer."""
    if hasattr(weight, "device_mesh"):
        raise LsrfxError(
            f"layer '{spec.name}' (weight {spec.shape_text}) is already sharded by fully_shard (a DTensor); call "
            "lsrfx.adapt before fully_shard, so that FSDP2 shards the adapters with their layers."
        )


def _check_trainable_not_adapted(layers: list[str], trainable: list[str]) -> None:
    """Refuse a layer that is both a target and trainable in full: its weight would be trained as ``W0`` under the
    adapter, never saved with the adapters, and no longer match the base model it is fingerprinted against."""
    both = [name for name in layers if f"{name}.weight" in trainable]
    if both:
        name = both[0]
        raise LsrfxError(
            f"layer '{name}' is both a target (its weight W0 stays frozen and gets an adapter) and in `trainable` "
            f"(its weight trained in full); choose one: leave '{name}' out of targets to train it in full, or out "
            f"of trainable to adapt it (its bias may stay trainable: trainable=['{name}.bias'])."
            + (f" Also both: {both[1:6]}." if len(both) > 1 else "")
        )


def _check_finite(spec: LayerSpec, weight: torch.Tensor) -> None:
    """Refuse a base weight holding NaN/inf: the adapter would train on garbage and hide where it came from."""
    if weight.is_meta or not weight.is_floating_point():
        return
    with torch.no_grad():
        bad = ~torch.isfinite(weight)
        n_bad = int(bad.sum())
    if n_bad:
        n_nan = int(torch.isnan(weight).sum())
        raise LsrfxError(
            f"layer '{spec.name}' (weight {spec.shape_text}, {weight.dtype}) has {n_bad} non-finite base weight "
            f"entries ({n_nan} NaN, {n_bad - n_nan} inf); lsrfx will not adapt it. Check the checkpoint or the "
            f"dtype conversion that produced it (fp16 overflows above 65504), or leave this layer out of `targets`."
        )


def merge(model: ModelT) -> ModelT:
    """Fold every adapter into its weight (``W0 + dW``, exact) and remove all lsrfx objects; returns ``model``.

    The result is a plain model with the same outputs as the adapted one; parameters that ``adapt`` froze are
    trainable again. Works on plain and compiled models, in place. A quantized (torchao) base is folded into its
    dequantised weight: those layers become float layers holding ``dequantize(W0) + dW`` (exact, not re-quantised;
    :mod:`lsrfx.quantized_base` says why and what re-quantising would cost).
    """
    root = unwrap(model)
    layers = list(adapted_layers(root))
    _check_merged_finite(layers)
    ties = tied_base_weights(root)
    for _, module, _ in layers:
        adapted_layer.dequantize_base(module)
    untied = {name: module.weight.detach().clone() for name, module, _ in layers if name in ties}
    remove_adapters(model, fold=True, keep_original=set(untied))
    modules = dict(root.named_modules())
    for name, merged in untied.items():
        modules[name].weight = nn.Parameter(merged, requires_grad=modules[name].weight.requires_grad)
    if untied:
        _untie_in_config(root)
        log.warning("lsrfx.merge: %s", "; ".join(
            f"'{name}' shared its weight with {', '.join(repr(o) for o in ties[name])}; merging gave '{name}' its "
            f"own W0 + dW and left the others at W0 (as the adapted model computed)" for name in untied)
            + " (config.tie_word_embeddings set to False, so save_pretrained keeps both).")
    return model


def tied_base_weights(root: nn.Module) -> dict[str, list[str]]:
    """Adapted layers whose frozen ``W0`` is also another module's parameter (tied embeddings: ``lm_head`` and
    ``embed_tokens``), by layer name, with the other parameters' names. The adapted model computes ``W0 + dW`` only
    in the adapted layer; merging must not write ``W0 + dW`` into the shared tensor."""
    owners: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    ties = {}
    for name, module, _ in adapted_layers(root):
        own = f"{name}.{ORIGINAL_KEY}"
        others = [n for n in owners.get(id(base_weight(module)), []) if n != own]
        if others:
            ties[name] = others
    return ties


def _untie_in_config(root: nn.Module) -> None:
    """Record in a ``transformers`` config that input and output embeddings are no longer tied (else
    ``save_pretrained`` / ``from_pretrained`` would tie them again and drop the merged head)."""
    config = getattr(root, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


def remove_adapters(model: nn.Module, *, fold: bool, keep_original: set[str] = frozenset()) -> None:
    """Remove every lsrfx object from ``model``: parametrizations (``fold``: keep ``W0 + dW``, else restore
    ``W0``; layers in ``keep_original`` always get ``W0`` back), the input recorder and the state; parameters
    ``adapt`` froze become trainable again."""
    root = unwrap(model)
    state = adapt_state(root)
    for name, module, _ in list(adapted_layers(root)):
        adapted_layer.remove(module, fold=fold and name not in keep_original)
        state_dict_hooks.remove_hooks(module)
    stop_recording(model)
    serving.remove_hooks(model)
    serving.forget(root)
    if state is not None:
        params = dict(root.named_parameters())
        for n in state.frozen:
            if n in params:
                params[n].requires_grad_(True)
        delattr(root, STATE_ATTR)


def _check_merged_finite(layers: list[tuple[str, nn.Module, AdaptedWeight]]) -> None:
    """Refuse to fold a non-finite ``W0 + dW`` into a plain model (before anything changes), naming the layers."""
    bad = []
    with torch.no_grad():
        for name, module, _ in layers:
            merged = module.weight
            if merged.is_meta or bool(torch.isfinite(merged).all()):
                continue
            w0 = quantized_base.dense(base_weight(module))
            source = "the base weight" if not bool(torch.isfinite(w0).all()) else "the adapter update"
            bad.append(f"'{name}' ({int((~torch.isfinite(merged)).sum())} entries, from {source})")
    if bad:
        raise LsrfxError(
            f"merge refused: W0 + dW is not finite in layer(s) {', '.join(bad)}; the model is unchanged. "
            "The adapter diverged (lower the learning rate or scale, check the loss for NaN) or, for fp16/bf16 "
            "weights, dW overflows the weight dtype; reload the last good adapters before merging."
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(adapter parameters, base parameters)``: shared adapter tensors counted once."""
    root = unwrap(model)
    adapter = {id(p): p.numel() for p in adapter_parameters(root).values()}
    base = sum(p.numel() for p in {id(p): p for p in root.parameters()}.values() if id(p) not in adapter)
    return sum(adapter.values()), base


def summary(model: nn.Module) -> str:
    """A table of the adapted layers (method, weight shape and any quantization of W0, rank, trainable adapter
    parameters, dW's effective rank) and the total as a share of the base model. Shared parameters (CondLoRA) are
    counted at the first layer that uses them. "dW eff. rank" is the effective rank of the layer's current update:
    exp of the entropy of dW's normalised singular values (:func:`lsrfx.diagnostics.effective_rank`); at most the
    adapter's rank, 0.0 while dW = 0 (right after ``adapt``), "-" on the ``meta`` device, "nan" if dW is not
    finite."""
    root = unwrap(model)
    state = adapt_state(root)
    if state is None:
        return "lsrfx: this model has no adapters."
    seen: set[int] = set()
    rows = []
    eff_ranks = delta_effective_ranks(root)
    for name, module, param in adapted_layers(root):
        spec = layer_spec(name, module)
        new = [p for p in param.adapter.parameters() if id(p) not in seen]
        seen.update(id(p) for p in new)
        shared = "" if len(new) == len(list(param.adapter.parameters())) else " (shared)"
        eff = eff_ranks[name]
        eff_text = f"{eff:.1f}" if not math.isnan(eff) else "-" if spec.device.type == "meta" else "nan"
        quantized = quantized_base.scheme(base_weight(module))
        weight = spec.shape_text + (f" ({quantized})" if quantized else "")  # e.g. "384 x 384 (Int8Tensor)"
        rows.append((name, state.config.method, weight, str(param.adapter.rank),
                     f"{sum(p.numel() for p in new):,}{shared}", eff_text))
    n_adapter, n_base = count_parameters(root)
    n_trainable_base = sum(p.numel() for n, p in root.named_parameters() if n in state.trainable)
    header = ("layer", "method", "weight", "rank", "adapter params", "dW eff. rank")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header).rstrip(), line.format(*("-" * w for w in widths))]
    out += [line.format(*r).rstrip() for r in rows]
    out.append(
        f"{len(rows)} layers adapted with {state.config.method}: {n_adapter:,} adapter parameters = "
        f"{100 * n_adapter / max(n_base, 1):.3f}% of the base model's {n_base:,}"
        + (f"; plus {n_trainable_base:,} trainable base parameters ({', '.join(state.trainable)})"
           if state.trainable else "")
    )
    return "\n".join(out)
