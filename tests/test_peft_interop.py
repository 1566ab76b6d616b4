"""PEFT interop (issue #24 items 2 and 3): peft LoRA directories load into lsrfx, and every lsrfx method saves as a
peft LoRA directory; both reproduce peft's own ``PeftModel.from_pretrained`` within 1e-5.

References are peft itself: directories written by ``save_pretrained`` of real peft models, read back by
``PeftModel.from_pretrained``. A peft directory is a trust boundary like an lsrfx one: each refusal names the field
or tensor and leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lsrfx
from lsrfx.api import adapt_state
from lsrfx.export import peft_format
from lsrfx.parametrization import adapted_layers, adapter_parameters

from conftest import TINY_OPTIONS, ToyNet, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(3))
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"bert": ["query", "value"], "llama": SEVEN, "gpt2": ["c_attn"]}
HEAD = {"bert": ["classifier"], "llama": ["lm_head"], "gpt2": []}


def base(kind: str) -> nn.Module:
    """The same base model at each call."""
    torch.manual_seed(0)
    return BUILD[kind]()


def outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the last hidden state (tiny BERT's logits barely move with the adapters; its hidden states do)."""
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def assert_same_outputs(a: nn.Module, b: nn.Module, tol: float = 1e-5) -> None:
    for x, y in zip(outputs(a), outputs(b), strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def assert_adapters_matter(model: nn.Module, kind: str) -> None:
    """The comparison has teeth: the adapted model is far from its base."""
    assert (outputs(model)[1] - outputs(base(kind))[1]).abs().max() > 1e-2


def peft_dir(path: Path, kind: str, seed: int = 1, **lora) -> Path:
    """A directory written by peft's save_pretrained, with random (trained-looking) LoRA and modules_to_save."""
    model = get_peft_model(base(kind), LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if "lora_" in name else 0.1))
    model.save_pretrained(path)
    return path


def from_peft(kind: str, directory: Path) -> nn.Module:
    return PeftModel.from_pretrained(base(kind), directory).eval()


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --- peft -> lsrfx ------------------------------------------------------------------------------------------------

PEFT_IN = {
    "bert+classifier": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                     modules_to_save=["classifier"])),
    "bert SEQ_CLS (adds 'score', which BERT lacks)": ("bert", dict(r=4, lora_alpha=16, task_type="SEQ_CLS",
                                                                   target_modules=["query", "value"])),
    "bert exclude_modules, uniform rank_pattern": ("bert", dict(r=4, lora_alpha=8, target_modules=["dense", "query"],
                                                                exclude_modules=["pooler.dense"],
                                                                rank_pattern={"query": 4})),
    "llama regex+lm_head": ("llama", dict(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                                          modules_to_save=["lm_head"])),
    "llama rslora all seven": ("llama", dict(r=4, lora_alpha=8, target_modules=SEVEN, use_rslora=True)),
    "gpt2 Conv1D fan_in_fan_out": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(PEFT_IN))
def test_a_peft_lora_directory_loads_as_lsrfx_lora_with_peft_outputs(tmp_path, case) -> None:
    kind, lora = PEFT_IN[case]
    directory = peft_dir(tmp_path / "peft", kind, **lora)
    theirs = from_peft(kind, directory)
    ours = lsrfx.load_adapters(base(kind), directory)
    assert_same_outputs(ours, theirs)
    assert_adapters_matter(ours, kind)

    state = adapt_state(ours)
    peft_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                   if "default" in getattr(m, "lora_A", {})}
    assert state.config.method == "lora" and set(state.layers) == peft_layers
    scaling = {m.scaling["default"] for m in theirs.modules() if "default" in getattr(m, "lora_A", {})}
    assert {p.adapter.scale for _, _, p in adapted_layers(ours)} == scaling  # rsLoRA too: exactly peft's scale
    saved = [n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
             for n, p in theirs.named_parameters() if ".modules_to_save.default." in n]
    assert sorted(state.trainable) == sorted(saved)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        [*adapter_parameters(ours), *saved])


def test_a_loaded_peft_adapter_compiles_fuses_trains_merges_and_exports(tmp_path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(ToyNet(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                modules_to_save=["head"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    model = lsrfx.load_adapters(ToyNet(), tmp_path / "peft")
    x = torch.randn(2, 5, 32)
    assert "fused ops: 4 of 4" in lsrfx.explain(model, x)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    nn.functional.cross_entropy(compiled(x), torch.tensor([0, 2])).backward()
    optimizer.step()
    assert sorted(before) == sorted([*adapter_parameters(model), "head.bias", "head.weight"])
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    lsrfx.merge_and_export(model, tmp_path / "model.onnx", x, dynamic=False)  # verified in onnxruntime
    assert (tmp_path / "model.onnx").is_file()


def test_a_peft_directory_hot_swaps_into_an_adapted_lora_model_and_loads_as_a_named_set(tmp_path) -> None:
    lora = dict(r=4, lora_alpha=8, target_modules=SEVEN)
    first, second = peft_dir(tmp_path / "a", "llama", seed=1, **lora), peft_dir(tmp_path / "b", "llama", seed=2, **lora)
    model = lsrfx.load_adapters(base("llama"), first)
    weights = {n: p for n, p in model.named_parameters()}
    assert lsrfx.load_adapters(model, second) is model
    assert_same_outputs(model, from_peft("llama", second))
    assert all(p is weights[n] for n, p in model.named_parameters())  # in place: compiled code keeps its tensors

    other_rank = peft_dir(tmp_path / "r8", "llama", r=8, lora_alpha=8, target_modules=SEVEN)
    before = snapshot(model)
    with pytest.raises(lsrfx.LsrfxError, match=r"adapted with LoRAConfig\(r=4.*r=8"):
        lsrfx.load_adapters(model, other_rank)
    assert_unchanged(model, before)

    lsrfx.load_adapters(model, other_rank, name="r8")  # a named set: any rank on the model's layers
    with torch.no_grad():
        rows = model(input_ids=IDS, adapter_names=["r8", "default"]).logits
    torch.testing.assert_close(rows[:1], outputs(from_peft("llama", other_rank))[0][:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1:], outputs(from_peft("llama", second))[0][1:], rtol=1e-5, atol=1e-5)


def test_a_bf16_peft_adapter_is_converted_exactly(tmp_path) -> None:
    directory = peft_dir(tmp_path / "peft", "bert", r=4, lora_alpha=8, target_modules=["query", "value"])
    file = directory / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, file)
    ours = lsrfx.load_adapters(base("bert"), directory)
    assert_same_outputs(ours, from_peft("bert", directory))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(ours).values())


# --- what lsrfx refuses, by field or tensor, changing nothing ---------------------------------------------------

A_ = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B_ = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
REFUSED_CONFIGS = {
    "peft_type IA3": ({"peft_type": "IA3"}, "peft field 'peft_type' = 'IA3': lsrfx loads peft LoRA adapters only"),
    "DoRA": ({"use_dora": True}, "peft field 'use_dora' = True: DoRA rescales"),
    "bias all": ({"bias": "all"}, "peft field 'bias' = 'all'"),
    "lora_bias": ({"lora_bias": True}, "peft field 'lora_bias' = True: lora_B carries a trained bias"),
    "ranks differ": ({"rank_pattern": {"value": 8}}, "peft field 'rank_pattern'.*different values"),
    "alphas differ": ({"alpha_pattern": {r"layer\.0\.attention\.self\.query": 2}},
                      "peft field 'alpha_pattern'.*different values"),
    "layers_to_transform": ({"layers_to_transform": [0]}, "peft field 'layers_to_transform' = \\[0\\]"),
    "PiSSA": ({"init_lora_weights": "pissa"}, "peft field 'init_lora_weights' = 'pissa': .*rewrite the base"),
    "unknown feature": ({"trainable_token_indices": [1, 2]}, "peft field 'trainable_token_indices'"),
    "future feature": ({"some_future_option": {"on": True}}, "peft field 'some_future_option'.*does not reproduce"),
    "no target_modules": ({"target_modules": None}, "peft field 'target_modules' = None"),
    "all-linear": ({"target_modules": "all-linear"}, "'all-linear' is expanded by peft"),
    "bad regex": ({"target_modules": "(query"}, "peft field 'target_modules'.*not a valid regular expression"),
    "matches nothing": ({"target_modules": ["q_proj"]}, "peft field 'target_modules'.*matches no module"),
    "a LayerNorm": ({"target_modules": ["LayerNorm"]}, "selects '.*LayerNorm', a LayerNorm; lsrfx adapts"),
    "r a string": ({"r": "4"}, "peft field 'r' = '4': must be a positive integer"),
    "alpha NaN": ({"lora_alpha": math.nan}, "peft field 'lora_alpha' = nan"),
    "alpha huge": ({"lora_alpha": 1e300}, "lora: option alpha=.* must be <="),
    "modules_to_save a string": ({"modules_to_save": "classifier"}, "peft field 'modules_to_save' = 'classifier'"),
    "modules_to_save an adapted layer": ({"modules_to_save": ["classifier", "uery"]},
                                         "selects '.*query', an adapted layer"),
}
REFUSED_TENSORS = {
    "DoRA magnitude": (lambda t: {**t, A_.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)},
                       "lsrfx does not load.*lora_magnitude_vector.*DoRA"),
    "a base bias": (lambda t: {**t, "base_model.model.bert.pooler.dense.bias": torch.ones(32)},
                    "pooler.dense.bias.*base-layer biases"),
    "missing lora_B": (lambda t: {k: v for k, v in t.items() if k != B_}, "lacks tensors .*query.lora_B.weight"),
    "wrong rank": (lambda t: {**t, A_: torch.zeros(8, 32)}, f"tensor '{re.escape(A_)}' has shape \\(8, 32\\)"),
    "NaN": (lambda t: {**t, B_: torch.full((32, 4), math.nan)}, f"'{re.escape(B_)}' holds 128 non-finite value"),
    "int64": (lambda t: {**t, B_: torch.zeros(32, 4, dtype=torch.int64)}, f"'{re.escape(B_)}' is int64, the model's"),
    "float64": (lambda t: {**t, B_: torch.zeros(32, 4, dtype=torch.float64)}, "is float64, the model's float32"),
    "classifier buffer-like extra": (lambda t: {**t, "base_model.model.classifier.extra": torch.zeros(1)},
                                     "classifier.extra"),
}


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return peft_dir(tmp_path_factory.mktemp("good"), "bert", r=4, lora_alpha=8, target_modules=["query", "value"],
                    modules_to_save=["classifier"])


def refused(directory: Path, message: str) -> None:
    """Loading ``directory`` raises ``message`` into a base model and into an adapted one, changing neither."""
    for model in (base("bert"), lsrfx.adapt(base("bert"), method="lora", targets=["query", "value"],
                                            trainable=["classifier"], r=4, alpha=8)):
        before, state = snapshot(model), adapt_state(model)
        with pytest.raises(lsrfx.LsrfxError, match=message):
            lsrfx.load_adapters(model, directory)
        assert_unchanged(model, before)
        assert adapt_state(model) is state


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_what_lsrfx_cannot_represent_is_refused_naming_the_field(tmp_path, good_dir, case) -> None:
    edit, message = REFUSED_CONFIGS[case]
    shutil.copytree(good_dir, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    refused(tmp_path / "d", message)


@pytest.mark.parametrize("case", list(REFUSED_TENSORS))
def test_tensors_lsrfx_does_not_understand_are_refused_naming_the_tensor(tmp_path, good_dir, case) -> None:
    edit, message = REFUSED_TENSORS[case]
    shutil.copytree(good_dir, tmp_path / "d")
    file = tmp_path / "d" / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)
    refused(tmp_path / "d", message)


def test_pickled_and_oversized_peft_files_are_never_read(tmp_path, good_dir) -> None:
    shutil.copytree(good_dir, tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.safetensors").rename(tmp_path / "bin" / "adapter_model.bin")
    refused(tmp_path / "bin", "holds adapter_model.bin, a pickle")
    shutil.copytree(good_dir, tmp_path / "big")
    file = tmp_path / "big" / "adapter_model.safetensors"
    save_file({**load_file(file), "padding": torch.zeros(1 << 19)}, file)
    refused(tmp_path / "big", "larger than the adapters this model can hold")


def test_tied_modules_to_save_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(tie_word_embeddings=True), LoraConfig(r=4, target_modules=["q_proj"],
                                                                             modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    llama = tiny_llama(tie_word_embeddings=True)
    before = snapshot(llama)
    with pytest.raises(lsrfx.LsrfxError, match="'lm_head.weight' is shared with .*embed_tokens.*tied"):
        lsrfx.load_adapters(llama, tmp_path)
    assert_unchanged(llama, before)


def test_peft_matching_rules_are_peft_own(good_dir) -> None:
    """The layers a config selects are the ones peft's check_target_module_exists selects, on every rule."""
    from peft.tuners.tuners_utils import check_target_module_exists

    model = base("llama")
    cases = [dict(target_modules=SEVEN), dict(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
             dict(target_modules=r".*layers\.0.*_proj"), dict(target_modules=["proj"]),
             dict(target_modules=SEVEN, exclude_modules=["k_proj"]),
             dict(target_modules=SEVEN, exclude_modules=r".*\.1\..*"),
             dict(target_modules=[*SEVEN, "lm_head"], modules_to_save=["mlp"])]
    for case in cases:
        config = LoraConfig(**case)
        names = [n for n, _ in model.named_modules()]
        wanted = [n for n in names if check_target_module_exists(config, n) is True
                  or isinstance(check_target_module_exists(config, n), re.Match)]
        raw = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
        try:
            found = list(peft_format.read_peft_config(raw, Path("x"), model).saved.layers)
        except lsrfx.LsrfxError as exc:  # peft selects something lsrfx cannot adapt (an MLP wrapper here)
            assert "matches no module" in str(exc) or not wanted
            continue
        assert found == wanted, case


# --- lsrfx -> peft ------------------------------------------------------------------------------------------------


def trained(kind: str, method: str, seed: int = 1) -> nn.Module:
    """An lsrfx model after "training": random adapter values and a changed trained head."""
    model = lsrfx.adapt(base(kind), method=method, targets=TARGETS[kind], trainable=HEAD[kind],
                        **TINY_OPTIONS[method])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g)) if ".adapter." in name else p.add_(
                    torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("kind", list(BUILD))
@pytest.mark.parametrize("method", list(lsrfx.METHODS))
def test_every_method_saves_as_a_peft_lora_that_peft_reproduces(tmp_path, kind, method) -> None:
    model = trained(kind, method)
    assert lsrfx.save_adapters(model, tmp_path, format="peft") == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_same_outputs(from_peft(kind, tmp_path), model)
    assert_adapters_matter(model, kind)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    layers = adapt_state(model).layers
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    rank = TINY_OPTIONS[method].get("r", 4)
    assert config["r"] == rank and config["fan_in_fan_out"] == (kind == "gpt2")
    assert config["lora_alpha"] == (TINY_OPTIONS[method]["alpha"] if method == "lora" else rank)
    assert config["modules_to_save"] == (HEAD[kind] or None)
    lora_sizes = sum(t.numel() for n, t in tensors.items() if ".lora_" in n)
    assert lora_sizes == sum(rank * sum(m.weight.shape) for n, m in model.named_modules() if n in layers)

    again = lsrfx.load_adapters(base(kind), tmp_path)  # and back into lsrfx, as LoRA
    assert_same_outputs(again, model)


def test_a_peft_save_is_atomic_and_refuses_what_peft_cannot_express(tmp_path) -> None:
    model = trained("bert", "lsr")
    lsrfx.save_adapters(model, tmp_path / "d")  # an lsrfx directory, replaced as a whole by the peft one
    lsrfx.save_adapters(model, tmp_path / "d", format="peft")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(lsrfx.LsrfxError, match="format='onnx' is not one of 'lsrfx'"):
        lsrfx.save_adapters(model, tmp_path / "e", format="onnx")

    torch.manual_seed(0)
    tied = lsrfx.adapt(tiny_llama(tie_word_embeddings=True), method="lora", targets=["q_proj"],
                       trainable=["embed_tokens"])
    with pytest.raises(lsrfx.LsrfxError, match="'.*' is tied to another module's; peft trains an untied copy"):
        lsrfx.save_adapters(tied, tmp_path / "f", format="peft")
    suffix = nn.ModuleDict({"t": nn.Linear(8, 8), "x": nn.Linear(8, 8), "y": nn.ModuleDict({"zx": nn.Linear(8, 8)})})
    lsrfx.adapt(suffix, method="lora", targets=["t"], trainable=["x"], r=2)
    with pytest.raises(lsrfx.LsrfxError, match=r"would also select \(or miss\) \['y.zx'\]"):
        lsrfx.save_adapters(suffix, tmp_path / "f", format="peft")  # peft's modules_to_save "x" matches "y.zx" too
    assert not (tmp_path / "f").exists()


def test_lsrfx_directories_stay_lsrfx_only(tmp_path) -> None:
    """Documented choice: an lsrfx directory is not disguised as peft's (peft raises); format="peft" shares."""
    model = trained("bert", "lora")
    lsrfx.save_adapters(model, tmp_path)
    assert "peft_type" not in json.loads((tmp_path / "adapter_config.json").read_text())
    with pytest.raises(KeyError, match="peft_type"):
        PeftModel.from_pretrained(base("bert"), tmp_path)


def test_the_interop_guide_example_runs(tmp_path, monkeypatch) -> None:
    page = Path(__file__).parents[1] / "docs" / "guides" / "interop.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(page), "exec"), {"__name__": "interop_example"})
    assert (tmp_path / "adapters-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()
