"""Adapted models under PyTorch's distributed engines: 2 CPU processes, gloo, DDP and FSDP2 (``fully_shard``).

One ``torch.multiprocessing`` spawn runs every case (process start-up dominates the cost). Each rank trains on its
half of a global batch for a few AdamW steps; the parent process trains the same model on the whole global batch and
the adapter weights must agree within fp32 tolerance (``rtol = atol = 1e-5``: the two runs only differ in the order
of the gradient sums). Communication is measured, not assumed: a DDP comm hook records every gradient bucket
(bytes and which parameters are in it), and for FSDP2 the reduce-scatter / all-gather calls are counted.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lsrfx
from lsrfx.parametrization import adapter_parameters

from conftest import TINY_OPTIONS, TOY_CLASSES, TOY_WIDTH, ToyNet

WORLD, STEPS, GLOBAL_BATCH, SEQ = 2, 3, 8, 5
CASES = [("ddp", m) for m in lsrfx.METHODS] + [("fsdp2", "lsr"), ("fsdp2", "lora"), ("fsdp2", "condlora")]


def build(method: str) -> ToyNet:
    """The shared two-block toy, adapted on its ``query`` / ``value`` layers (base weights of seed 0)."""
    torch.manual_seed(0)
    model = ToyNet()
    lsrfx.adapt(model, method=method, targets=["query", "value"], **TINY_OPTIONS[method])
    return model


def dim0_padded_numel(method: str) -> int:
    """The adapter parameters' element count with each tensor's first dimension rounded up to a multiple of WORLD,
    as FSDP2 pads the tensors it shards along dimension 0 (LSR's ``(S, ...)`` factors with an odd ``S``)."""
    params = adapter_parameters(build(method)).values()
    return sum(-(-p.shape[0] // WORLD) * WORLD * p[0].numel() for p in params)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(GLOBAL_BATCH, SEQ, TOY_WIDTH, generator=g),
            torch.randint(0, TOY_CLASSES, (GLOBAL_BATCH,), generator=g))


def train(model: nn.Module, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW on this rank's contiguous slice of each global batch; returns the local losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def count_collective(name: str, log: list[int]) -> None:
    """Wrap ``torch.distributed.<name>`` (as FSDP2 calls it) to add each call's input bytes to ``log``."""
    original = getattr(dist, name)

    def wrapped(output: torch.Tensor, input: torch.Tensor, *args, **kwargs):
        log.append(input.numel() * input.element_size())
        return original(output, input, *args, **kwargs)

    setattr(dist, name, wrapped)


def run_case(engine: str, method: str, rank: int, out: Path) -> None:
    model = build(method)
    names = {id(p): n for n, p in model.named_parameters()}
    result: dict = {"engine": engine, "method": method}
    if engine == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buckets: list[tuple[int, list[str]]] = []

        def hook(state, bucket):  # record what DDP actually sends, then send it as the default hook would
            buckets.append((bucket.buffer().numel() * bucket.buffer().element_size(),
                            [names[id(p)] for p in bucket.parameters()]))
            return allreduce_hook(state, bucket)

        wrapped = nn.parallel.DistributedDataParallel(model)
        wrapped.register_comm_hook(dist.group.WORLD, hook)
        result["losses"] = train(wrapped, rank, WORLD)
        result["bytes"] = sum(b for b, _ in buckets)
        result["bucket_params"] = sorted({n for _, ps in buckets for n in ps})
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        scattered: list[int] = []
        gathered: list[int] = []
        count_collective("reduce_scatter_single", scattered)
        count_collective("all_gather_single", gathered)
        try:
            if method != "condlora":  # CondLoRA shares one pair across blocks: shard at the root only
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            result["losses"] = train(model, rank, WORLD)
        except Exception as exc:  # report the engine's own error to the parent, which skips with it
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["bytes"] = sum(scattered)
        result["gathered_bytes"] = sum(gathered)
        result["frozen_grads"] = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        if "error" not in result:  # every rank gathers its shards, rank 0 writes
            result["adapters_dir"] = str(lsrfx.save_adapters(model, out / f"fsdp-{method}-adapters"))
    params = adapter_parameters(model)
    result["adapters"] = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params.items()
    } if "error" not in result else {}
    result["n_adapter"], result["n_base"] = lsrfx.count_parameters(model)
    if rank == 0:
        torch.save(result, out / f"{engine}-{method}.pt")


def worker(rank: int, port: int, out: str) -> None:
    """Run every case on this rank, then leave without interpreter finalization.

    A spawned child ends through ``sys.exit``, whose finalization runs C++ static destructors; about one run in 45
    (on a loaded machine) gloo's threads are torn down there in the wrong order and the rank dies with SIGABRT
    ("terminate called without an active exception", no Python frame) after all its work and
    ``destroy_process_group`` are done. ``os._exit`` after a clean teardown skips that; an error still propagates
    (the spawn wrapper reports it to the parent) because we only exit early on success.
    """
    faulthandler.enable()  # any other native crash prints the Python stack to the captured stderr
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for engine, method in CASES:
            run_case(engine, method, rank, Path(out))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    # The spawned children import this module by name: make sure they can find it.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(Path(__file__).parent))
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return {(e, m): torch.load(out / f"{e}-{m}.pt") for e, m in CASES}


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """Single-process runs on the whole global batch."""
    out = {}
    for method in lsrfx.METHODS:
        model = build(method)
        train(model)
        out[method] = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    return out


@pytest.mark.parametrize("engine, method", CASES)
def test_matches_single_process(results, reference, engine: str, method: str) -> None:
    result = results[(engine, method)]
    if "error" in result:
        pytest.skip(f"{engine} cannot train {method} on CPU/gloo here: {result['error']}")
    init = {n: p.detach() for n, p in adapter_parameters(build(method)).items()}
    assert set(result["adapters"]) == set(reference[method])
    moved = 0.0
    for name, value in result["adapters"].items():
        torch.testing.assert_close(value, reference[method][name], rtol=1e-5, atol=1e-5)
        moved = max(moved, float((value - init[name]).abs().max()))
    assert moved > 1e-3, "the adapters did not train, so the comparison proves nothing"


@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_ddp_all_reduces_only_adapter_gradients(results, method: str) -> None:
    result = results[("ddp", method)]
    adapter_names = sorted(adapter_parameters(build(method)))
    assert result["bucket_params"] == adapter_names
    # fp32 adapter gradients, every step, nothing else (shared CondLoRA tensors once).
    assert result["bytes"] == STEPS * 4 * result["n_adapter"]


def test_communication_against_lora(results) -> None:
    """Every structured method sends fewer gradient bytes per step than LoRA on this model; numbers in the report."""
    per_step = {m: results[("ddp", m)]["bytes"] // STEPS for m in lsrfx.METHODS}
    full = 4 * (results[("ddp", "lora")]["n_base"])
    lines = [f"{m}: {b:,} B/step ({b / per_step['lora']:.2f} x LoRA)" for m, b in per_step.items()]
    print("DDP gradient all-reduce per step:", "; ".join(lines), f"; full fine-tune would send {full:,} B")
    structured = [m for m in per_step if m != "lora"]
    assert {"lsr", "condlora", "genlora"} <= set(structured)
    for method in structured:
        assert per_step[method] < per_step["lora"], method
    for method in ("lsr", "lora", "condlora"):
        fsdp = results[("fsdp2", method)]
        if "error" in fsdp:
            continue
        assert fsdp["frozen_grads"] == []
        # FSDP2 reduce-scatters only gradients (each tensor padded along dimension 0 to the world size), and
        # all-gathers the sharded weights, frozen base included, every forward and again for backward.
        assert 4 * fsdp["n_adapter"] * STEPS <= fsdp["bytes"] < 4 * (dim0_padded_numel(method) + 64) * STEPS
        assert fsdp["gathered_bytes"] >= STEPS * 4 * fsdp["n_base"] // WORLD
        print(f"FSDP2 {method}: reduce-scatter {fsdp['bytes'] // STEPS:,} B/step, "
              f"all-gather {fsdp['gathered_bytes'] // STEPS:,} B/step per rank")


@pytest.mark.parametrize("method", [m for e, m in CASES if e == "fsdp2"])
def test_fsdp2_save_adapters_gathers_shards(results, method: str) -> None:
    """save_adapters under FSDP2 writes whole tensors (gathered from both ranks) that load into a plain model."""
    result = results[("fsdp2", method)]
    if "error" in result:
        pytest.skip(f"fsdp2 cannot train {method} on CPU/gloo here: {result['error']}")
    fresh = build(method)
    lsrfx.load_adapters(fresh, result["adapters_dir"])
    loaded = adapter_parameters(fresh)
    assert set(loaded) == set(result["adapters"])
    for name, value in result["adapters"].items():
        assert torch.equal(loaded[name].detach(), value)
