"""``lsrfx finetune`` as a trust boundary (issue #22): a diverging run stops at the step and writes nothing, unsafe or
odd inputs (a pickled model, a CSV with a byte-order mark or a huge text) and a full disk end in one clear line,
SIGTERM is handled like Ctrl-C, a killed run's leftovers are removed by the next run, and ``--out`` may not be a
directory the run needs or stands in. Tiny random-weight BERT and tiny CSV, as in ``tests/test_cli.py``."""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import finetune_args, run_cli, save_tiny_model, tiny_rows, write_csv
from test_finetune_protocol import TinyClassifier, tiny_split

import lsrfx
from lsrfx.diagnostics import delta_effective_ranks, effective_rank, low_rank_effective_rank
from lsrfx.finetune.batches import batches
from lsrfx.finetune.data import load_data
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.train import TrainSettings, train
from lsrfx.parametrization import adapted_layers

from conftest import tiny_bert

REPO = Path(lsrfx.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "tiny.csv", tiny_rows())


def listing(directory: Path) -> list[str]:
    """Every name in ``directory``, hidden ones included, sorted."""
    return sorted(p.name for p in directory.iterdir())


def one_error_line(err: str) -> str:
    """The error line of the CLI's stderr: its last line, the only one from lsrfx (progress bars may precede it)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("lsrfx")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and lines[0].startswith("lsrfx: error: "), err
    assert "Traceback" not in err, err
    return lines[0]


# ---- row 7: non-finite training --------------------------------------------------------------------------------


class PoisonedClassifier(TinyClassifier):
    """The tiny classifier whose loss turns non-finite at training step ``step`` (1-based): ``"loss"`` makes the loss
    itself NaN; ``"gradient"`` keeps the loss finite (it adds ``sqrt(0)``) but makes the adapter's gradient infinite."""

    def __init__(self, step: int, kind: str) -> None:
        super().__init__()
        self.poison_step, self.kind, self.calls = step, kind, 0

    def forward(self, input_ids, attention_mask, labels=None):
        out = super().forward(input_ids, attention_mask, labels)
        if labels is not None and self.training:
            self.calls += 1
            if self.calls == self.poison_step:
                s = self.adapter.sum()
                out.loss = out.loss * math.nan if self.kind == "loss" else out.loss + torch.sqrt(s - s.detach())
        return out


@pytest.mark.parametrize(("kind", "what"), [("loss", "loss is nan"), ("gradient", "gradient norm is inf")])
def test_training_stops_at_the_first_non_finite_step_naming_it(kind, what):
    torch.manual_seed(0)
    model = PoisonedClassifier(step=7, kind=kind)  # 40 examples, batch 8: 5 steps per epoch -> epoch 2, step 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=3, batch_size=8, lr=0.1, head_lr=0.2)
    with pytest.raises(FinetuneError) as info:
        train(model, [model.adapter], tiny_split(40, 0), batches(tiny_split(24, 100), 8), settings, seed=4,
              method="lsr")
    message = str(info.value)
    assert f"method 'lsr', seed 4: the training {what} at epoch 2, step 7" in message, message
    assert "lower --lr (now 0.1)" in message and "--head-lr (now 0.2)" in message, message
    assert model.calls == 7  # stopped at once
    for name, value in model.state_dict().items():  # the step that produced it was not applied
        assert torch.isfinite(value).all(), name
    assert not torch.equal(model.state_dict()["adapter"], before["adapter"])


def test_diverging_finetune_is_one_line_and_writes_nothing(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(finetune_args(model_dir, data_csv, out, "--epochs", "2", "--no-export", "--lr", "1e6"),
                           capsys)
    line = one_error_line(err)
    assert code == 2
    assert re.search(r"method 'lsr', seed 0: the training (loss|gradient norm) is (nan|inf) at epoch \d+, step \d+",
                     line), line
    assert "lower --lr (now 1e+06)" in line, line
    assert listing(tmp_path) == []  # no output directory, no staging directory


def test_summary_reports_nan_for_a_non_finite_update():
    model = lsrfx.adapt(tiny_bert(), method="lora", targets=["query", "value"], r=4)
    layers = [name for name, _, _ in adapted_layers(model)]
    with torch.no_grad():
        for (_, _, param), value in zip(adapted_layers(model), (math.nan, math.inf, 1.0, 2.0), strict=True):
            param.adapter.lora_B.normal_()
            param.adapter.lora_B[0, 0] = value
    ranks = delta_effective_ranks(model)
    assert math.isnan(ranks[layers[0]]) and math.isnan(ranks[layers[1]])
    assert all(0 < ranks[name] <= 4 for name in layers[2:])
    rows = {row.split()[0]: row.split()[-1] for row in lsrfx.summary(model).splitlines()[2:6]}
    assert rows == {name: "nan" if i < 2 else f"{ranks[name]:.1f}" for i, name in enumerate(layers)}
    assert math.isnan(effective_rank(torch.tensor([[1.0, math.nan], [0.0, 1.0]])))
    assert math.isnan(low_rank_effective_rank(torch.full((2, 8), math.inf), torch.ones(8, 2)))


# ---- row 9: input the CLI refuses or now reads -----------------------------------------------------------------


class Payload:
    """Pickles as a call of ``os.mkdir(marker)``: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("command", ["finetune", "inspect"])
def test_a_pickled_model_file_is_refused_naming_it(command, model_dir, data_csv, tmp_path, capsys):
    evil = tmp_path / "evil-model"
    evil.mkdir()
    for p in model_dir.iterdir():
        if not p.name.endswith(".safetensors"):
            (evil / p.name).write_bytes(p.read_bytes())
    marker = tmp_path / "payload-ran"
    torch.save({"embeddings.word_embeddings.weight": Payload(marker)}, evil / "pytorch_model.bin")
    args = (finetune_args(evil, data_csv, tmp_path / "out", "--epochs", "1", "--no-export") if command == "finetune"
            else ["inspect", "--model", str(evil)])
    code, _, err = run_cli(args, capsys)
    line = one_error_line(err)
    assert code == 2
    assert f"'{evil / 'pytorch_model.bin'}'" in line and "not a plain weights file" in line, line
    assert "safetensors" in line and "weights_only" not in line, line
    assert not marker.exists()
    assert listing(tmp_path) == ["evil-model"]


@pytest.mark.parametrize("case", ["byte-order mark", "megabyte text"])
def test_a_csv_with_a_byte_order_mark_or_a_megabyte_text_trains(case, model_dir, tmp_path, capsys):
    rows = tiny_rows()
    if case == "megabyte text":
        rows[0]["text"] = " ".join(["game"] * 200_000)  # 1 MB in one field; tokenised, truncated to --max-length
    data = write_csv(tmp_path / "data.csv", rows, columns=("text", "label", "split"))
    if case == "byte-order mark":
        data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())  # as Excel's "CSV UTF-8" saves it
    code, _, err = run_cli(finetune_args(model_dir, data, tmp_path / "out", "--epochs", "1", "--no-export"),
                           capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "report.json").is_file()


def test_a_field_over_the_limit_names_the_record_and_the_limit(tmp_path, monkeypatch):
    import lsrfx.finetune.data as data_module

    monkeypatch.setattr(data_module, "MAX_FIELD_CHARS", 1000)
    rows = tiny_rows()
    rows[3]["text"] = "x" * 1001
    path = write_csv(tmp_path / "long.csv", rows)
    with pytest.raises(FinetuneError) as info:
        load_data(path)
    message = str(info.value)
    assert f"data file '{path}'" in message and "line 5" in message, message  # header is line 1, rows[3] line 5
    assert "longer than 1,000 characters" in message and "quote" not in message, message


@pytest.mark.parametrize(("file", "expected"), [
    ("report.json", "cannot write the output directory '{out}'"),  # the CLI's own write
    ("adapters.safetensors", "{out}/lsr-seed0/adapters"),  # lsrfx.save_adapters' error, told under --out's name
])
def test_disk_full_is_one_line_naming_the_output_and_keeps_the_old_one(file, expected, model_dir, data_csv,
                                                                        tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    real = Path.write_bytes

    def full(self, data):
        if file in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write(2) reports it: no file name
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, _, err = run_cli(finetune_args(model_dir, data_csv, out, "--epochs", "1", "--no-export", "--overwrite"),
                           capsys)
    line = one_error_line(err)
    assert code == 2
    assert expected.format(out=out) in line and "No space left on device" in line, line
    assert ".out.tmp-" not in line, line  # never the hidden staging directory's name
    assert listing(tmp_path) == ["out"] and listing(out) == ["previous.txt"]


# ---- row 10: --out that cannot be replaced, SIGTERM, kill -9 -------------------------------------------------


@pytest.mark.parametrize("where", [".", "..", "model", "data"])
def test_out_that_holds_the_working_directory_or_the_inputs_is_refused_up_front(where, tmp_path, capsys,
                                                                               monkeypatch):
    work = tmp_path / "work"
    for sub in ("model", "data"):
        (work / sub).mkdir(parents=True)
    save_tiny_model(work / "model")
    write_csv(work / "data" / "tiny.csv", tiny_rows())
    monkeypatch.chdir(work)
    capsys.readouterr()  # what saving the model printed
    before = {p: listing(p) for p in (tmp_path, work, work / "model", work / "data")}
    code, stdout, err = run_cli(finetune_args(Path("model"), Path("data/tiny.csv"), Path(where), "--overwrite"),
                                capsys)
    line = one_error_line(err)
    assert code == 2 and stdout == ""  # refused before any model is loaded or trained
    expected = {".": "the current directory", "..": "the current directory", "model": "the --model directory",
                "data": "the --data file"}[where]
    assert f"--out '{where}'" in line and expected in line, line
    assert {p: listing(p) for p in before} == before


def start_finetune(model: Path, data: Path, out: Path) -> subprocess.Popen:
    """``python -m lsrfx.cli finetune`` training for long enough to be stopped mid-run."""
    args = finetune_args(model, data, out, "--epochs", "100", "--patience", "0", "--no-export")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lsrfx.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until_training(proc: subprocess.Popen, parent: Path, timeout: float = 60.0) -> None:
    """Until a hidden staging directory of ``parent`` holds the first run's directory (training is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if any((p / "lsr-seed0").is_dir() for p in parent.iterdir() if p.name.startswith(".")):
            time.sleep(0.5)
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never started training")


def test_sigterm_is_handled_like_ctrl_c(model_dir, data_csv, tmp_path):
    proc = start_finetune(model_dir, data_csv, tmp_path / "out")
    try:
        wait_until_training(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "lsrfx: terminated (SIGTERM); no output was written.", err
    assert listing(tmp_path) == []


def test_the_next_run_removes_what_a_killed_run_left(model_dir, data_csv, tmp_path, capsys):
    out = tmp_path / "out"
    proc = start_finetune(model_dir, data_csv, out)
    try:
        wait_until_training(proc, tmp_path)
        proc.kill()  # SIGKILL: nothing can clean up
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    litter = listing(tmp_path)
    assert len(litter) == 1 and litter[0].startswith(".out."), litter  # the killed run's staging directory
    code, _, err = run_cli(finetune_args(model_dir, data_csv, out, "--epochs", "1", "--no-export"), capsys)
    assert code == 0, err
    assert listing(tmp_path) == ["out"]
