"""Running an exported file in onnxruntime and comparing it with PyTorch, with a documented tolerance.

Tolerance: an output matches when ``max |ort - torch| <= atol * max(1, max |torch|)``, with ``atol`` 1e-4 for
float32/float64 outputs (the merged weights differ from ``W0 + dW`` computed on the fly by float rounding only),
1e-2 for float16 and 5e-2 for bfloat16. Integer and boolean outputs must be equal.

Precision: onnxruntime's CPU provider has no bfloat16 kernels for most operators (``Add``, ``MatMul``, ...), so a
bfloat16 model cannot be verified where only the CPU provider exists; :func:`check_runnable` says so before any
export work, naming the provider, the dtype and ``verify=False``. Any other onnxruntime failure to load or run the
file is reported the same way (:func:`session`, :func:`run`), never as a raw onnxruntime exception.

Padding: with an ``attention_mask`` input, outputs whose first two axes are the mask's (batch, sequence) are
compared only where the mask is 1 (:func:`max_difference`'s ``mask``). A padded position's output is computed from
a fully masked attention row, whose result is arbitrary (PyTorch's and onnxruntime's attention kernels differ
there, and neither value means anything); the real positions must still agree to the tolerance.

Output names: :func:`output_names` names the graph's outputs after the model's output fields (``logits``,
``hidden_states_0``, ...), so that an exported classifier's output is ``logits``, not an internal node name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from lsrfx.errors import LsrfxError
from lsrfx.utils import first_line

ATOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# Dtypes onnxruntime's CPU provider cannot run (no kernels for Add, MatMul, LayerNormalization, ...).
CPU_UNSUPPORTED = (torch.bfloat16,)


def providers() -> list[str]:
    """onnxruntime execution providers: CUDA when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def check_runnable(dtypes: set[torch.dtype]) -> None:
    """Raise :class:`LsrfxError` when a model of these floating dtypes cannot be verified with the providers here
    (bfloat16 without CUDA), before any export work is spent on it."""
    available = providers()
    if "CUDAExecutionProvider" in available:
        return
    bad = [str(d).removeprefix("torch.") for d in CPU_UNSUPPORTED if d in dtypes]
    if bad:
        raise LsrfxError(
            f"cannot verify a {'/'.join(bad)} export here: onnxruntime's {', '.join(available)} has no {bad[0]} "
            "kernels for operators such as Add and MatMul (only the CUDA provider has). Pass verify=False to write "
            "the file unverified and run it where onnxruntime has CUDA, or export a float32 copy to verify it on "
            "this machine: merge_and_export(copy.deepcopy(model).float(), path)."
        )


def _ort_failure(what: str, exc: Exception) -> LsrfxError:
    return LsrfxError(f"onnxruntime ({', '.join(providers())}) cannot {what}: {first_line(exc)}; pass verify=False "
                      "to write the file without this check.")


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers())
    except Exception as exc:
        raise _ort_failure("load the exported graph", exc) from exc


def to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def run(sess, inputs: list[Tensor]) -> list[np.ndarray]:
    """Run ``sess`` on the flattened tensor inputs (the graph's inputs, in order)."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise LsrfxError(
            f"the exported graph takes {len(names)} inputs {names} but the example inputs hold {len(inputs)} "
            "tensors; pass example_inputs with exactly the tensors forward should take."
        )
    feed = {n: to_numpy(t) for n, t in zip(names, inputs, strict=True)}
    try:
        return sess.run(None, feed)
    except Exception as exc:
        raise _ort_failure("run the exported graph", exc) from exc


def torch_outputs(outputs) -> list[Tensor]:
    """A model's outputs (tensor, tuple, dict or ``ModelOutput``) as the flat tensor list the graph returns."""
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]


def output_names(outputs) -> list[str]:
    """One name per tensor of :func:`torch_outputs`, from its place in the output structure: a ``ModelOutput`` or
    dict field's key (``logits``; ``hidden_states_0`` for a tuple field), ``output`` for a lone tensor,
    ``output_0``, ``output_1``, ... for a tuple. Names are made unique."""
    names: list[str] = []
    for path, leaf in pytree.tree_flatten_with_path(outputs)[0]:
        if not isinstance(leaf, Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        if not parts or isinstance(path[0], pytree.SequenceKey):
            parts.insert(0, "output")
        name = base = "_".join(parts)
        n = 1
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def max_difference(got: Sequence[np.ndarray], want: Sequence[Tensor], what: str,
                   mask: Tensor | None = None) -> float:
    """The largest ``|got - want|`` over all outputs; raises :class:`LsrfxError` when any output exceeds the
    tolerance (see the module docstring) or shapes disagree. With ``mask`` (batch, sequence), an output whose first
    two axes have that shape is compared only where ``mask`` is nonzero (padding, see the module docstring)."""
    if len(got) != len(want):
        raise LsrfxError(f"{what}: onnxruntime returned {len(got)} outputs, PyTorch {len(want)}.")
    keep = None if mask is None else to_numpy(mask) != 0
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ref = to_numpy(w)
        if g.shape != ref.shape:
            raise LsrfxError(f"{what}: output {i} has shape {g.shape} in onnxruntime, {ref.shape} in PyTorch.")
        where = ""
        if keep is not None and ref.ndim >= 2 and ref.shape[:2] == keep.shape and not keep.all():
            g, ref = g[keep], ref[keep]
            where = " at the positions where attention_mask is 1"
        if not w.is_floating_point():
            if not np.array_equal(g, ref):
                raise LsrfxError(f"{what}: integer output {i} differs between onnxruntime and PyTorch.")
            continue
        diff = float(np.abs(g.astype(np.float64) - ref.astype(np.float64)).max()) if g.size else 0.0
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        limit = ATOL.get(w.dtype, 1e-4) * scale
        if not diff <= limit:  # also catches NaN
            raise LsrfxError(
                f"{what}: output {i} (shape {tuple(w.shape)}, {w.dtype}) differs by max abs {diff:.3g}{where} between "
                f"onnxruntime and PyTorch, above the tolerance {limit:.3g}; the file was not written."
            )
        worst = max(worst, diff)
    return worst
