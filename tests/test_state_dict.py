"""What an adapted model's ``state_dict`` holds and what it loads (issue #9, items 1, 2 and 5).

* CondLoRA's shared conversion pair is registered once, under the first layer of its group, so no tensor sits under
  two keys (safetensors and Hugging Face refuse that), and the sharing survives ``deepcopy`` / ``.to()``.
* Each adapted layer's ``state_dict`` also carries ``weight`` = ``W0 + dW``: a plain model of the same architecture
  loads the trained weights from it (non-strict), a strict load into a plain model fails loudly, and the adapted
  model's own ``state_dict`` round-trips strictly.
* A base ``state_dict`` loads strictly into an adapted model (its ``weight`` becomes ``W0``, adapters unchanged).
* Meta-device models: ``adapt`` on ``meta``, then ``to_empty`` + a base ``state_dict`` (or ``load_state_dict(...,
  assign=True)``) gives the base model's outputs exactly, with the adapters at their method's init (LoRA's B = 0).

References are behavioural: the outputs of an unadapted model holding the expected weights.
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import lsrfx
from lsrfx.export.clone import independent_copy
from lsrfx.parametrization import adapted_layers, adapter_parameters

from conftest import TINY_OPTIONS, TOY_WIDTH, ToyNet, tiny_bert

X = torch.randn(3, 5, TOY_WIDTH, generator=torch.Generator().manual_seed(7))
ADAPTED = ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"]


def base() -> ToyNet:
    """The 'pretrained' base: the same weights each time."""
    torch.manual_seed(0)
    return ToyNet()


def adapted(method: str, model: nn.Module | None = None) -> ToyNet:
    model = base() if model is None else model
    return lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("head",), **TINY_OPTIONS[method])


def trained(method: str) -> ToyNet:
    """An adapted model whose adapters and head moved away from their init (dW != 0), as after training."""
    model = adapted(method)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


# --- item 1: CondLoRA's shared pair is registered once ---------------------------------------------------------


def pairs(model: nn.Module, name: str) -> list[nn.Module]:
    return [module.parametrizations["weight"][0].adapter.pair for n, module, _ in adapted_layers(model)
            if n.endswith(name)]


def test_condlora_pair_is_registered_under_its_first_layer_only() -> None:
    model = lsrfx.adapt(tiny_bert(num_hidden_layers=3), method="condlora", r=2, targets=["query", "value"])
    for name in ("query", "value"):
        shared = pairs(model, name)
        assert len(shared) == 3 and all(p is shared[0] for p in shared)  # still one pair per group
    listed = [n for n, _ in model.named_parameters(remove_duplicate=False) if ".pair." in n]
    assert sorted(listed) == sorted(adapter_parameters(model)) == sorted(
        f"bert.encoder.layer.0.attention.self.{g}.parametrizations.weight.0.adapter.pair.{c}"
        for g in ("query", "value") for c in ("C_A", "C_B"))
    sd = model.state_dict()
    storages = [t.untyped_storage().data_ptr() for t in sd.values()]
    assert len(set(storages)) == len(storages), "a tensor is stored under two state_dict keys"
    loaded = load_safetensors(save_safetensors(sd))  # safetensors refuses shared tensors: this raised before
    assert set(loaded) == set(sd)
    # every layer's adapter still reads the pair, and lists it as its own parameters
    layer2 = model.bert.encoder.layer[2].attention.self.query.parametrizations["weight"][0].adapter
    assert dict(layer2.named_parameters())["pair.C_A"] is shared_pair_param(model, "query", "C_A")


def shared_pair_param(model: nn.Module, group: str, name: str) -> nn.Parameter:
    return getattr(pairs(model, group)[0], name)


def test_condlora_sharing_follows_copies_and_conversions() -> None:
    model = lsrfx.adapt(tiny_bert(num_hidden_layers=3), method="condlora", r=2, targets=["query", "value"])
    for clone in (copy.deepcopy(model), independent_copy(model)):
        for name in ("query", "value"):
            copied = pairs(clone, name)
            assert all(p is copied[0] for p in copied), "the copy's layers must share the copy's pair"
            assert copied[0] is not pairs(model, name)[0], "the copy must not share the original's pair"
    model.to(torch.float64)
    assert {p.C_A.dtype for p in pairs(model, "query")} == {torch.float64}
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    # layers 1 and 2 reach the pair registered under layer 0: its gradient is the sum over the 3 layers
    assert shared_pair_param(model, "query", "C_A").grad is not None


# --- item 2: the state_dict carries the merged weight; what loads where -------------------------------------------


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_plain_model_loads_the_trained_weights_from_an_adapted_state_dict(method: str) -> None:
    model = trained(method)
    sd = model.state_dict()
    for name in ADAPTED:
        assert {f"{name}.weight", f"{name}.parametrizations.weight.original"} <= set(sd)
    plain = base()
    assert not torch.allclose(out(plain), out(model))
    result = plain.load_state_dict(sd, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(".parametrizations.weight." in k for k in result.unexpected_keys)
    torch.testing.assert_close(out(plain), out(model), rtol=1e-5, atol=1e-6)  # W0 + dW vs the low-rank path
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*parametrizations\.weight"):
        base().load_state_dict(sd)  # strict: loud, never a silent partial load


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_adapted_state_dict_round_trips_strictly(method: str) -> None:
    model = trained(method)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = adapted(method)
    assert not torch.equal(out(fresh), out(model))
    result = fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(out(fresh), out(model))
    for name, p in adapter_parameters(model).items():
        assert torch.equal(adapter_parameters(fresh)[name], p)


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_base_state_dict_loads_strictly_into_an_adapted_model(method: str) -> None:
    model = trained(method)
    adapters = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    other = ToyNet()  # another base: different weights
    result = model.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for name in ADAPTED:
        w0 = model.get_submodule(name).parametrizations["weight"].original
        assert torch.equal(w0, other.get_parameter(f"{name}.weight"))
    for name, p in adapter_parameters(model).items():
        assert torch.equal(p, adapters[name]), f"{name} changed"


def test_ambiguous_state_dict_is_refused() -> None:
    sd = trained("lora").state_dict()
    del sd["blocks.0.query.parametrizations.weight.original"]
    with pytest.raises(lsrfx.LsrfxError, match=r"layer 'blocks\.0\.query'.*base W0 or the merged"):
        adapted("lora").load_state_dict(sd)


def test_merge_leaves_a_plain_state_dict_and_copies_keep_theirs() -> None:
    model = trained("lsr")
    merged_copy = lsrfx.merge(independent_copy(model))
    assert set(merged_copy.state_dict()) == set(base().state_dict())
    assert "blocks.0.query.parametrizations.weight.original" in model.state_dict()  # the original keeps its hooks
    lsrfx.merge(model)
    assert set(model.state_dict()) == set(base().state_dict())
    assert base().load_state_dict(model.state_dict()).missing_keys == []


# --- item 5: meta-device models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_meta_model_to_empty_then_base_state_dict(method: str) -> None:
    with torch.device("meta"):
        model = ToyNet()
    adapted(method, model)
    model.to_empty(device="cpu")
    result = model.load_state_dict(base().state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(not p.is_meta for p in model.parameters())
    # every method starts at dW = 0, so the adapted model computes exactly what the base does
    assert torch.equal(out(model), out(base()))
    if method == "lora":
        for name in ADAPTED:
            b = model.get_parameter(f"{name}.parametrizations.weight.0.adapter.lora_B")
            assert torch.count_nonzero(b) == 0  # before: uninitialised memory
    fresh = adapted(method)
    for name, p in adapter_parameters(model).items():  # the method's init, not zeros everywhere
        assert p.requires_grad and p.shape == adapter_parameters(fresh)[name].shape
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_meta_model_loads_a_base_state_dict_with_assign(method: str) -> None:
    with torch.device("meta"):
        model = ToyNet()
    adapted(method, model)
    result = model.load_state_dict(base().state_dict(), assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(not p.is_meta for p in model.parameters())
    assert torch.equal(out(model), out(base()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) | {"head.weight", "head.bias"}


# --- FSDP2 (one process, world size 1): sharded weights and CondLoRA's pair ------------------------------------------

FSDP2_CHILD = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
import lsrfx
from conftest import TINY_OPTIONS, ToyNet
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))

def build(per_block):
    torch.manual_seed(0)
    model = lsrfx.adapt(ToyNet(), method="condlora", targets=["query", "value"], **TINY_OPTIONS["condlora"])
    for block in model.blocks if per_block else []:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)

model = build(per_block=False)
sd = model.state_dict()
print("merged key:", "blocks.0.query.weight" in sd)
fresh = build(per_block=False)
print("load:", fresh.load_state_dict(sd))
try:
    build(per_block=True)(torch.randn(2, 5, 32))
except lsrfx.LsrfxError as exc:
    print("per-block:", exc)
dist.destroy_process_group()
# Skip interpreter finalization, where gloo's threads can be torn down in the wrong order (SIGABRT after the work
# is done; see test_distributed.worker).
sys.stdout.flush()
os._exit(0)
"""


def test_fsdp2_sharded_state_dict_and_condlora_per_block_message() -> None:
    """Sharded DTensor weights get no merged ``weight`` key and round-trip; CondLoRA sharded per block (its pair in
    block 0's unit) is refused with an lsrfx message instead of torch's 'mixed torch.Tensor and DTensor'."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", FSDP2_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged key: False" in proc.stdout
    assert "load: <All keys matched successfully>" in proc.stdout
    assert "per-block: condlora: the conversion pair registered under 'blocks.0.query'" in proc.stdout
    assert "call fully_shard on the root only" in proc.stdout
