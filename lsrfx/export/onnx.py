"""``merge_and_export``: fold the adapters into a copy of the model and write a checked, verified ONNX file.

The caller's model is never modified (it stays adapted and trainable): the work happens on an
:func:`~lsrfx.export.clone.independent_copy`. The file is written into a temporary directory next to ``path``,
checked with ``onnx.checker``, run in onnxruntime, and only then renamed into place, so a failure leaves nothing
half-written. With ``merge=False`` the adapters stay separate in the graph (``lsrfx`` ops translated to standard
ONNX ops by :mod:`lsrfx.export.onnx_ops`). The graph's outputs are named after the model's output fields
(``logits``), see :func:`lsrfx.export.verify.output_names`.

With ``with_past=True`` a decoder-only ``transformers`` causal LM is exported with its key/value cache as one graph
in optimum's ``text-generation-with-past`` form (:mod:`lsrfx.export.decoder`), verified by greedy generation in
onnxruntime against PyTorch ``generate`` (:mod:`lsrfx.export.decode_check`), and a runtime config file is written
beside it.

Precision: a bfloat16 model cannot be verified where onnxruntime has only its CPU provider (no bfloat16 kernels);
with ``verify=True`` that is an :class:`LsrfxError` raised before exporting, naming the provider, the dtype and
``verify=False`` (:func:`lsrfx.export.verify.check_runnable`). lsrfx does not verify a float32 stand-in instead:
that would check a different file than the one written.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import secrets
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsrfx import atomic_files
from lsrfx.adapted_layer import dequantize_all
from lsrfx.api import merge as merge_adapters
from lsrfx.api import tied_base_weights
from lsrfx.errors import LsrfxError
from lsrfx.export import decode_check
from lsrfx.export import decoder as dec
from lsrfx.export import inputs as inp
from lsrfx.export import verify as ver
from lsrfx.export.adapters_io import check_finite_tensors
from lsrfx.export.clone import independent_copy
from lsrfx.parametrization import adapter_parameters
from lsrfx.utils import first_line, quiet_logger, unwrap

# Logs the exporter's registry warnings about optional torchvision ops, which lsrfx never uses.
EXPORTER_REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"
# Above this many bytes of weights the graph keeps them in a separate data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportReport:
    """What ``merge_and_export`` wrote: file, size in bytes (with any external-data file), ONNX opset, largest
    onnxruntime-vs-PyTorch difference over everything verified (``None`` with ``verify=False``), graph node count,
    whether adapters were merged, the symbolic axes of each graph input, the graph's output names, and with
    ``with_past`` the runtime config's file name; ``verification`` says what was compared."""

    path: Path
    size: int
    opset: int
    max_diff: float | None
    node_count: int
    merged: bool = True
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    data_file: str | None = None  # the external-data file beside ``path``, when the weights are kept apart
    notes: list[str] = field(default_factory=list)  # what the export changed on its copy, e.g. untied weights
    with_past: bool = False  # the graph takes and returns the key/value cache (:mod:`lsrfx.export.decoder`)
    config_file: str | None = None  # with_past: the runtime config beside ``path`` (``<stem>.json``)
    verification: str = ""  # what was compared in onnxruntime ("" with verify=False)

    def __str__(self) -> str:
        diff = ("not verified (verify=False)" if self.max_diff is None
                else f"verified in onnxruntime ({self.verification}), max abs diff vs PyTorch {self.max_diff:.2e}")
        shown = ", ".join(self.outputs[:4]) + (f", ... ({len(self.outputs)} in all)" if len(self.outputs) > 4 else "")
        data = f", weights in {self.data_file}" if self.data_file else ""
        cache = f", key/value cache (runtime config {self.config_file})" if self.with_past else ""
        notes = "".join(f"; {n}" for n in self.notes)
        return (f"{self.path}: {self.size / 1e6:.2f} MB{data}, opset {self.opset}, {self.node_count} nodes, "
                f"{'merged' if self.merged else 'adapters separate'}{cache}, outputs {shown or '-'}, {diff}{notes}")


@dataclass
class _Staged:
    """What one export staged in its work directory, before publishing."""

    proto: Any
    data_file: str | None
    max_diff: float | None
    verification: str = ""
    config_file: str | None = None


def merge_and_export(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = None,
    *,
    dynamic: bool = True,
    opset: int | None = None,
    verify: bool = True,
    merge: bool = True,
    external_data: bool | None = None,
    with_past: bool = False,
) -> ExportReport:
    """Export an adapted model (plain or ``torch.compile``d) to ONNX with its adapters merged into the weights.

    ``example_inputs``: a tensor, a tuple of positional arguments, a dict of keyword arguments or an
    ``(args, kwargs)`` pair; by default two rows of the inputs of the model's latest forward call
    (of its structure: see :mod:`lsrfx.recorder`), else a Hugging Face model's
    ``dummy_inputs`` (``labels`` and similar training-only keywords are dropped; a ``transformers`` cache is
    turned off). ``dynamic``: batch and sequence axes (dims 0 and 1 of each tensor input) stay symbolic where the
    model allows. ``opset``: the ONNX opset (default: the exporter's). ``verify``: run the file in onnxruntime on
    the example inputs (against the adapted model) and, when the graph has symbolic axes, on a second
    batch/sequence size (against the exported PyTorch model), and raise if outputs differ beyond the tolerance in
    :mod:`lsrfx.export.verify` (fp32: 1e-4 x max(1, max |output|)); nothing is written then. A bfloat16 model
    cannot be verified with onnxruntime's CPU provider: ``verify=True`` then raises before exporting (pass
    ``verify=False``, or export a float32 copy). ``merge=False`` keeps the adapter tensors separate in the graph.
    Graph outputs are named after the model's output fields (``logits``). A quantized (torchao) base is exported as
    its dequantised float weights (ONNX has no torchao kernels), adapters folded in, and verified against the
    quantized model's own outputs. An adapted layer whose base weight is tied to another module (``lm_head`` and the
    input embedding) is untied in the exported graph, as the adapted model computes it (the report's ``notes`` say
    so). ``external_data``: keep the weights in a separate file beside ``path`` (default: only above 1 GiB of
    weights); it gets a name of its own per export, so replacing an earlier export never pairs its graph with new
    weights. The caller's model is left as it was, adapted and trainable; a failure writes nothing.

    Padding: when the example inputs have an ``attention_mask``, outputs shaped (batch, sequence, ...) are compared
    only where it is 1 (padded positions attend to nothing and hold arbitrary values in both runtimes). Inputs
    recorded from ``generate`` are exported as a plain forward over the prompt (the cache and the other
    generation-state keywords are dropped, see :func:`lsrfx.export.inputs.clean`).

    ``with_past=True`` (a decoder-only ``transformers`` causal LM): one graph with inputs ``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key`` / ``.value`` and outputs ``logits``,
    ``present.{i}.key`` / ``.value``, dynamic batch, sequence and past lengths, an empty past (length 0) for the
    prompt (:mod:`lsrfx.export.decoder` has the shapes and the feeding recipe). ``example_inputs`` then only supply
    the verification prompt's tokens. ``verify`` runs greedy generation with the cache in onnxruntime (a 2-row
    prompt, one row left-padded, 16 new tokens) and compares its tokens and the logits of real positions with
    ``generate`` on the adapted model (:mod:`lsrfx.export.decode_check`). The runtime config (layers, heads,
    key/value heads, head size, hidden and vocabulary sizes, bos/eos/pad ids, input and output names) is written
    to ``<stem>.json`` beside ``path`` (``report.config_file``); an existing file of that name that lsrfx did not
    write is refused, and a later export without the cache removes the config it left.
    """
    path = Path(path)
    root = unwrap(model)
    check_finite_tensors({n: p.detach() for n, p in adapter_parameters(root).items()}, "merge_and_export")
    notes = [f"'{name}' untied from {', '.join(others)}: the graph holds W0 + dW for '{name}' and W0 for the others"
             for name, others in tied_base_weights(root).items()] if merge else []
    spec = None
    if with_past:
        if not dynamic:
            raise LsrfxError("with_past=True needs dynamic axes (the past grows by every step); drop dynamic=False.")
        spec = dec.decoder_spec(root)
    workdir = _workdir(path)
    try:
        if spec is not None:
            dec.check_config_path(path)
        if spec is None:
            staged = _single_pass(model, root, workdir / path.name, example_inputs, dynamic=dynamic, opset=opset,
                                  verify=verify, merge=merge, external_data=external_data)
        else:
            staged = _with_past(model, root, spec, workdir / path.name, example_inputs, opset=opset,
                                verify=verify, merge=merge, external_data=external_data)
        _publish(workdir, path, remove=[] if with_past else [f for f in [dec.stale_config(path)] if f])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    proto = staged.proto
    size = sum((path.parent / name).stat().st_size for name in [path.name, staged.data_file] if name)
    names = [i.name for i in proto.graph.input]
    symbols = _symbolic_axes(proto)
    return ExportReport(
        path=path, size=size, opset=_opset(proto), max_diff=staged.max_diff, node_count=len(proto.graph.node),
        merged=merge, dynamic_axes={n: sorted(s) for n, s in zip(names, symbols, strict=True) if s},
        outputs=[o.name for o in proto.graph.output], data_file=staged.data_file, notes=notes,
        with_past=with_past, config_file=staged.config_file, verification=staged.verification,
    )


def _single_pass(model: nn.Module, root: nn.Module, staged: Path, example_inputs: Any, *, dynamic: bool,
                 opset: int | None, verify: bool, merge: bool, external_data: bool | None) -> _Staged:
    """The graph of one forward call on the example inputs, without a cache; verified on those inputs and at a
    second batch/sequence size."""
    found, source = inp.find_inputs(root, example_inputs)
    inputs, constants = inp.split_constants(root, inp.clean(root, found))
    if dynamic:
        inputs = inp.widen(inputs)
    clone = independent_copy(model)
    clone.eval()
    _disable_cache(clone)
    if constants:  # bound to the private copy's forward: torch.export cannot take them through **kwargs
        clone.forward = functools.partial(clone.forward, **constants)
    outputs = _forward(clone, inputs, source)
    reference = ver.torch_outputs(outputs)
    if verify:
        ver.check_runnable({t.dtype for t in [*reference, *clone.parameters(), *clone.buffers()]
                            if t.is_floating_point()})
    if merge:
        merge_adapters(clone)
    dequantize_all(clone)  # ONNX has no torchao kernels: a quantized base exports as its float weights
    args, kwargs = inputs
    program = _export(clone, args, kwargs, dynamic_shapes=inp.shapes_spec(inputs) if dynamic else None,
                      opset=opset, merge=merge, output_names=ver.output_names(outputs))
    data_file = _save(program, staged, external_data)
    proto = _check(staged)
    if not verify:
        return _Staged(proto, data_file, None)
    symbols = _symbolic_axes(proto)
    name = type(root).__name__
    sess = ver.session(str(staged))
    max_diff = ver.max_difference(ver.run(sess, inp.tensors(inputs)), reference,
                                  f"export of {name} on the example inputs", mask=inp.attention_mask(inputs))
    checked = "on the example inputs"
    if any(symbols):
        second = inp.second_size(inputs, symbols)
        ref2 = ver.torch_outputs(_forward(clone, second, "second size"))
        got2 = ver.run(sess, inp.tensors(second))
        max_diff = max(max_diff, ver.max_difference(
            got2, ref2, f"export of {name} at a second batch/sequence size", mask=inp.attention_mask(second)))
        checked += " and at a second batch/sequence size"
    if inp.attention_mask(inputs) is not None:
        checked += ", outputs compared where attention_mask is 1"
    return _Staged(proto, data_file, max_diff, checked)


def _with_past(model: nn.Module, root: nn.Module, spec: dec.DecoderSpec, staged: Path, example_inputs: Any, *,
               opset: int | None, verify: bool, merge: bool, external_data: bool | None) -> _Staged:
    """The graph with the key/value cache (:mod:`lsrfx.export.decoder`), its runtime config beside it, verified by
    greedy generation (:mod:`lsrfx.export.decode_check`)."""
    clone = independent_copy(model)
    clone.eval()
    device = next((p.device for p in clone.parameters()), torch.device("cpu"))
    ref = None
    if verify:
        ver.check_runnable({t.dtype for t in [*clone.parameters(), *clone.buffers()] if t.is_floating_point()})
        try:
            found = inp.clean(root, inp.find_inputs(root, example_inputs)[0])
        except LsrfxError:
            if example_inputs is not None:
                raise
            found = None  # no example inputs anywhere: the prompt is random tokens
        ids, mask = decode_check.prompt(found, spec, device)
        ref = decode_check.reference(clone, spec, ids, mask)
    if merge:
        merge_adapters(clone)
    dequantize_all(clone)
    wrapper = dec.WithPast(clone, spec).eval()
    trace = dec.trace_inputs(spec, device)
    dec.check_present(spec, _forward(wrapper, (trace, {}), "with_past: 3 new tokens after 4 cached ones"))
    program = _export(wrapper, trace, {}, dynamic_shapes=dec.dynamic_shapes(spec), opset=opset, merge=merge,
                      output_names=spec.output_names(), input_names=spec.input_names(),
                      name=f"{type(root).__name__} with its key/value cache",
                      fix="This architecture's cache path is not exportable as one graph; export without with_past")
    dec.name_axes(program.model)
    data_file = _save(program, staged, external_data)
    proto = _check(staged)
    config = dec.config_path(staged)
    try:
        config.write_text(json.dumps(dec.runtime_config(spec, staged, _opset(proto)), indent=2) + "\n")
    except OSError as exc:
        raise LsrfxError(f"cannot write the runtime config {config.name} beside {staged.parent.parent}: "
                         f"{exc.strerror or exc}; nothing was written. Free space or choose another directory.") from exc
    if not verify:
        return _Staged(proto, data_file, None, config_file=config.name)
    sess = ver.session(str(staged))
    max_diff, checked = decode_check.check(sess, spec, ref, f"export of {type(root).__name__} with the cache")
    return _Staged(proto, data_file, max_diff, checked, config.name)


def _workdir(path: Path) -> Path:
    """A temporary directory beside ``path`` (``.<name>.tmp-<pid>-<token>``): proves the location is writable
    before any work is done. Leftovers of killed exports of the same file are removed first."""
    if path.is_dir():
        raise LsrfxError(f"export path {path} is a directory; give a file name such as {path / 'model.onnx'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_files.remove_stale(path.absolute())
        workdir = atomic_files.sibling_name(path, atomic_files.STAGE_TAG)
        workdir.mkdir()
        return workdir
    except OSError as exc:
        raise LsrfxError(
            f"cannot write the ONNX file to {path}: {exc.strerror or exc}; choose a writable directory."
        ) from exc


def _save(program, staged: Path, external_data: bool | None) -> str | None:
    """Write the graph to ``staged``; the weights go into a data file of a fresh name beside it when asked or when
    they are large. Returns that file's name. A full disk or another write error is an :class:`LsrfxError` naming
    the place."""
    import onnx_ir as ir

    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                  if v.const_value is not None)
    external = external_data if external_data is not None else weights > EXTERNAL_DATA_BYTES
    data_name = f"{staged.name}.{secrets.token_hex(4)}.data" if external else None
    try:
        if external:
            ir.save(program.model, staged, external_data=data_name)
        else:
            program.save(staged, external_data=False)
    except OSError as exc:
        full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
        raise LsrfxError(f"cannot write the ONNX file for {staged.name} beside {staged.parent.parent}: "
                         f"{exc.strerror or exc}{full}; nothing was written. Free space or choose another "
                         "directory.") from exc
    return data_name


def _disable_cache(model: nn.Module) -> None:
    """A ``transformers`` key/value cache is generation state, not part of a single-pass inference graph."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False


def _forward(model: nn.Module, inputs: inp.Inputs, source: str) -> Any:
    """The model's outputs on ``inputs`` as it returns them (tensor, tuple, dict or ``ModelOutput``)."""
    args, kwargs = inputs
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        raise LsrfxError(
            f"{type(model).__name__}.forward fails on the example inputs ({source}: {_describe(inputs)}): "
            f"{first_line(exc)}{_where(exc)}. Pass example_inputs= that forward accepts."
        ) from exc


def _export(model: nn.Module, args: tuple, kwargs: dict, *, dynamic_shapes: Any, opset: int | None, merge: bool,
            output_names: list[str], input_names: list[str] | None = None, name: str | None = None,
            fix: str | None = None):
    """``torch.export`` (non-strict) then the dynamo ONNX exporter, each failure named with its place and fix.
    ``output_names`` name the graph outputs when they are as many as the exported program's outputs; ``input_names``
    (optional) name its inputs; ``name`` is the model's name in messages, ``fix`` the advice on a capture failure."""
    from lsrfx.export.onnx_ops import translation_table

    name = name or type(model).__name__
    try:
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        hint = " or dynamic=False if the error is about symbolic shapes" if dynamic_shapes is not None else ""
        fix = fix or f"Pass example_inputs= that take the path you want to deploy{hint}"
        raise LsrfxError(
            f"torch.export could not capture {name}.forward with the example inputs ({_describe((args, kwargs))}): "
            f"{first_line(exc)}{_where(exc)}. {fix}."
        ) from exc
    if len(output_names) != len(exported.graph_signature.user_outputs):
        output_names = None  # an output structure lsrfx cannot name one to one: keep the exporter's names
    try:
        # Unmerged graphs skip the optimizer: its constant folding would merge the adapters anyway.
        with quiet_logger(EXPORTER_REGISTRY_LOGGER):
            return torch.onnx.export(exported, dynamo=True, opset_version=opset, optimize=merge, verbose=False,
                                     input_names=input_names, output_names=output_names,
                                     custom_translation_table=None if merge else translation_table())
    except Exception as exc:
        fix = "export with merge=True (adapters folded in)" if not merge else "check the operator in the message"
        raise LsrfxError(
            f"the ONNX exporter could not translate {name}: {first_line(exc)}{_where(exc)}; {fix}, or pass "
            "example_inputs= that avoid the failing part."
        ) from exc


def _check(file: Path):
    import onnx

    try:
        onnx.checker.check_model(str(file))
    except Exception as exc:
        raise LsrfxError(f"onnx.checker rejected the exported graph: {first_line(exc)}; nothing was written.") from exc
    return onnx.load(str(file), load_external_data=False)


def _symbolic_axes(proto) -> list[dict[int, str]]:
    """For each graph input, its symbolic axes (axis -> symbol name). The exporter may write an axis that
    ``torch.export`` specialised as a numeric ``dim_param`` (``"3"``): that one is static."""
    return [{i: d.dim_param for i, d in enumerate(v.type.tensor_type.shape.dim)
             if d.dim_param and not d.dim_param.isdigit()}
            for v in proto.graph.input]


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _publish(workdir: Path, path: Path, remove: list[Path] = ()) -> None:
    """Rename the staged files into place: the data file (its name is new, so nothing in use is replaced) and the
    runtime config first, then the graph in one rename, then the data files no graph refers to any more and the
    files in ``remove`` (a cached export's config that the new graph no longer matches). A kill at any point leaves
    the old graph with its old data or the new graph with its new data, never a mix."""
    data = [f for f in workdir.iterdir() if f.name != path.name]
    with atomic_files.locked(path.parent):
        for f in data:
            os.replace(f, path.parent / f.name)
        os.replace(workdir / path.name, path)
        _remove_unreferenced_data(path, keep={f.name for f in data})
        for f in remove:
            f.unlink(missing_ok=True)


def _remove_unreferenced_data(path: Path, keep: set[str]) -> None:
    """Delete the data files of earlier exports to ``path`` (``<name>.data``, ``<name>.<token>.data``) that the new
    graph does not use."""
    pattern = re.compile(re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data")
    for f in path.parent.iterdir():
        if pattern.fullmatch(f.name) and f.name not in keep:
            f.unlink(missing_ok=True)


def _describe(inputs: inp.Inputs) -> str:
    args, kwargs = inputs
    show = lambda v: f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)  # noqa: E731
    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


_LIBRARY_PARTS = (f"{os.sep}torch{os.sep}", f"{os.sep}onnxscript{os.sep}", f"{os.sep}onnx{os.sep}",
                  f"{os.sep}lsrfx{os.sep}export{os.sep}", f"{os.sep}lsrfx{os.sep}utils.py", f"{os.sep}contextlib.py",
                  f"{os.sep}functools.py")


def _where(exc: BaseException) -> str:
    """`` (at file:line in function)`` for the deepest frame of the model's own code in the exception chain."""
    frames = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames += traceback.extract_tb(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    user = [f for f in frames if not f.filename.startswith("<") and not any(p in f.filename for p in _LIBRARY_PARTS)]
    if not user:
        return ""
    f = user[-1]
    return f" (at {os.path.basename(f.filename)}:{f.lineno} in {f.name}: {(f.line or '').strip()[:80]})"
