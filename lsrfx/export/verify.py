"""Running an exported file in onnxruntime and comparing it with PyTorch, with a documented tolerance.

Tolerance: an output matches when ``max |ort - torch| <= atol * max(1, max |torch|)``, with ``atol`` 1e-4 for
float32/float64 outputs (the merged weights differ from ``W0 + dW`` computed on the fly by float rounding only),
1e-2 for float16 and 5e-2 for bfloat16. Integer and boolean outputs must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from lsrfx.errors import LsrfxError

ATOL = {torch.float64: 1e-4, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def providers() -> list[str]:
    """onnxruntime execution providers: CUDA when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=options, providers=providers())


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
    return sess.run(None, {n: to_numpy(t) for n, t in zip(names, inputs, strict=True)})


def torch_outputs(outputs) -> list[Tensor]:
    """A model's outputs (tensor, tuple, dict or ``ModelOutput``) as the flat tensor list the graph returns."""
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]


def max_difference(got: Sequence[np.ndarray], want: Sequence[Tensor], what: str) -> float:
    """The largest ``|got - want|`` over all outputs; raises :class:`LsrfxError` when any output exceeds the
    tolerance (see the module docstring) or shapes disagree."""
    if len(got) != len(want):
        raise LsrfxError(f"{what}: onnxruntime returned {len(got)} outputs, PyTorch {len(want)}.")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ref = to_numpy(w)
        if g.shape != ref.shape:
            raise LsrfxError(f"{what}: output {i} has shape {g.shape} in onnxruntime, {ref.shape} in PyTorch.")
        if not w.is_floating_point():
            if not np.array_equal(g, ref):
                raise LsrfxError(f"{what}: integer output {i} differs between onnxruntime and PyTorch.")
            continue
        diff = float(np.abs(g.astype(np.float64) - ref.astype(np.float64)).max()) if g.size else 0.0
        scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
        limit = ATOL.get(w.dtype, 1e-4) * scale
        if not diff <= limit:  # also catches NaN
            raise LsrfxError(
                f"{what}: output {i} (shape {tuple(ref.shape)}, {w.dtype}) differs by max abs {diff:.3g} between "
                f"onnxruntime and PyTorch, above the tolerance {limit:.3g}; the file was not written."
            )
        worst = max(worst, diff)
    return worst
