"""Adapter directories and exports as a trust boundary (issue #22): a directory is data, never a description of what
to overwrite; a failed load, save, merge or export leaves the model and the files exactly as they were; saves and
multi-file exports are atomic as a whole; every failure is an :class:`LsrfxError` naming the file, field or layer.

Tampered directories get their checksum recomputed (``tamper``), as an attacker or a careless script would do, so
what is tested is the validation itself, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lsrfx
from lsrfx.api import adapt_state
from lsrfx.parametrization import adapted_layers

from conftest import TINY_OPTIONS, tiny_bert, tiny_llama

IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(3))
QUERY = "bert.encoder.layer.0.attention.self.query"


def bert(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_bert(**overrides)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: every trainable tensor gets new values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_set(path: Path, method: str = "lora", seed: int = 1, **kw) -> nn.Module:
    model = lsrfx.adapt(bert(), method=method, targets=["query", "value"], trainable=kw.pop("trainable", ()),
                        **{**TINY_OPTIONS[method], **kw})
    perturb(model, seed)
    lsrfx.save_adapters(model, path)
    return model


def tamper(directory: Path, tensors=None, config=None) -> None:
    """Rewrite an adapter directory: ``tensors(dict) -> dict`` and ``config(dict) -> dict | list`` edit the
    contents, and the recorded checksum is recomputed so that only lsrfx's validation stands in the way."""
    t = load_file(str(directory / "adapters.safetensors"))
    if tensors is not None:
        t = tensors(t)
        save_file(t, str(directory / "adapters.safetensors"))
    c = json.loads((directory / "adapter_config.json").read_text())
    c["tensors_sha256"] = hashlib.sha256((directory / "adapters.safetensors").read_bytes()).hexdigest()
    if config is not None:
        c = config(c)
    (directory / "adapter_config.json").write_text(json.dumps(c))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: every state_dict tensor, requires_grad flags, adapt state."""
    root = lsrfx.utils.unwrap(model)
    return {"state": {k: v.detach().clone() for k, v in root.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in root.named_parameters()},
            "adapted": adapt_state(root) is not None, "layers": [n for n, _, _ in adapted_layers(root)]}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["grad"] == before["grad"] and after["adapted"] == before["adapted"]
    assert after["layers"] == before["layers"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --- 1. a directory cannot overwrite base parameters ------------------------------------------------------------


def test_a_directory_cannot_overwrite_a_base_parameter_of_a_served_model(tmp_path) -> None:
    good = trained_set(tmp_path / "good")
    served = lsrfx.load_adapters(bert(), tmp_path / "good")
    evil = tmp_path / "evil"
    trained_set(evil, seed=2)
    word = "bert.embeddings.word_embeddings.weight"
    tamper(evil, tensors=lambda t: {**t, word: torch.zeros(100, 32)},
           config=lambda c: {**c, "trainable": [word]})
    before = snapshot(served)
    with pytest.raises(lsrfx.LsrfxError, match=f"trained base parameter '{word}', which this adapted model does not "
                                                "train"):
        lsrfx.load_adapters(served, evil)
    assert_unchanged(served, before)
    assert torch.equal(logits(served), logits(good))  # swapping on keeps working


def test_a_directory_cannot_name_an_adapted_layers_base_weight(tmp_path) -> None:
    trained_set(tmp_path)
    original = f"{QUERY}.parametrizations.weight.original"
    tamper(tmp_path, tensors=lambda t: {**t, original: torch.zeros(32, 32)},
           config=lambda c: {**c, "trainable": [original]})
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match="no such plain parameter .*W0"):
        lsrfx.load_adapters(base, tmp_path)
    assert_unchanged(base, before)


def test_extra_tensors_in_the_file_are_refused_by_name(tmp_path) -> None:
    trained_set(tmp_path)
    tamper(tmp_path, tensors=lambda t: {**t, "bert.pooler.dense.weight": torch.zeros(32, 32)})
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match=r"do not have: \['bert\.pooler\.dense\.weight'\]"):
        lsrfx.load_adapters(base, tmp_path)
    assert_unchanged(base, before)


# --- 2. merge of tied weights -----------------------------------------------------------------------------------


def test_merge_unties_an_adapted_tied_head_and_keeps_the_embedding(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = lsrfx.adapt(tiny_llama(tie_word_embeddings=True), method="lora", targets=["lm_head", "q_proj"], r=2)
    assert model.lm_head.parametrizations.weight.original is model.model.embed_tokens.weight
    perturb(model)
    ids = torch.randint(3, 100, (2, 6))
    embedding = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        want = model(ids).logits

    report = lsrfx.merge_and_export(model, tmp_path / "m.onnx", ids)  # a merged copy, verified in onnxruntime
    assert any("'lm_head' untied from model.embed_tokens.weight" in n for n in report.notes)

    with caplog.at_level("WARNING", logger="lsrfx"):
        lsrfx.merge(model)
    assert "'lm_head' shared its weight with 'model.embed_tokens.weight'" in caplog.text
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        assert (model(ids).logits - want).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - want).abs().max() < 1e-5


# --- 3. atomic directories --------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_bert
    import lsrfx
    from lsrfx import atomic_files
    torch.manual_seed(0)
    model = lsrfx.adapt(tiny_bert(), method="lora", targets=["query", "value"], r=4, alpha=8.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    where = {where!r}
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "before_replace":
        atomic_files.replace_directory = die
    elif where == "between_renames":
        atomic_files._exchange = lambda a, b: False
        real = os.replace
        calls = []
        def replace(a, b):
            calls.append(a)
            real(a, b)
            if len(calls) == 1:
                die()
        atomic_files.os.replace = replace
    lsrfx.save_adapters(model, {directory!r})
""")


@pytest.mark.parametrize("where", ["before_replace", "between_renames"])
def test_a_save_killed_at_any_point_keeps_the_previous_set(tmp_path, where) -> None:
    directory = tmp_path / "adapters"
    good = trained_set(directory)
    script = CHILD.format(tests=str(Path(__file__).parent), where=where, directory=str(directory))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert any(p.name.startswith(".adapters.") for p in tmp_path.iterdir())  # the killed save's leftovers
    loaded = lsrfx.load_adapters(bert(), directory)  # the previous set, whole (restored if renamed away)
    assert torch.equal(logits(loaded), logits(good))
    trained_set(directory, seed=3)  # the next save cleans up after the killed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_concurrent_savers_and_readers_see_whole_sets(tmp_path) -> None:
    directory = tmp_path / "adapters"
    sets = [lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4), None]
    perturb(sets[0], 1)
    sets[1] = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    perturb(sets[1], 2)
    want = [logits(m) for m in sets]
    lsrfx.save_adapters(sets[0], directory)
    errors: list[BaseException] = []

    def save(model: nn.Module) -> None:
        try:
            for _ in range(25):
                lsrfx.save_adapters(model, directory)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    savers = [threading.Thread(target=save, args=(m,)) for m in sets]
    for t in savers:
        t.start()
    reader = lsrfx.load_adapters(bert(), directory)
    seen = 0
    while any(t.is_alive() for t in savers):
        lsrfx.load_adapters(reader, directory)  # hot-swap from a directory being rewritten
        got = logits(reader)
        assert any(torch.equal(got, w) for w in want)
        seen += 1
    for t in savers:
        t.join()
    assert not errors and seen > 0
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "adapters"]


def test_save_refuses_a_directory_holding_other_files(tmp_path) -> None:
    model = trained_set(tmp_path / "x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(lsrfx.LsrfxError, match=r"holds files that are not adapter files \(notes\.txt\)"):
        lsrfx.save_adapters(model, tmp_path / "run")
    assert listing(tmp_path / "run") == {"notes.txt": b"mine"}


def test_an_export_with_external_data_is_replaced_as_a_whole(tmp_path, monkeypatch) -> None:
    import onnxruntime as ort

    from lsrfx.export import onnx as onnx_export

    ids = torch.randint(3, 64, (2, 5))
    first = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    report = lsrfx.merge_and_export(first, tmp_path / "model.onnx", ids, external_data=True)
    assert report.data_file and (tmp_path / report.data_file).exists()
    old = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]

    second = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    perturb(second)
    real = os.replace

    def killed_after_the_data(a, b):  # stands in for kill -9 once the new weights are in place
        if Path(b).name == "model.onnx":
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(onnx_export.os, "replace", killed_after_the_data)
    with pytest.raises(KeyboardInterrupt):
        lsrfx.merge_and_export(second, tmp_path / "model.onnx", ids, external_data=True)
    monkeypatch.undo()
    again = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(again, old)  # the old graph still runs on its own weights

    report = lsrfx.merge_and_export(second, tmp_path / "model.onnx", ids, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", report.data_file]  # orphans removed
    new = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(new, logits(second, ids).numpy(), atol=1e-4)


# --- 4. data-parallel wrappers ----------------------------------------------------------------------------------


def test_ddp_wrapped_before_adapt_is_refused(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(bert())
        with pytest.raises(lsrfx.LsrfxError, match=r"already wrapped in DistributedDataParallel.*lsrfx\.adapt on "
                                                   r"the plain model first"):
            lsrfx.adapt(ddp, method="lora")
        adapted = nn.parallel.DistributedDataParallel(lsrfx.adapt(bert(), method="lora", r=2))
        lsrfx.save_adapters(adapted, tmp_path / "a")  # wrapped after adapt: saved without a "module." prefix
        assert torch.equal(logits(lsrfx.load_adapters(bert(), tmp_path / "a")), logits(adapted.module))
    finally:
        dist.destroy_process_group()


def test_data_parallel_saves_plain_names(tmp_path) -> None:
    dp = lsrfx.adapt(nn.DataParallel(bert()), method="lora", r=2)
    perturb(dp)
    lsrfx.save_adapters(dp, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert all(not n.startswith("module.") for n in saved["layers"])
    assert torch.equal(logits(lsrfx.load_adapters(bert(), tmp_path)), logits(dp.module))


# --- 5. a target that is also trainable -------------------------------------------------------------------------


def test_a_layer_both_adapted_and_trainable_is_refused() -> None:
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match="layer 'classifier' is both a target .* and in `trainable`"):
        lsrfx.adapt(base, method="lora", targets=["query", "classifier"], trainable=["classifier"], r=2)
    assert_unchanged(base, before)
    lsrfx.adapt(base, method="lora", targets=["query", "classifier"], trainable=["classifier.bias"], r=2)


# --- 6, 8, 9. every config field validated before anything changes ---------------------------------------------

BAD_CONFIGS = {
    "a JSON list": (lambda c: [c], "holds a JSON list, not an object"),
    "r as a string": (lambda c: {**c, "options": {**c["options"], "r": "4"}}, "option r='4' must be an integer"),
    "r as a float": (lambda c: {**c, "options": {**c["options"], "r": 4.0}}, "option r=4.0 must be an integer"),
    "r null": (lambda c: {**c, "options": {**c["options"], "r": None}}, "option r=None must be an integer"),
    "alpha null": (lambda c: {**c, "options": {**c["options"], "alpha": None}}, "alpha=None must be a number"),
    "alpha NaN": (lambda c: {**c, "options": {**c["options"], "alpha": math.nan}}, "alpha=nan must be finite"),
    "alpha huge": (lambda c: {**c, "options": {**c["options"], "alpha": 1e308}}, "alpha=1e\\+308 must be <="),
    "alpha zero": (lambda c: {**c, "options": {**c["options"], "alpha": 0}}, "alpha=0 must be > 0"),
    "alpha negative": (lambda c: {**c, "options": {**c["options"], "alpha": -8}}, "alpha=-8 must be > 0"),
    "no layers": (lambda c: {k: v for k, v in c.items() if k != "layers"}, "field 'layers' is missing"),
    "no trainable": (lambda c: {k: v for k, v in c.items() if k != "trainable"}, "field 'trainable' is missing"),
    "no method": (lambda c: {k: v for k, v in c.items() if k != "method"}, "field 'method' is missing"),
    "unknown method": (lambda c: {**c, "method": "dora"}, "field 'method' is 'dora'"),
    "bad fingerprint": (lambda c: {**c, "layers": {QUERY: {"shape": "32x32"}}}, "shape' is '32x32'"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_fields_are_clear_errors_and_change_nothing(tmp_path, case) -> None:
    edit, message = BAD_CONFIGS[case]
    trained_set(tmp_path / "set")
    tamper(tmp_path / "set", config=edit)
    for model in (bert(), lsrfx.adapt(bert(), method="lora", targets=["query", "value"], **TINY_OPTIONS["lora"])):
        before = snapshot(model)
        files = listing(tmp_path / "set")
        with pytest.raises(lsrfx.LsrfxError, match=message):
            lsrfx.load_adapters(model, tmp_path / "set")
        assert_unchanged(model, before)
        assert listing(tmp_path / "set") == files


@pytest.mark.parametrize(("method", "option", "value"), [("lsr", "separation_rank", 10**9),
                                                         ("genlora", "group_size", 10**9)])
def test_options_that_would_allocate_gigabytes_are_refused_before_allocating(tmp_path, method, option, value):
    trained_set(tmp_path, method=method)
    tamper(tmp_path, config=lambda c: {**c, "options": {**c["options"], option: value}})
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match="more than 4 times the weight itself .* nothing was allocated"):
        lsrfx.load_adapters(base, tmp_path)
    assert_unchanged(base, before)
    with pytest.raises(lsrfx.LsrfxError, match="nothing was allocated"):
        lsrfx.adapt(bert(), method=method, **{**TINY_OPTIONS[method], option: value})


def test_a_config_whose_tensor_list_is_missing_loads_from_the_model_not_the_list(tmp_path) -> None:
    good = trained_set(tmp_path)  # the list is informational: what loads is derived from the model and method
    tamper(tmp_path, config=lambda c: {k: v for k, v in c.items() if k != "adapter_tensors"})
    assert torch.equal(logits(lsrfx.load_adapters(bert(), tmp_path)), logits(good))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float64])
def test_tensors_of_another_dtype_are_refused_by_name(tmp_path, dtype) -> None:
    trained_set(tmp_path)
    name = f"{QUERY}.parametrizations.weight.0.adapter.lora_A"
    tamper(tmp_path, tensors=lambda t: {**t, name: t[name].to(dtype)})
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match=f"saved tensor '{name}' is {str(dtype)[6:]}, the model's float32"):
        lsrfx.load_adapters(base, tmp_path)
    assert_unchanged(base, before)


def test_a_tensor_file_that_is_not_a_regular_file_is_never_read(tmp_path) -> None:
    trained_set(tmp_path)
    (tmp_path / "adapters.safetensors").unlink()
    (tmp_path / "adapters.safetensors").symlink_to("/dev/zero")
    with pytest.raises(lsrfx.LsrfxError, match="is not a regular file"):
        lsrfx.load_adapters(bert(), tmp_path)


def test_a_tensor_file_larger_than_the_adapters_is_never_read(tmp_path) -> None:
    trained_set(tmp_path)
    tamper(tmp_path, tensors=lambda t: {**t, "padding": torch.zeros(1 << 19)})  # 2 MB of extra data
    with pytest.raises(lsrfx.LsrfxError, match="larger than the adapters this model can hold"):
        lsrfx.load_adapters(bert(), tmp_path)


# --- 7. non-finite values ---------------------------------------------------------------------------------------


def test_non_finite_adapters_are_refused_at_load_save_and_export(tmp_path) -> None:
    trained_set(tmp_path / "set")
    name = f"{QUERY}.parametrizations.weight.0.adapter.lora_B"
    tamper(tmp_path / "set", tensors=lambda t: {**t, name: torch.full_like(t[name], math.nan)})
    base = bert()
    before = snapshot(base)
    with pytest.raises(lsrfx.LsrfxError, match=f"tensor '{name}' of layer '{QUERY}' holds 128 non-finite"):
        lsrfx.load_adapters(base, tmp_path / "set")
    assert_unchanged(base, before)

    model = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = math.inf
    with pytest.raises(lsrfx.LsrfxError, match=f"save_adapters refused: tensor '{name}' of layer '{QUERY}'"):
        lsrfx.save_adapters(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    for merge in (True, False):
        with pytest.raises(lsrfx.LsrfxError, match=f"merge_and_export refused: tensor '{name}' of layer '{QUERY}'"):
            lsrfx.merge_and_export(model, tmp_path / "m.onnx", IDS, merge=merge)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# --- 9. raw exceptions that are now clear errors ----------------------------------------------------------------


def test_meta_models_cannot_save_or_load(tmp_path) -> None:
    trained_set(tmp_path / "set")
    with torch.device("meta"):
        meta = tiny_bert()
    with pytest.raises(lsrfx.LsrfxError, match="weight on the meta device"):
        lsrfx.load_adapters(meta, tmp_path / "set")
    lsrfx.adapt(meta, method="lora", targets=["query", "value"], r=4)
    with pytest.raises(lsrfx.LsrfxError, match="cannot save adapters: the model's parameters are on the meta"):
        lsrfx.save_adapters(meta, tmp_path / "meta")


def test_torchscript_of_an_adapted_model_is_refused_clearly() -> None:
    model = lsrfx.adapt(nn.Sequential(nn.Linear(8, 8)), method="lora", r=2)
    with pytest.raises(lsrfx.LsrfxError, match="torch.jit.script cannot compile an adapted layer .* lsrfx.merge"):
        torch.jit.script(model)
    torch.jit.script(lsrfx.merge(model))  # merged, it is a plain model again


def test_a_full_disk_during_export_names_the_place_and_writes_nothing(tmp_path, monkeypatch) -> None:
    import errno

    from torch.onnx._internal.exporter._onnx_program import ONNXProgram

    def full(self, destination, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ONNXProgram, "save", full)
    model = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    with pytest.raises(lsrfx.LsrfxError, match=f"cannot write the ONNX file for m.onnx beside {tmp_path}: No space "
                                               r"left on device \(the disk is full\)"):
        lsrfx.merge_and_export(model, tmp_path / "m.onnx", IDS)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_save_names_the_directory(tmp_path, monkeypatch) -> None:
    import errno

    model = lsrfx.adapt(bert(), method="lora", targets=["query", "value"], r=4)
    lsrfx.save_adapters(model, tmp_path / "a")
    files = listing(tmp_path / "a")
    real = Path.write_bytes

    def full(self, data):
        if self.name == "adapters.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    perturb(model)
    with pytest.raises(lsrfx.LsrfxError, match=f"cannot write adapters to {tmp_path / 'a'}: No space left on device"):
        lsrfx.save_adapters(model, tmp_path / "a")
    assert listing(tmp_path / "a") == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
