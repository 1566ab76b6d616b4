"""Serving adapters (issues #24 and #28): hot-swap on any model, named sets with a set per batch row, and swaps that
never tear a forward running in another thread.

References are computed independently: a fresh base model loading one set (the result a swap must equal), or the
served model itself run on one set at a time before any concurrency (the outputs a concurrent call must equal
exactly: the same code path on the same values is bit-for-bit deterministic).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import lsrfx
from lsrfx.serving import serving_of

from conftest import TINY_OPTIONS, tiny_bert, tiny_llama

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama(**overrides)


def bert(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert(**overrides)


def save_set(path: Path, build, method: str, seed: int, targets, trainable=(), **options) -> Path:
    model = lsrfx.adapt(build(), method=method, targets=targets, trainable=trainable,
                        **{**TINY_OPTIONS[method], **options})
    perturb(model, seed)
    lsrfx.save_adapters(model, path)
    return path


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


IDS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(5))


# --- #24: hot-swap on any model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_hot_swap_on_a_12_layer_llama_with_all_seven_projections(tmp_path, compiled: bool) -> None:
    """Module order is not alphabetical here (MLP targets, more than 10 layers): the layer sets compare as sets."""
    build = lambda: llama(num_hidden_layers=12)  # noqa: E731
    # Dynamo's capture (backend "eager") is what a swap must not invalidate; Inductor only lowers the same graph.
    mode = (lambda m: torch.compile(m, backend="eager")) if compiled else (lambda m: m)  # noqa: E731
    sets = [save_set(tmp_path / n, build, "lora", seed, ALL_SEVEN) for n, seed in (("a", 1), ("b", 2))]
    served = mode(lsrfx.load_adapters(build(), sets[0]))
    fresh = [logits(served, IDS), logits(mode(lsrfx.load_adapters(build(), sets[1])), IDS)]  # each loaded once
    graphs = counters["stats"]["unique_graphs"]
    for i in (1, 0, 1):  # three swaps
        lsrfx.load_adapters(served, sets[i])
        assert (logits(served, IDS) - fresh[i]).abs().max() <= 1e-6
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation


def test_a_swap_resets_what_the_previous_set_trained_and_the_new_one_does_not(tmp_path) -> None:
    a = save_set(tmp_path / "a", bert, "lora", 1, ["query", "value"], trainable=["classifier", "pooler"])
    b = save_set(tmp_path / "b", bert, "lora", 2, ["query", "value"], trainable=["classifier"])
    want_b = logits(lsrfx.load_adapters(bert(), b), IDS)
    served = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], trainable=["classifier", "pooler"],
                         **TINY_OPTIONS["lora"])
    lsrfx.load_adapters(served, a)
    lsrfx.load_adapters(served, b)  # b did not train the pooler: it goes back to the base's
    assert torch.equal(logits(served, IDS), want_b)


def test_a_set_of_other_layers_names_the_real_difference(tmp_path) -> None:
    q = save_set(tmp_path / "q", llama, "lora", 1, ["q_proj"])
    served = lsrfx.adapt(llama(), method="lora", targets=["q_proj", "v_proj"], **TINY_OPTIONS["lora"])
    with pytest.raises(lsrfx.LsrfxError, match=r"0 saved layer\(s\) not adapted in the model .* 2 adapted layer\(s\) "
                                               r"not in the files \(e\.g\. \['model\.layers\.0\.self_attn\.v_proj'"):
        lsrfx.load_adapters(served, q)


# --- #24: several adapters in one batch -------------------------------------------------------------------------


def three_sets(tmp_path: Path) -> tuple[list[Path], dict]:
    """A LoRA, an LSR-Adapt and a GenLoRA set on the same Llama layers, and each one's logits loaded alone."""
    targets = ["q_proj", "v_proj", "down_proj"]
    paths = [save_set(tmp_path / m, llama, m, i, targets) for i, m in enumerate(["lora", "lsr", "genlora"], 1)]
    ids = torch.randint(3, 100, (8, 6), generator=torch.Generator().manual_seed(9))
    alone = {p.name: logits(lsrfx.load_adapters(llama(), p), ids) for p in paths}
    alone[None] = logits(llama(), ids)
    return paths, {"ids": ids, **alone}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_mixed_batch_equals_each_set_alone(tmp_path, compiled: bool) -> None:
    paths, want = three_sets(tmp_path)
    served = lsrfx.adapt(llama(), method="lora", targets=["q_proj", "v_proj", "down_proj"], **TINY_OPTIONS["lora"])
    for p in paths:
        lsrfx.load_adapters(served, p, name=p.name)
    assert lsrfx.loaded_adapters(served) == ["default", "lora", "lsr", "genlora"]
    served = torch.compile(served) if compiled else served
    ids = want["ids"]
    names = ["lora", "lsr", "genlora", None, "genlora", "lora", "__base__", "lsr"]
    for assignment in (names, names[::-1], names[3:] + names[:3]):  # changing the assignment recompiles nothing
        mixed = logits(served, ids, adapter_names=assignment)
        for row, name in enumerate(assignment):
            ref = want[None if name == "__base__" else name]
            assert (mixed[row] - ref[row]).abs().max() <= 1e-5, (row, name)
        if assignment is names:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(lsrfx.LsrfxError, match=r"adapter set 'nope' is not loaded .* loaded: \['default', 'lora', "
                                               r"'lsr', 'genlora'\]"):
        logits(served, ids, adapter_names=["nope"] * 8)


def test_generate_takes_adapter_names_per_row(tmp_path) -> None:
    paths, _ = three_sets(tmp_path)
    served = lsrfx.adapt(llama(), method="lora", targets=["q_proj", "v_proj", "down_proj"], **TINY_OPTIONS["lora"])
    for p in paths:
        lsrfx.load_adapters(served, p, name=p.name)
    prompt = IDS[:2]
    with torch.no_grad():
        mixed = served.generate(prompt, adapter_names=["lsr", "genlora"], max_new_tokens=6, do_sample=False)
        for row, name in enumerate(["lsr", "genlora"]):
            alone = lsrfx.load_adapters(llama(), tmp_path / name).generate(prompt[row:row + 1], max_new_tokens=6,
                                                                           do_sample=False)
            assert mixed[row].tolist() == alone[0].tolist()


def test_named_sets_refuse_what_they_cannot_serve(tmp_path) -> None:
    served = lsrfx.adapt(bert(), method="lora", targets=["query"], **TINY_OPTIONS["lora"])
    value = save_set(tmp_path / "v", bert, "lora", 1, ["value"])
    with pytest.raises(lsrfx.LsrfxError, match=r"adapter set 'v' adapts layer\(s\) this model does not"):
        lsrfx.load_adapters(served, value, name="v")
    head = save_set(tmp_path / "h", bert, "lora", 1, ["query"], trainable=["classifier"])
    with pytest.raises(lsrfx.LsrfxError, match="carries trained base parameters"):
        lsrfx.load_adapters(served, head, name="h")
    assert lsrfx.loaded_adapters(served) == ["default"]
    with pytest.raises(lsrfx.LsrfxError, match="one adapter set name .* per batch row"):
        logits(served, IDS, adapter_names="default")
    with pytest.raises(lsrfx.LsrfxError, match=r"names 3 rows but .* batch 2"):
        logits(served, IDS, adapter_names=["default"] * 3)


# --- #28: swaps never tear a forward ----------------------------------------------------------------------------


def hammer(served: nn.Module, ids: torch.Tensor, stop: threading.Event, seen: list, errors: list,
           **kwargs) -> None:
    """Call ``served`` in a loop until ``stop``, collecting every output (and any error)."""
    try:
        while not stop.is_set():
            seen.append(logits(served, ids, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - asserted by the test
        errors.append(exc)


@pytest.mark.parametrize(("method", "backend"), [("lora", None), ("lsr", None), ("condlora", None),
                                                 ("genlora", None), ("lora", "inductor"), ("lsr", "aot_eager"),
                                                 ("condlora", "aot_eager"), ("genlora", "aot_eager")])
def test_no_forward_mixes_two_sets_during_200_swaps(tmp_path, method: str, backend: str | None) -> None:
    sets = [save_set(tmp_path / n, bert, method, seed, ["query", "value"]) for n, seed in (("a", 1), ("b", 2))]
    served = lsrfx.load_adapters(bert(), sets[0])
    model = torch.compile(served, backend=backend) if backend else served
    want = []
    for s in sets:  # each set's output through the very code path the reader takes
        lsrfx.load_adapters(model, s)
        want.append(logits(model, IDS))
    assert not torch.equal(*want)
    stop, seen, errors = threading.Event(), [], []
    reader = threading.Thread(target=hammer, args=(model, IDS, stop, seen, errors))
    reader.start()
    try:
        for i in range(200):
            lsrfx.load_adapters(model, sets[(i + 1) % 2])
            if i == 100:  # a swap that fails validation changes nothing while the reader goes on
                with pytest.raises(lsrfx.LsrfxError):
                    lsrfx.load_adapters(model, tmp_path / "missing")
    finally:
        stop.set()
        reader.join()
    assert not errors and len(seen) > 0
    torn = [out for out in seen if not any(torch.equal(out, w) for w in want)]
    assert not torn, f"{len(torn)} of {len(seen)} outputs match neither set"


def test_threads_serving_different_named_sets_at_once(tmp_path) -> None:
    paths, want = three_sets(tmp_path)
    served = lsrfx.adapt(llama(), method="lora", targets=["q_proj", "v_proj", "down_proj"], **TINY_OPTIONS["lora"])
    for p in paths[:2]:
        lsrfx.load_adapters(served, p, name=p.name)
    ids = want["ids"]
    stop, errors = threading.Event(), []
    seen = {name: [] for name in ("lora", "lsr")}
    readers = [threading.Thread(target=hammer, args=(served, ids, stop, seen[n], errors),
                                kwargs={"adapter_names": [n] * 8}) for n in seen]
    for t in readers:
        t.start()
    try:
        for _ in range(10):  # loading and removing another set while both threads serve
            lsrfx.load_adapters(served, paths[2], name="genlora")
            lsrfx.delete_adapters(served, "genlora")
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors
    for name, outputs in seen.items():
        assert outputs and all((out - want[name]).abs().max() <= 1e-5 for out in outputs), name


def test_a_swap_waits_for_a_use_adapters_block_with_a_bounded_wait(tmp_path) -> None:
    a = save_set(tmp_path / "a", bert, "lora", 1, ["query", "value"])
    served = lsrfx.load_adapters(bert(), a)
    before = logits(served, IDS)
    entered, release = threading.Event(), threading.Event()

    def generation() -> None:
        with lsrfx.use_adapters(served, ["default", "default"]):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=generation)
    t.start()
    entered.wait(10)
    try:
        with pytest.raises(lsrfx.LsrfxError, match=r"waited 0.2 s for 1 running forward.* nothing was changed"):
            with serving_of(served).lock.writing("load adapters", timeout=0.2):
                pass
    finally:
        release.set()
        t.join()
    assert torch.equal(logits(served, IDS), before)


def test_changing_adapters_from_inside_a_forward_is_an_error_not_a_deadlock(tmp_path) -> None:
    a = save_set(tmp_path / "a", bert, "lora", 1, ["query", "value"])
    served = lsrfx.load_adapters(bert(), a)

    def swap_inside(module, args, output):
        lsrfx.load_adapters(served, a)

    handle = served.bert.encoder.register_forward_hook(swap_inside)
    with pytest.raises(lsrfx.LsrfxError, match="from inside a forward of the same model"):
        logits(served, IDS)
    handle.remove()
    logits(served, IDS)  # the lock was released by the failed call


def test_the_serving_guide_example_runs_and_answers_from_whole_sets() -> None:
    import re

    page = Path(__file__).parents[1] / "docs" / "guides" / "serving.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 1
    ns: dict = {"__name__": "serving_example"}
    exec(compile(blocks[0], str(page), "exec"), ns)
    assert lsrfx.loaded_adapters(ns["model"]) == ["default", "legal", "medical"]

    def alone(directory: str, prompt: torch.Tensor) -> list[int]:
        with torch.no_grad():
            return lsrfx.load_adapters(ns["base"](), directory).generate(prompt, max_new_tokens=8,
                                                                          do_sample=False)[0].tolist()

    sources = {"default": [ns["support"]], "legal": [ns["legal"], ns["legal_v2"]], "medical": [ns["medical"]]}
    asked = ns["requests"] + [(prompt, "medical") for prompt, _ in ns["requests"][:4]]
    for (prompt, name), got in zip(asked, ns["answers"], strict=True):
        assert got[0].tolist() in [alone(d, prompt) for d in sources[name]], name


def test_rows_of_one_model_do_not_reach_another_model_called_meanwhile(tmp_path) -> None:
    a = save_set(tmp_path / "a", bert, "lora", 1, ["query", "value"])
    served = lsrfx.load_adapters(bert(), a)
    lsrfx.load_adapters(served, a, name="a")
    other = lsrfx.load_adapters(bert(), a)  # another adapted model, no named sets
    want = logits(other, IDS)
    with lsrfx.use_adapters(served, [None, "a"]):
        assert torch.equal(logits(other, IDS), want)
