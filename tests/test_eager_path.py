"""The eager low-rank path (issue #27): an adapted linear layer computes ``x @ W0.T + b + s (x A^T) B^T`` from its
factors, never forming ``W0 + dW`` and never keeping a copy of an adapted weight for the backward; its outputs and
gradients equal the formed-weight path's (``linear(x, W0 + dW)``, what every earlier release computed); without
gradients the factors are formed once and reused until an adapter tensor changes.

Token counts (2 x 9 = 18) differ from every weight dimension of the tiny models, so a saved tensor of a weight's
full shape can only be a weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lsrfx
from lsrfx.adapted_layer import formed_weight_path
from lsrfx.parametrization import adapted_layers, base_weight

from conftest import TINY_OPTIONS, tiny_bert, tiny_gpt2, tiny_llama

ALL_LINEAR = ".*(proj|c_attn|c_fc|c_proj|query|key|value|dense)"


def build(arch: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}[arch](**overrides)


def inputs(arch: str) -> dict:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": torch.tensor([0, 2])} if arch == "bert" else {"input_ids": ids, "labels": ids}


def perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def assert_layer_matches_formed(model: nn.Module, x: torch.Tensor, params: list, out: torch.Tensor, grads: tuple,
                                loss=torch.sum, of_largest: float | None = None) -> None:
    """``out`` and ``grads`` (of ``loss(out)`` with respect to ``params``) equal the formed-weight path's:
    elementwise (``assert_close``'s defaults), or with ``of_largest`` within that fraction of each tensor's largest
    magnitude (a gradient summed over many tokens rounds differently in the two paths)."""
    with formed_weight_path():
        want = model(x)
        want_grads = torch.autograd.grad(loss(want), params)
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        if of_largest is None:
            torch.testing.assert_close(got, expected)
        else:
            assert (got - expected).abs().max() <= of_largest * expected.abs().max()


def loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_as_formed(model: nn.Module, batch: dict, tol: float = 1e-5) -> None:
    loss, grads = loss_and_grads(model, batch)
    with formed_weight_path():
        want_loss, want_grads = loss_and_grads(model, batch)
    assert grads.keys() == want_grads.keys() and grads
    assert (loss - want_loss).abs() <= tol * max(1.0, want_loss.abs().item())
    for name, g in grads.items():
        scale = max(1.0, want_grads[name].abs().max().item())
        assert (g - want_grads[name]).abs().max() <= tol * scale, name


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_outputs_and_gradients_equal_the_formed_weight_path(arch: str, method: str) -> None:
    """Llama (no bias, all seven projections), GPT-2 (``Conv1D``, weights stored ``(in, out)``), BERT (bias)."""
    model = lsrfx.adapt(build(arch), method=method, targets=ALL_LINEAR, trainable=["classifier"] if arch == "bert"
                        else (), **TINY_OPTIONS[method])
    perturb(model)
    model.train()
    assert_same_as_formed(model, inputs(arch))


def is_parameter(t: torch.Tensor, params: list[torch.Tensor]) -> bool:
    """Whether ``t`` is (a view of) one of ``params``: same storage for plain tensors, identity for a tensor subclass
    (torchao's quantized weights have no storage of their own)."""
    plain = (torch.Tensor, nn.Parameter)
    if any(t is p for p in params):
        return True
    if type(t) not in plain:
        return False
    ptr = t.untyped_storage().data_ptr()
    return any(type(p) in plain and p.untyped_storage().data_ptr() == ptr for p in params)


def saved_shapes(model: nn.Module, batch: dict) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd saves for the backward that are not the model's parameters."""
    params = list(model.parameters())
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_parameter(t, params):
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return shapes


def weight_shapes(model: nn.Module) -> set[tuple[int, ...]]:
    return {s for _, m, _ in adapted_layers(model) for s in (tuple(m.weight.shape), tuple(m.weight.shape[::-1]))}


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_no_copy_of_an_adapted_weight_is_kept_for_backward(method: str, base_dtype: torch.dtype) -> None:
    """A bf16 base with fp32 adapter masters too: CondLoRA reads W0 in fp32 without saving the converted copy."""
    model = lsrfx.adapt(build("llama").to(base_dtype), method=method, targets=ALL_LINEAR, **TINY_OPTIONS[method])
    perturb(model)
    model.train()
    batch = inputs("llama")
    shapes = saved_shapes(model, batch)
    assert shapes and not weight_shapes(model) & set(shapes)
    with formed_weight_path():  # the check has teeth: the formed path keeps W0 + dW of every layer
        assert weight_shapes(model) & set(saved_shapes(model, batch))


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd saves beyond the parameters (how issue #27 counts memory)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return sum(seen.values())


def test_lora_keeps_what_peft_keeps_for_backward() -> None:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = lsrfx.adapt(build("llama"), method="lora", targets=targets, r=4, alpha=8.0).train()
    peft = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets)).train()
    batch = inputs("llama")
    assert saved_bytes(ours, batch) <= saved_bytes(peft, batch)


def test_int8_base_keeps_no_dequantised_weight_for_backward() -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    base = build("llama")
    quantize_(base, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, nn.Linear) and "lm_head" not in name)
    for method in ("lora", "condlora"):
        model = lsrfx.adapt(copy.deepcopy(base), method=method, targets=ALL_LINEAR, **TINY_OPTIONS[method])
        perturb(model)
        model.train()
        batch = inputs("llama")
        assert not weight_shapes(model) & set(saved_shapes(model, batch)), method
        assert_same_as_formed(model, batch, tol=1e-4)


@pytest.mark.parametrize("method", ["lsr", "condlora", "genlora"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant: bool, method: str) -> None:
    """Checkpointed blocks recompute the layers (GenLoRA's layer also forms its factors again in the backward,
    CondLoRA's is its stacked form)."""
    model = lsrfx.adapt(build("llama"), method=method, targets=ALL_LINEAR, **TINY_OPTIONS[method])
    perturb(model)
    model.train()
    batch = inputs("llama")
    want_loss, want = loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    loss, grads = loss_and_grads(model, batch)
    assert (loss - want_loss).abs() < 1e-6
    assert all((grads[n] - g).abs().max() < 1e-6 for n, g in want.items())


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_bf16_autocast_matches_the_formed_path(method: str) -> None:
    model = lsrfx.adapt(build("llama"), method=method, targets=ALL_LINEAR, **TINY_OPTIONS[method])
    perturb(model)
    model.train()
    batch = inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch)
        with formed_weight_path():
            want_loss, want = loss_and_grads(model, batch)
    assert grads.keys() == want.keys()
    assert (loss - want_loss).abs() < 0.05 * want_loss.abs()
    for name, g in want.items():
        assert (grads[name].float() - g.float()).norm() <= 0.1 * g.float().norm() + 1e-6, name


def count_factor_calls(model: nn.Module) -> list[int]:
    counter = [0]
    for _, _, param in adapted_layers(model):
        adapter = param.adapter
        original = type(adapter).factors

        def counted(w0, _adapter=adapter, _original=original):
            counter[0] += 1
            return _original(_adapter, w0)

        adapter.factors = counted
    return counter


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_without_gradients_factors_are_formed_once_until_an_adapter_changes(method: str, tmp_path) -> None:
    model = lsrfx.adapt(build("llama"), method=method, targets=ALL_LINEAR, **TINY_OPTIONS[method])
    perturb(model)
    n_layers = len(list(adapted_layers(model)))
    calls = count_factor_calls(model)
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        first = model(ids).logits
        model(ids)
    assert calls[0] == n_layers  # the second call reused every layer's factors
    lsrfx.save_adapters(model, tmp_path / "a")

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs("llama")).loss.backward()
    opt.step()  # in-place updates bump the versions: the kept factors are stale now
    with torch.no_grad():
        stepped = model(ids).logits
        with formed_weight_path():
            assert (stepped - model(ids).logits).abs().max() < 1e-5
    assert not torch.allclose(stepped, first)

    lsrfx.load_adapters(model, tmp_path / "a")  # a hot-swap copies in place: the same
    with torch.no_grad():
        assert (model(ids).logits - first).abs().max() < 1e-6


def test_a_linear_subclass_with_its_own_forward_keeps_it() -> None:
    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * nn.functional.linear(x, self.weight, self.bias)

    model = nn.Sequential(Doubled(8, 8), nn.Linear(8, 8))
    adapted = lsrfx.adapt(copy.deepcopy(model), method="lora", r=2, targets=["0", "1"])
    perturb(adapted)
    x = torch.randn(3, 8)
    merged = lsrfx.merge(copy.deepcopy(adapted))
    assert (adapted(x) - merged(x)).abs().max() < 1e-6


class CountBaseReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products that read a given weight's storage (each is a full pass over it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.count = weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.addmm.default, aten.bmm.default) and any(
                isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [9, 70])
@pytest.mark.parametrize(("d_out", "d_in", "reads"), [(256, 256, 2), (128, 256, 3), (256, 128, 3)])
def test_condlora_shares_the_base_matmuls_pass_over_w0(d_out: int, d_in: int, reads: int, tokens: int) -> None:
    """A CondLoRA layer's factor products ride on the base matmul's pass over ``W0`` (forward ``[x; C_A; C_B] @
    W0.T``, backward ``[dY; dA; dB.T] @ W0``): a square layer reads ``W0`` once each way, as a plain frozen linear
    layer does; a non-square one once forward (``x @ A.T = (x @ W0.T) @ C_A'.T`` from the base output: its ``A =
    C_A' W0`` is never formed) and twice backward (``C_A'``'s gradient ``dA @ W0.T`` contracts the other axis).
    With few tokens per step and with many (2 x 70, more than half the layer's width: the stack copies the activations, which
    still costs less than the skinny products it replaces). The values and gradients are the formed-weight
    path's."""
    torch.manual_seed(0)
    model = lsrfx.adapt(nn.Sequential(nn.Linear(d_in, d_out)), method="condlora", targets=["0"], r=4)
    perturb(model)
    x = torch.randn(2, tokens, d_in, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    w0 = base_weight(model[0])
    with CountBaseReads(w0) as counter:
        out = model(x)
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
    assert counter.count == reads
    assert_layer_matches_formed(model, x, params, out, grads, of_largest=1e-5 if tokens > 9 else None)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_condlora_stacked_products_equal_the_formed_weight_path(arch: str, monkeypatch) -> None:
    """The stacked form on every layer of the tiny models: Llama without bias, GPT-2's ``Conv1D`` (``W0`` stored
    transposed), BERT with bias; an in-place edit of a layer's output downstream is allowed (the output is no view
    of a tensor the layer made)."""
    from lsrfx.kernels import condlora_linear

    calls = []
    stacked = condlora_linear.CondLoRALinear.apply
    monkeypatch.setattr(condlora_linear.CondLoRALinear, "apply", lambda *args: calls.append(args) or stacked(*args))
    model = lsrfx.adapt(build(arch), method="condlora", targets=ALL_LINEAR,
                        trainable=["classifier"] if arch == "bert" else (), **TINY_OPTIONS["condlora"])
    perturb(model)
    model.train()
    assert_same_as_formed(model, inputs(arch))
    layers = [m for _, m, _ in adapted_layers(model)]
    assert len(calls) >= len(layers)
    layer = layers[0]
    out = layer(torch.randn(3, layer.in_features if hasattr(layer, "in_features") else layer.weight.shape[0]))
    out.mul_(2).sum().backward()


def test_genlora_keeps_no_synthesised_factor_for_backward() -> None:
    """GenLoRA's eager layer forms ``A`` and ``B`` again in the backward from its banks' parameters instead of
    keeping them (``kernels/genlora_linear.py``): no tensor of a factor's shape is saved, and the gradients are the
    formed-weight path's."""
    torch.manual_seed(0)
    model = lsrfx.adapt(nn.Sequential(nn.Linear(40, 24)), method="genlora", targets=["0"], r=6)
    perturb(model)
    x = torch.randn(2, 9, 40, requires_grad=True)
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert shapes and not {(6, 40), (6, 24), (24, 6), (40, 6)} & set(shapes)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    grads = torch.autograd.grad(out.square().sum(), params)
    assert_layer_matches_formed(model, x, params, out, grads, lambda t: t.square().sum())


class CountFeatureMaps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the exponentials over a whole ``m x n`` RBF feature map (one per synthesis of a bank's features)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.exp.default, aten.exp_.default, aten.exp2.default, aten.exp2_.default) and args[0].dim() == 2:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("basis", ["rbf", "centred", "mixed"])
def test_genlora_backward_computes_each_banks_features_once(basis: str) -> None:
    """GenLoRA's eager backward forms ``A`` and ``B`` from the same RBF features their banks' gradients are made of:
    one feature map per bank each way (the forward's two, the backward's two), not a second one per bank; the
    gradients are the formed-weight path's."""
    torch.manual_seed(0)
    model = lsrfx.adapt(nn.Sequential(nn.Linear(40, 24)), method="genlora", targets=["0"], r=6, basis=basis)
    perturb(model)
    x = torch.randn(2, 9, 40, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    with CountFeatureMaps() as forward:
        out = model(x)
    with CountFeatureMaps() as backward:
        grads = torch.autograd.grad(out.square().sum(), params)
    assert (forward.count, backward.count) == (2, 2)
    assert_layer_matches_formed(model, x, params, out, grads, lambda t: t.square().sum())


class RecordBaseRegions(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, for each matrix product that reads a given weight's storage, the set of the weight's elements it
    reads (each argument's shape, strides and offset mapped onto the storage)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.numel, self.regions = weight.untyped_storage().data_ptr(), weight.numel(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm_.default):
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr:
                    index = torch.arange(self.numel).as_strided(a.shape, a.stride(), a.storage_offset())
                    self.regions.append(frozenset(index.flatten().tolist()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("d_out", "d_in", "blocked"), [(256, 16, False), (16, 256, True)])
def test_condlora_non_square_layer_reads_w0_once_forward_and_shares_a_pass_backward(d_out: int, d_in: int,
                                                                                   blocked: bool,
                                                                                   monkeypatch) -> None:
    """A non-square stacked CondLoRA layer's forward is one product with ``W0`` (``[x; C_B] @ W0.T``; ``x @ A.T``
    from the base output, ``A = C_A @ W0`` never formed). Its backward has two (the stacked input gradient and
    ``C_A``'s gradient ``dA @ W0.T``), contracting different axes: where ``W0.T`` is the long way round (``d_in >
    d_out``) they take it in blocks that fit in cache, each block serving both products back to back, so ``W0``
    comes from memory once; the other way they stay two whole products (blocking there costs more than it saves).
    Values and gradients are the formed-weight path's."""
    from lsrfx.kernels import condlora_linear

    monkeypatch.setattr(condlora_linear, "CACHE_BLOCK_BYTES", 64 * 16 * 4)  # blocks of 64 x 16
    torch.manual_seed(0)
    model = lsrfx.adapt(nn.Sequential(nn.Linear(d_in, d_out)), method="condlora", targets=["0"], r=4)
    perturb(model)
    x = torch.randn(2, 5, d_in, requires_grad=True)
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    w0 = base_weight(model[0])
    with RecordBaseRegions(w0) as forward:
        out = model(x)
    with RecordBaseRegions(w0) as backward:
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
    whole = frozenset(range(w0.numel()))
    assert forward.regions == [whole]
    if blocked:
        regions = backward.regions
        assert len(regions) == 2 * 4  # four blocks of 64 x 16, each read by both products in turn
        assert all(len(region) == 64 * 16 for region in regions)
        assert regions[0::2] == regions[1::2]
        assert frozenset().union(*regions) == whole
    else:
        assert backward.regions == [whole, whole]
    assert_layer_matches_formed(model, x, params, out, grads)
