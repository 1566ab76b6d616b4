"""What a new user meets first: ``lsrfx inspect`` on every tested architecture, bf16 export on a CPU-only
onnxruntime, damaged adapter files, string ``targets`` / ``trainable``, a short ``explain``, cheap imports, CSV
errors and ONNX output names.

References are independent of the code under test: layer names from ``named_modules``, output names from the
model's own output fields, SHA-256 from ``hashlib`` over the file, module lists from a fresh interpreter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn

import lsrfx
from lsrfx.api import adapt_state
from lsrfx.cli import main
from lsrfx.finetune.data import load_data
from lsrfx.finetune.errors import FinetuneError
from lsrfx.targets import match_parameter_names

from conftest import tiny_bert

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- lsrfx inspect --config X for every architecture the README names ------------------------------------------

# model type -> (adapted nodes with one layer per stack under the default targets, example input names). Counted by
# hand from each architecture: q and v per attention block; GPT-2's fused c_attn is one layer; T5 with one layer
# has encoder self-attention, decoder self-attention and cross-attention.
ARCHITECTURES = {
    "bert": (2, ["input_ids"]),
    "roberta": (2, ["input_ids"]),
    "gpt2": (1, ["input_ids"]),
    "llama": (2, ["input_ids"]),
    "t5": (6, ["input_ids", "decoder_input_ids"]),
    "vit": (2, ["pixel_values"]),
}


def test_the_architectures_the_readme_names_are_the_ones_inspected():
    """The README's list of tested architectures, lsrfx inspect's tested types and this test's table agree."""
    from lsrfx.inspection import TESTED_TYPES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    tested = readme[readme.index("Tested architectures"):].split("\n")[0:2]
    names = {"bert": "BERT", "roberta": "RoBERTa", "gpt2": "GPT-2", "llama": "Llama", "t5": "T5", "vit": "ViT"}
    assert set(ARCHITECTURES) == set(TESTED_TYPES) == set(names)
    assert all(names[t] in " ".join(tested) for t in TESTED_TYPES)


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_inspect_runs_every_readme_architecture(model_type, capsys):
    nodes, input_names = ARCHITECTURES[model_type]
    code, out, err = run_cli(["inspect", "--config", model_type, "--layers", "1", "--method", "lora",
                              "--seq-len", "8"], capsys)
    assert code == 0, err
    assert f"of {nodes} adapted node(s)" in out  # fused or materialised: the cost model decides, not inspect
    shown = out.split("example inputs: ", 1)[1].splitlines()[0]
    assert re.findall(r"(\w+) \(", shown) == input_names
    if model_type == "vit":
        config = transformers.ViTConfig()
        assert f"pixel_values (2, {config.num_channels}, {config.image_size}, {config.image_size})" in shown
    else:
        assert "input_ids (2, 8)" in shown
    assert "--- captured graph" not in out  # graphs only on request


def test_inspect_graphs_flag_adds_the_graphs(capsys):
    code, out, err = run_cli(["inspect", "--config", "bert", "--layers", "1", "--method", "lora", "--graphs"],
                             capsys)
    assert code == 0, err
    assert "--- captured graph (before) ---" in out and "--- after the lsrfx pass ---" in out and "FUSED" in out


@pytest.mark.parametrize(("model_type", "expected"), [("bret", "close matches: bert"),
                                                      ("nonexistent", "no close match")])
def test_unknown_config_lists_a_few_close_matches(model_type, expected, capsys):
    code, _, err = run_cli(["inspect", "--config", model_type], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert expected in err and len(err) < 300, err


# --- bf16 export where onnxruntime has only the CPU provider -------------------------------------------------------

needs_cpu_only_ort = pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                                        reason="onnxruntime has CUDA here: bf16 verification is possible")


def bf16_bert() -> nn.Module:
    model = tiny_bert().to(torch.bfloat16)
    lsrfx.adapt(model, method="lora", r=4)
    with torch.no_grad():
        model(IDS)
    return model


@needs_cpu_only_ort
def test_bf16_export_on_cpu_fails_early_naming_provider_dtype_and_fix(tmp_path, monkeypatch):
    model = bf16_bert()

    def no_export(*args, **kwargs):
        raise AssertionError("the bf16 check must come before any export work")

    monkeypatch.setattr("lsrfx.export.onnx._export", no_export)
    with pytest.raises(lsrfx.LsrfxError, match=r"bfloat16.*CPUExecutionProvider.*verify=False"):
        lsrfx.merge_and_export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@needs_cpu_only_ort
def test_bf16_export_unverified_or_as_float32_copy(tmp_path):
    model = bf16_bert()
    report = lsrfx.merge_and_export(model, tmp_path / "bf16.onnx", verify=False)
    assert report.max_diff is None and "not verified" in str(report)
    proto = onnx.load(str(tmp_path / "bf16.onnx"))
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16  # the file is bf16
    report = lsrfx.merge_and_export(copy.deepcopy(model).float(), tmp_path / "fp32.onnx")  # the message's advice
    assert report.max_diff is not None and report.max_diff < 1e-4
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's model is untouched


# --- damaged adapter data -------------------------------------------------------------------------------------------


def saved_adapters(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_bert()
    lsrfx.adapt(model, method="lora", r=4, trainable=("classifier",))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        want = model(IDS).logits
    lsrfx.save_adapters(model, tmp_path)
    return tmp_path, want


def fresh_base() -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert()


def test_checksum_is_the_sha256_of_the_tensor_file(tmp_path):
    directory, _ = saved_adapters(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["tensors_sha256"] == hashlib.sha256((directory / "adapters.safetensors").read_bytes()).hexdigest()


def test_random_bytes_in_the_tensor_data_fail_to_load(tmp_path):
    directory, _ = saved_adapters(tmp_path)
    file = directory / "adapters.safetensors"
    raw = bytearray(file.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, JSON header, tensor data
    assert len(raw) - data_start > 128
    raw[data_start + 16: data_start + 80] = os.urandom(64)
    file.write_bytes(bytes(raw))
    model = fresh_base()
    with pytest.raises(lsrfx.LsrfxError, match=r"adapters\.safetensors is damaged.*SHA-256"):
        lsrfx.load_adapters(model, directory)
    assert adapt_state(model) is None  # nothing was loaded


def test_files_without_a_checksum_still_load(tmp_path):
    directory, want = saved_adapters(tmp_path)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["tensors_sha256"]  # as written before the checksum existed
    config_file.write_text(json.dumps(config))
    model = lsrfx.load_adapters(fresh_base(), directory)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=0)


# --- strings as targets and trainable, explain, imports, CSV errors, output names -----------------------------------


def test_a_bare_string_target_is_one_suffix():
    model = tiny_bert()
    want = [n for n, _ in model.named_modules() if n.endswith(".query")]
    lsrfx.adapt(model, method="lora", r=4, targets="query")
    assert adapt_state(model).layers == want and len(want) == 2


def test_a_string_target_falls_back_to_a_full_name_regex_and_says_how_it_was_read():
    model = tiny_bert()
    want = [n for n, _ in model.named_modules() if n.endswith((".query", ".value"))]
    lsrfx.adapt(model, method="lora", r=4, targets=".*attention.*(query|value)")
    assert adapt_state(model).layers == want
    with pytest.raises(lsrfx.LsrfxError, match=r"read as a module-name suffix, then as a regular expression"):
        lsrfx.adapt(tiny_bert(), method="lora", r=4, targets="qwery")


def test_a_bare_string_trainable_is_one_name():
    model = tiny_bert()
    want = [n for n, _ in model.named_parameters() if n.startswith("classifier.")]
    assert match_parameter_names(model, "classifier") == want


def test_adapt_with_a_bare_string_trainable_keeps_that_module_trainable():
    model = tiny_bert()
    lsrfx.adapt(model, method="lora", r=4, trainable="classifier")
    want = {n for n, _ in model.named_parameters() if n.startswith("classifier.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n.lower()
            and "parametrizations" not in n} == want


def test_explain_is_a_short_summary_unless_graphs_are_asked_for():
    model = tiny_bert()
    lsrfx.adapt(model, method="lora", r=4)
    layers = adapt_state(model).layers
    text = lsrfx.explain(model, IDS)
    lines = text.splitlines()
    assert len(lines) <= 12 + len(layers), text
    assert all(sum(line.strip().startswith(name + " [") for line in lines) == 1 for name in layers)
    assert "graph breaks" in text and f"of {len(layers)} adapted node(s)" in text
    assert "placeholder" not in text and "graphs=True" in text
    full = lsrfx.explain(model, IDS, graphs=True)
    assert "--- captured graph (before) ---" in full and "placeholder" in full
    assert len(full.splitlines()) > 5 * len(lines)


def test_explain_names_the_models_error_on_bad_inputs():
    model = transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                         intermediate_size=32, image_size=32, patch_size=16))
    lsrfx.adapt(model, method="lora", r=4)
    with pytest.raises(lsrfx.LsrfxError, match=r"ViTModel\.forward failed on the example inputs \(Tensor\(2, 8\)\)"):
        lsrfx.explain(model, IDS)


HEAVY = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "matplotlib", "triton")
PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


HELP = "from lsrfx.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"


@pytest.mark.parametrize("code", ["import lsrfx", HELP])
def test_import_and_help_load_no_heavy_dependency(code):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_lazy_names_are_the_real_objects():
    import lsrfx.api
    import lsrfx.explain as explain_module  # noqa: F401 (must not rebind lsrfx.explain to the module)
    from lsrfx import adapt  # noqa: F401 (from-import goes through the module __getattr__)

    assert lsrfx.adapt is lsrfx.api.adapt and callable(lsrfx.explain)
    assert lsrfx.METHODS is lsrfx.adapters.METHODS and "adapt" in dir(lsrfx)
    assert all(getattr(lsrfx, name) is not None for name in lsrfx.__all__)
    with pytest.raises(AttributeError):
        lsrfx.no_such_name  # noqa: B018


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_unterminated_quote_names_the_csv_error(tmp_path, capsys):
    data = write_text(tmp_path / "bad.csv", 'text,label,split\n"an open quote,games,train\nfine,mail,test\n')
    with pytest.raises(FinetuneError, match=r"bad\.csv.*line 2: unexpected end of data.*never closed"):
        load_data(data)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the CLI checks the model directory before reading the data
    code, _, err = run_cli(["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                            "--no-export", "--threads", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unexpected end of data" in err and "line 2" in err, err


def test_a_record_with_extra_fields_names_its_line(tmp_path):
    data = write_text(tmp_path / "ragged.csv", "text,label,split\nok,games,train\nhello, world,games,train\n")
    with pytest.raises(FinetuneError, match=r"line 3: 4 fields where the header has 3"):
        load_data(data)


def onnx_output_names(path: Path) -> list[str]:
    return [o.name for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()]


def test_onnx_outputs_are_named_after_the_model_output_fields(tmp_path):
    classifier = tiny_bert()
    lsrfx.adapt(classifier, method="lora", r=4)
    report = lsrfx.merge_and_export(classifier, tmp_path / "cls.onnx", IDS)
    assert onnx_output_names(tmp_path / "cls.onnx")[0] == "logits" == report.outputs[0]
    assert "outputs logits" in str(report)

    encoder = tiny_bert().bert
    lsrfx.adapt(encoder, method="lora", r=4)
    with torch.no_grad():
        fields = [k for k, v in encoder(IDS).items() if isinstance(v, torch.Tensor)]
    lsrfx.merge_and_export(encoder, tmp_path / "enc.onnx", IDS)
    assert onnx_output_names(tmp_path / "enc.onnx") == fields == ["last_hidden_state", "pooler_output"]

    plain = nn.Sequential(nn.Linear(8, 8))
    lsrfx.adapt(plain, method="lora", r=2, targets=["0"])
    lsrfx.merge_and_export(plain, tmp_path / "plain.onnx", torch.randn(3, 8))
    assert onnx_output_names(tmp_path / "plain.onnx") == ["output"]
