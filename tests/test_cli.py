"""``lsrfx finetune`` / ``lsrfx inspect`` end to end on a tiny random-weight BERT and a tiny CSV (seconds), every bad
input, Ctrl-C, and the report files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnxruntime
import pytest
import torch
import transformers

import lsrfx
from lsrfx.adapters import LoRAConfig
from lsrfx.adapters.base import option_field
from lsrfx.cli import build_parser, main, method_options
from lsrfx.finetune import defaults
from lsrfx.finetune.data import load_data
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.run import FinetuneSettings, check_settings

from conftest import tiny_bert

CLASSES = {"games": "game play arcade", "sound": "audio music sound", "mail": "mail email inbox"}
FILLER = "tool small fast simple linux program library".split()


def save_tiny_model(path: Path) -> Path:
    """Save the shared tiny BERT's encoder (2 layers, random weights) into ``path`` with a WordPiece tokenizer over
    a hand-written vocabulary."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *" ".join(CLASSES.values()).split()]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    tiny_bert(vocab_size=len(words), max_position_embeddings=64).bert.save_pretrained(path)  # the tokenizer's words
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def write_csv(path: Path, rows: list[dict], columns=("package", "text", "label", "split")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_rows(n_train: int = 20, n_test: int = 5, seed: int = 0) -> list[dict]:
    """Per class: texts holding one of the class's keywords among filler words (an easy task)."""
    rng = random.Random(seed)
    rows = []
    for label, keywords in CLASSES.items():
        for i in range(n_train + n_test):
            words = rng.sample(FILLER, 3) + [rng.choice(keywords.split())]
            rng.shuffle(words)
            rows.append({"package": f"{label}-{i}", "text": " ".join(words), "label": label,
                         "split": "train" if i < n_train else "test"})
    return rows


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "tiny.csv", tiny_rows())


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--no-compile",
            "--threads", "1", "--batch-size", "8", *extra]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fresh_adapter_params(model_dir: Path, method: str, n_labels: int) -> int:
    """Adapter parameter count of the same model adapted directly through the library."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=n_labels)
    lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("classifier",))
    return lsrfx.count_parameters(model)[0]


def test_compare_writes_well_formed_reports(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(finetune_args(tiny_model, tiny_csv, out, "--compare", "lora", "lsr", "--seeds", "0",
                                            "1", "--epochs", "2", "--no-export"), capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    data = load_data(tiny_csv, seed=0)
    assert report["splits"] == {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}
    assert report["labels"] == sorted(CLASSES)
    assert {k: report["settings"][k] for k in ("epochs", "patience", "warmup", "weight_decay")} == {
        "epochs": 2, "patience": defaults.PATIENCE, "warmup": defaults.WARMUP_FRACTION,
        "weight_decay": defaults.WEIGHT_DECAY}
    assert [r["method"] for r in report["summary"]] == ["lora", "lsr"]
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("lora", 0), ("lora", 1), ("lsr", 0), ("lsr", 1)]
    steps = 2 * math.ceil(len(data.train) / 8)
    for run in report["runs"]:
        assert run["adapter_params"] == fresh_adapter_params(tiny_model, run["method"], len(CLASSES))
        assert run["head_params"] == 32 * len(CLASSES) + len(CLASSES)
        assert len(run["losses"]) == steps and all(math.isfinite(v) for v in run["losses"])
        assert [v["epoch"] for v in run["validation"]] == [1, 2] and run["stopped_epoch"] == 2
        assert run["best_validation"] == run["validation"][run["best_epoch"] - 1]
        ranks = run["delta_effective_ranks"]  # of the kept dW, one per adapted layer (2 layers x query/value)
        assert len(ranks) == 4 and all(0.0 < v <= 8.0 for v in ranks.values()), ranks
        assert run["test"]["n"] == len(data.test)
        assert 0.0 <= run["test"]["accuracy"] <= 1.0 and run["step_time_s"] > 0
        assert (out / f"{run['method']}-seed{run['seed']}").is_dir()
    for row in report["summary"]:
        accs = [r["test"]["accuracy"] for r in report["runs"] if r["method"] == row["method"]]
        assert row["test_accuracy_mean"] == pytest.approx(sum(accs) / 2)
        assert row["test_accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))
    assert "| lora |" in stdout and "| lsr |" in stdout
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "report.png").shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left behind


def test_training_learns_the_tiny_task(tiny_model, tiny_csv, tmp_path, capsys):
    """The head alone cannot solve it on a random encoder (frozen pooler): the adapters must learn."""
    out = tmp_path / "out"
    code, _, _ = run_cli(finetune_args(tiny_model, tiny_csv, out, "--method", "lora", "--epochs", "10", "--lr",
                                       "5e-2", "--head-lr", "5e-2", "--no-export"), capsys)
    assert code == 0
    run = json.loads((out / "report.json").read_text())["runs"][0]
    losses = run["losses"]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert run["validation"][-1]["loss"] < 0.7 * run["validation"][0]["loss"]
    assert run["test"]["accuracy"] > 0.6  # chance is 1/3


def test_export_and_adapters(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(finetune_args(tiny_model, tiny_csv, out, "--method", "lsr", "--epochs", "1"), capsys)
    assert code == 0, err
    run = json.loads((out / "report.json").read_text())["runs"][0]
    onnx_file = out / run["export"]["path"]
    assert onnx_file == out / "lsr-seed0" / "model.onnx" and onnx_file.is_file()
    assert run["export"]["size"] >= onnx_file.stat().st_size > 0
    assert run["export"]["merged"] and 0 <= run["export"]["max_diff"] <= 1e-4
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(CLASSES))
    lsrfx.adapt(loaded, method="lsr", targets=["query", "value"], trainable=("classifier",))
    lsrfx.load_adapters(loaded, out / run["adapters_dir"])  # the saved adapters fit a freshly adapted model
    session = onnxruntime.InferenceSession(str(onnx_file))
    assert {i.name for i in session.get_inputs()} >= {"input_ids"}


def test_quantized_base_trains_exports_and_shrinks_the_model(tiny_model, tiny_csv, tmp_path, capsys):
    pytest.importorskip("torchao", reason="the lsrfx[quant] extra (torchao) is not installed")
    runs = {}
    for quantize in ("none", "int8"):
        out = tmp_path / quantize
        code, _, err = run_cli(finetune_args(tiny_model, tiny_csv, out, "--method", "lora", "--epochs", "2",
                                             "--quantize", quantize), capsys)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["quantize"] == quantize
        runs[quantize] = report["runs"][0]
    fp32, int8 = runs["none"], runs["int8"]
    assert int8["quantize"] == "int8" and int8["losses"][-1] < int8["losses"][0]
    # linears and embeddings in int8 + per-row scales; head, norms and biases stay fp32
    assert int8["model_bytes"] < 0.4 * fp32["model_bytes"]
    assert int8["export"]["merged"] and 0 <= int8["export"]["max_diff"] <= 1e-4  # float export, ORT-verified
    assert int8["adapter_params"] == fp32["adapter_params"]


def test_overwrite_replaces_existing_out(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_cli(finetune_args(tiny_model, tiny_csv, out, "--epochs", "1", "--no-export"), capsys)
    assert code == 2 and (out / "stale.txt").exists()
    assert err.startswith("lsrfx: error:") and "already exists" in err
    code, _, _ = run_cli(finetune_args(tiny_model, tiny_csv, out, "--epochs", "1", "--no-export", "--overwrite"),
                         capsys)
    assert code == 0 and not (out / "stale.txt").exists() and (out / "report.json").is_file()


def bad_inputs(tmp: Path, model: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    one_class = write_csv(tmp / "one.csv", [r for r in tiny_rows() if r["label"] == "games"])
    no_label = write_csv(tmp / "nolabel.csv", tiny_rows(), columns=("text", "split"))
    existing = tmp / "exists"
    existing.mkdir()
    out = tmp / "out"
    return {
        "missing model dir": (finetune_args(tmp / "no-such-model", data, out), "does not exist"),
        "csv lacks columns": (finetune_args(model, no_label, out), "lacks column"),
        "csv with one class": (finetune_args(model, one_class, out), "single class"),
        "missing csv": (finetune_args(model, tmp / "none.csv", out), "does not exist"),
        "unknown method": (finetune_args(model, data, out, "--method", "dora"), "unknown method"),
        "unknown compared method": (finetune_args(model, data, out, "--compare", "lora", "dora"), "unknown method"),
        "existing out dir": (finetune_args(model, data, existing), "already exists"),
        "option of no chosen method": (finetune_args(model, data, out, "--method", "lora", "--r1", "2"), "--r1"),
        "unknown --set option": (finetune_args(model, data, out, "--set", "lsr.beta=1"), "unknown option"),
        "bad --set method": (finetune_args(model, data, out, "--set", "lora.alpha=1"), "not among"),
        "impossible rank": (finetune_args(model, data, out, "--method", "lora", "--rank", "64"), "rank"),
        "zero epochs": (finetune_args(model, data, out, "--epochs", "0"), "--epochs"),
        "unknown flag": (finetune_args(model, data, out, "--frobnicate"), "unrecognized"),
    }


BAD_CASES = ["missing model dir", "csv lacks columns", "csv with one class", "missing csv", "unknown method",
             "unknown compared method", "existing out dir", "option of no chosen method", "unknown --set option",
             "bad --set method", "impossible rank", "zero epochs", "unknown flag"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_nonzero(case, tiny_model, tiny_csv, tmp_path, capsys):
    cases = bad_inputs(tmp_path, tiny_model, tiny_csv)
    assert sorted(cases) == sorted(BAD_CASES)
    args, expected = cases[case]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse errors exit directly
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lsrfx: error:") and expected in lines[0], err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def test_console_script_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "lsrfx.cli", "finetune", "--model", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("lsrfx: error: model directory")


def test_ctrl_c_leaves_no_files(tiny_model, tiny_csv, tmp_path, capsys, monkeypatch):
    import lsrfx.finetune.run as run_module

    real_evaluate = run_module.evaluate

    def interrupted(*args, **kwargs):  # after a whole run directory was written, during the test evaluation
        real_evaluate(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "evaluate", interrupted)
    code, _, err = run_cli(finetune_args(tiny_model, tiny_csv, tmp_path / "out", "--epochs", "1", "--no-export"),
                           capsys)
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_validation_is_carved_from_train_only(tiny_csv):
    data = load_data(tiny_csv, validation_fraction=0.2, seed=3)
    rows = list(csv.DictReader(tiny_csv.open()))
    test_texts = sorted(r["text"] for r in rows if r["split"] == "test")
    assert sorted(data.test.texts) == test_texts
    train_pairs = sorted((r["text"], r["label"]) for r in rows if r["split"] == "train")
    names = data.label_names
    got = sorted([(t, names[y]) for t, y in zip(data.train.texts, data.train.labels, strict=True)]
                 + [(t, names[y]) for t, y in zip(data.validation.texts, data.validation.labels, strict=True)])
    assert got == train_pairs
    assert sorted(set(data.validation.labels)) == list(range(len(CLASSES)))  # stratified: every class held out
    assert len(data.validation) == len(CLASSES) * round(0.2 * 20)
    assert load_data(tiny_csv, validation_fraction=0.2, seed=3) == data
    assert load_data(tiny_csv, validation_fraction=0.2, seed=4).validation != data.validation


def test_inspect_prints_summary_and_explain(tiny_model, capsys):
    code, out, err = run_cli(["inspect", "--model", str(tiny_model), "--method", "lora", "--seq-len", "8"], capsys)
    assert code == 0, err
    assert "4 layers adapted with lora" in out  # query + value in each of 2 layers
    assert "lsrfx.explain:" in out and "of 4 adapted node(s)" in out


def test_inspect_named_config_and_bad_inputs(capsys):
    code, out, err = run_cli(["inspect", "--config", "bert", "--layers", "1", "--method", "lsr"], capsys)
    assert code == 0, err
    assert "2 layers adapted with lsr" in out and "of 2 adapted node(s)" in out
    for args, expected in ((["--config", "no-such-arch"], "unknown transformers model type"),
                           (["--model", "/no/such/dir"], "does not exist"),
                           (["--config", "bert", "--method", "dora"], "unknown method")):
        code, _, err = run_cli(["inspect", *args], capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_every_config_field_is_a_flag_with_its_help_text(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for method, cls in lsrfx.METHODS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{method} config field {f.name!r} has no metadata['help']"
            assert " ".join(f.metadata["help"].split()) in text
            assert ("--rank" if f.name == "r" else "--" + f.name.replace("_", "-")) in text


def test_adapter_flags_apply_to_every_chosen_method_with_that_field():
    args = build_parser().parse_args([
        "finetune", "--compare", "lora", "lsr", "condlora", "genlora", "-r", "4", "--alpha", "2", "--r1", "1",
        "--r2", "2", "--separation-rank", "3", "--group-size", "3", "--init", "paper", "--in-factors", "4", "8",
        "--set", "lsr.out_factors=8,4"])
    assert method_options(args, args.compare) == {
        "lora": {"r": 4, "alpha": 2.0},
        "lsr": {"alpha": 2.0, "r1": 1, "r2": 2, "separation_rank": 3, "init": "paper", "in_factors": (4, 8),
                "out_factors": (8, 4)},
        "condlora": {"r": 4, "alpha": 2.0},
        "genlora": {"r": 4, "alpha": 2.0, "group_size": 3},
    }
    assert method_options(build_parser().parse_args(["inspect", "--rank", "5"]), ["lora"]) == {"lora": {"r": 5}}
    with pytest.raises(lsrfx.LsrfxError, match=r"--group-size does not apply to method\(s\) \['lora'\].*genlora"):
        method_options(build_parser().parse_args(["finetune", "--group-size", "2"]), ["lora"])


@dataclass
class ToyConfig(LoRAConfig):
    """A method registered only in this test: LoRA plus one new option."""

    method = "toy"
    beta: float = option_field(0.5, "a knob only the toy method has")


def test_a_registered_method_gets_flags_but_needs_its_own_learning_rate(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(lsrfx.METHODS, "toy", ToyConfig)
    args = build_parser().parse_args(["finetune", "--method", "toy", "--beta", "0.25", "-r", "2"])
    assert method_options(args, ["toy"]) == {"toy": {"beta": 0.25, "r": 2}}
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "a knob only the toy method has [toy: 0.5]" in " ".join(capsys.readouterr().out.split())

    settings = FinetuneSettings(out=tmp_path / "out", methods=["toy"])
    with pytest.raises(FinetuneError, match=r"method 'toy' has no default adapter learning rate.*pass --lr"):
        check_settings(settings)  # never LoRA's rate in silence
    check_settings(dataclasses.replace(settings, lr=1e-3))  # an explicit --lr serves


def test_every_method_has_its_own_learning_rate():
    assert set(lsrfx.METHODS) <= set(defaults.ADAPTER_LR)
    assert all(defaults.ADAPTER_LR[m] > 0 for m in lsrfx.METHODS)
    for method in lsrfx.METHODS:
        assert FinetuneSettings(out=Path("unused")).adapter_lr(method) == defaults.ADAPTER_LR[method]
