"""Adapters over a quantized frozen base (QLoRA-style): torchao int8 / int4 weight-only tensors as ``W0``.

A torchao-quantized ``nn.Linear`` keeps its weight as a tensor subclass (``torchao.quantization.Int8Tensor``, ...)
whose ``F.linear`` runs torchao's kernel and whose ``dequantize()`` gives the float weight. lsrfx keeps that tensor
as the frozen ``W0`` (the base stays quantized in memory; the adapter factors are fp32 master weights) and changes
how an adapted layer computes, not what it stores:

* **forward** (:mod:`lsrfx.adapted_layer`): ``F.linear(x, W0_q, bias) + scale * (x @ A.T) @ B.T``. torchao's
  kernel computes the base matmul and the low-rank term is added beside it; lsrfx never forms ``W0 + dW``. In eager
  mode the base's input gradient is formed from the quantized weight in the backward (torchao's own ``F.linear``
  keeps a dequantised copy of the weight alive for it); CondLoRA's factors are functions of ``W0``, so it reads the
  dequantised weight to form them, on the spot. The compile pass has no ``compose`` node to fuse there (its fused
  kernels read a dense ``W0``); ``lsrfx.explain`` lists these layers and says so.
* **``module.weight``** (what ``state_dict``'s merged ``weight`` and ``merge`` read): ``dequantize(W0) + dW``.
* **merge / export** (:func:`lsrfx.adapted_layer.dequantize_base`): the adapted layers are folded into the *dequantised* weight and the
  merged model is a float model in the base's float dtype (exact: ``W0_deq + dW``, the weights the adapted model
  computed with). lsrfx does not re-quantise, because re-quantising adds an error of up to half a quantisation
  step per weight (int8 per-row symmetric: ``max|row| / 254``) on top of the adapter; a user who serves int8 calls
  ``quantize_`` on the merged model again. ONNX has no torchao kernels, so ``merge_and_export`` also dequantises
  quantized layers that carry no adapter, in its private copy.

Schemes lsrfx knows (:data:`SCHEMES`) are the torchao weight tensors whose ``F.linear`` and ``dequantize`` it
relies on; any other torchao tensor subclass is refused by ``adapt`` with the layer and the scheme named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from lsrfx.errors import LsrfxError

if TYPE_CHECKING:
    from lsrfx.adapters.base import LayerSpec

# torchao weight tensor classes lsrfx adapts over, with the config that produces each (torchao >= 0.14 names).
SCHEMES: dict[str, str] = {
    "Int8Tensor": "int8 weight-only (Int8WeightOnlyConfig; dynamic int8 activations are refused: no gradient)",
    "Int4Tensor": "int4 weight-only (Int4WeightOnlyConfig, plain packing)",
    "Int4TilePackedTo4dTensor": "int4 weight-only (Int4WeightOnlyConfig, tile_packed_to_4d packing)",
    "Int4PreshuffledTensor": "int4 weight-only (Int4WeightOnlyConfig, preshuffled packing)",
    "Int4PlainInt32Tensor": "int4 weight-only (Int4WeightOnlyConfig, plain_int32 packing)",
}


def scheme(weight: Tensor) -> str | None:
    """The torchao tensor class of a quantized weight (e.g. ``"Int8Tensor"``), ``None`` for a plain tensor.

    Recognised by the class hierarchy (torchao's ``TorchAOBaseTensor``), so lsrfx never imports torchao itself.
    """
    for cls in type(weight).__mro__:
        if cls.__name__ == "TorchAOBaseTensor" and cls.__module__.startswith("torchao"):
            return type(weight).__name__
    return None


def is_quantized(weight: Tensor | None) -> bool:
    return weight is not None and scheme(weight) is not None


def dense(weight: Tensor) -> Tensor:
    """The float weight: ``dequantize()`` of a quantized weight, the weight itself otherwise."""
    return weight.dequantize() if is_quantized(weight) else weight


def check_quantized_base(spec: LayerSpec, weight: Tensor) -> None:
    """Refuse a quantized base lsrfx cannot adapt (unknown scheme, or a transposed ``Conv1D`` weight), naming the
    layer and the scheme; a no-op for a plain weight."""
    name = scheme(weight)
    if name is None:
        return
    if name not in SCHEMES:
        raise LsrfxError(
            f"layer '{spec.name}' (weight {spec.shape_text}) is quantized with torchao's {name}, a scheme lsrfx does "
            f"not know (it adapts over {', '.join(sorted(SCHEMES))}). Quantize with Int8WeightOnlyConfig() or "
            "Int4WeightOnlyConfig(), or leave this layer out of `targets` (or out of quantize_'s filter_fn)."
        )
    if getattr(weight, "act_quant_kwargs", None) is not None:
        raise LsrfxError(
            f"layer '{spec.name}' (weight {spec.shape_text}) is quantized with dynamic int8 activations "
            f"({name} from Int8DynamicActivationInt8WeightConfig): its input is rounded to int8 without a gradient, "
            "so nothing before it can train. Quantize the base with Int8WeightOnlyConfig() for fine-tuning (and "
            "the merged model with the dynamic-activation config for serving)."
        )
    if spec.transposed:
        raise LsrfxError(
            f"layer '{spec.name}' is a transposed (Conv1D-style) layer with a quantized weight ({name}); lsrfx adapts "
            "quantized nn.Linear layers only. Leave it out of `targets`."
        )


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor occupies; a quantized tensor counted by its inner tensors (int data, scales), not by its
    logical float size."""
    if is_quantized(t):
        return sum(tensor_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (each tensor once), quantized ones by their real
    storage. Non-persistent buffers are derived data (e.g. the adapter factors lsrfx keeps for inference) that a
    checkpoint does not hold."""
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                tensors.setdefault(id(buffer), buffer)
    return sum(tensor_bytes(t) for t in tensors.values())
