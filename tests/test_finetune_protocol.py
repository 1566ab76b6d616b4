"""The ``lsrfx finetune`` training protocol on a tiny bag-of-embeddings classifier (no pretrained model, seconds):
the warm-up/decay schedule, keeping and restoring the best validation epoch, early stopping, weight decay, the
report's summary of the kept epoch, and the new flags' bad values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lsrfx.finetune.train as train_module
from lsrfx.cli import build_parser, main
from lsrfx.finetune import defaults
from lsrfx.finetune.batches import Encoded, batches
from lsrfx.finetune.errors import FinetuneError
from lsrfx.finetune.evaluate import Scores, evaluate
from lsrfx.finetune.report import format_table, summarise
from lsrfx.finetune.run import FinetuneSettings, check_settings
from lsrfx.finetune.train import TrainSettings, make_optimizer, schedule, train

N_CLASSES, VOCAB = 3, 12


class TinyClassifier(nn.Module):
    """Mean of token embeddings (masked), then a linear head; returns ``.loss`` (with labels) and ``.logits`` like
    a Hugging Face sequence classifier. ``adapter`` stands in for the adapter parameters, ``head`` for the head;
    ``frozen`` is a base weight that must never change."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Parameter(torch.randn(VOCAB, 4), requires_grad=False)
        self.adapter = nn.Parameter(torch.zeros(VOCAB, 4))
        self.head = nn.Linear(4, N_CLASSES)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = ((self.frozen + self.adapter)[input_ids] * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def tiny_split(n: int, seed: int) -> Encoded:
    """Texts of 2-5 tokens whose first token (``label * 4 + something``) gives the class away."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    ids = []
    for y in labels.tolist():
        length = int(torch.randint(2, 6, (1,), generator=g))
        ids.append([y * 4 + int(torch.randint(0, 4, (1,), generator=g)) for _ in range(length)])
    return Encoded(ids, labels, pad_id=0)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyClassifier()
    return model, [model.adapter], tiny_split(40, seed), batches(tiny_split(24, seed + 100), 8)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def settings(**kw) -> TrainSettings:
    return TrainSettings(**{"epochs": 5, "batch_size": 8, "lr": 0.1, "head_lr": 0.1, **kw})


def scripted_evaluate(monkeypatch, scores: list[tuple[float, float]]) -> list[dict[str, torch.Tensor]]:
    """Replace validation in ``train`` by a scripted sequence of (accuracy, loss); returns the model's state as it
    was at each validation (after each epoch)."""
    seen: list[dict[str, torch.Tensor]] = []

    def fake(model, _batches):
        accuracy, loss = scores[len(seen)]
        seen.append(state(model))
        return Scores(loss=loss, accuracy=accuracy, n=24)

    monkeypatch.setattr(train_module, "evaluate", fake)
    return seen


# ---- the learning-rate schedule ----------------------------------------------------------------------------------


def test_schedule_warms_up_over_the_fraction_then_decays_to_zero():
    f = schedule(100, 0.1)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(10) == 1.0 and f(55) == pytest.approx(0.5) and f(100) == 0.0 and f(120) == 0.0
    values = [f(s) for s in range(101)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))  # warm-up: non-decreasing
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # then non-increasing to 0
    assert max(values) == 1.0


def test_schedule_without_warmup_starts_at_one():
    f = schedule(50, 0.0)
    assert f(0) == 1.0 and f(25) == pytest.approx(0.5) and f(50) == 0.0
    values = [f(s) for s in range(51)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert schedule(1, 0.0)(0) == 1.0 and schedule(1, 0.0)(1) == 0.0  # a single step: no division by zero


def test_schedule_small_warmup_is_at_least_one_step_and_bad_fractions_are_refused():
    f = schedule(5, 0.01)  # 0.05 steps -> one warm-up step
    assert f(0) == 1.0 and f(1) == 1.0 and f(5) == 0.0
    assert schedule(10, 0.5)(4) == 1.0 and schedule(10, 0.5)(0) == pytest.approx(0.2)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="warmup"):
            schedule(10, bad)


def test_the_schedule_spans_the_planned_epochs_even_when_stopping_early(monkeypatch):
    model, params, data, val = setup()
    lrs: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    scripted_evaluate(monkeypatch, [(0.9, 0.1)] + [(0.5, 1.0)] * 9)
    history = train(model, params, data, val, settings(epochs=10, patience=1, warmup=0.0), seed=0)
    per_epoch = 5  # 40 examples, batch 8
    assert history.stopped_epoch == 2 and len(lrs) == 2 * per_epoch
    assert lrs == pytest.approx([0.1 * (50 - s) / 50 for s in range(10)])  # decay over 10 planned epochs


# ---- best-epoch selection and early stopping ---------------------------------------------------------------------


def test_best_epoch_is_restored_and_training_stops_after_patience(monkeypatch):
    model, params, data, val = setup()
    before = state(model)
    seen = scripted_evaluate(monkeypatch, [(0.5, 1.0), (0.7, 0.9), (0.6, 0.8), (0.6, 0.7), (0.6, 0.6),
                                           (0.9, 0.1), (0.9, 0.1)])
    history = train(model, params, data, val, settings(epochs=7, patience=3), seed=0)
    assert history.best_epoch == 2 and history.stopped_epoch == 5  # 2 + patience
    assert len(seen) == 5 and [v["epoch"] for v in history.validation] == [1, 2, 3, 4, 5]
    assert history.best_validation == history.validation[1] == {"epoch": 2, "step": 10, "loss": 0.9,
                                                                "accuracy": 0.7, "n": 24}
    assert len(history.losses) == len(history.step_times) == 5 * 5
    after = state(model)
    for name, value in after.items():
        assert torch.equal(value, seen[1][name]), name  # exactly the state validated after epoch 2
    assert not torch.equal(seen[1]["adapter"], seen[4]["adapter"])  # training did go on after epoch 2
    assert not torch.equal(seen[1]["head.weight"], seen[4]["head.weight"])  # the head is restored too
    assert not torch.equal(after["adapter"], before["adapter"])
    assert torch.equal(after["frozen"], before["frozen"])
    assert all(p.requires_grad for p in (model.adapter, *model.head.parameters()))


def test_equal_accuracy_keeps_the_lower_validation_loss(monkeypatch):
    model, params, data, val = setup()
    seen = scripted_evaluate(monkeypatch, [(0.6, 1.0), (0.6, 0.8), (0.6, 0.9), (0.6, 0.8)])
    history = train(model, params, data, val, settings(epochs=4, patience=0), seed=0)
    assert history.best_epoch == 2 and history.stopped_epoch == 4  # a later equal score does not replace it
    assert all(torch.equal(v, seen[1][k]) for k, v in state(model).items())


def test_patience_counts_from_the_kept_epoch(monkeypatch):
    # epoch 3 ties epoch 2's accuracy with a lower loss: it becomes the kept epoch and the count restarts
    model, params, data, val = setup()
    scripted_evaluate(monkeypatch, [(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (0.6, 0.7), (0.6, 0.6), (0.6, 0.5)])
    history = train(model, params, data, val, settings(epochs=6, patience=2), seed=0)
    assert (history.best_epoch, history.stopped_epoch) == (3, 5)


def test_zero_patience_trains_every_epoch_and_still_keeps_the_best(monkeypatch):
    model, params, data, val = setup()
    seen = scripted_evaluate(monkeypatch, [(0.8, 0.5)] + [(0.4, 1.0)] * 5)
    history = train(model, params, data, val, settings(epochs=6, patience=0), seed=0)
    assert (history.best_epoch, history.stopped_epoch, len(history.validation)) == (1, 6, 6)
    assert all(torch.equal(v, seen[0][k]) for k, v in state(model).items())


def test_the_last_epoch_kept_when_it_is_the_best(monkeypatch):
    model, params, data, val = setup()
    seen = scripted_evaluate(monkeypatch, [(0.5, 1.0), (0.6, 0.9), (0.7, 0.8)])
    history = train(model, params, data, val, settings(epochs=3, patience=1), seed=0)
    assert (history.best_epoch, history.stopped_epoch) == (3, 3)
    assert all(torch.equal(v, seen[2][k]) for k, v in state(model).items())


def test_real_validation_scores_match_the_restored_model():
    model, params, data, val = setup()
    history = train(model, params, data, val, settings(epochs=4, patience=1, lr=0.5, head_lr=0.5), seed=0)
    assert 1 <= history.best_epoch <= history.stopped_epoch <= 4
    best = history.validation[history.best_epoch - 1]
    assert history.best_validation == best
    assert all(v["accuracy"] <= best["accuracy"] for v in history.validation)
    again = evaluate(model, val)
    assert again.accuracy == best["accuracy"] and again.loss == pytest.approx(best["loss"], rel=1e-6)
    assert model.training  # train leaves the model in training mode, as before


def test_weight_decay_reaches_both_parameter_groups():
    model, params, _, _ = setup()
    optimizer = make_optimizer(model, params, settings(weight_decay=0.25))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.25, 0.25]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 2]  # adapter; head weight and bias
    assert TrainSettings(1, 1, 1.0, 1.0).weight_decay == defaults.WEIGHT_DECAY == 0.01


# ---- settings, report, CLI ---------------------------------------------------------------------------------------


def test_defaults_are_wired_through_settings_and_flags():
    s = FinetuneSettings(out=Path("unused"))
    assert (s.epochs, s.patience, s.warmup, s.weight_decay) == (
        defaults.EPOCHS, defaults.PATIENCE, defaults.WARMUP_FRACTION, defaults.WEIGHT_DECAY)
    t = TrainSettings(1, 1, 1.0, 1.0)
    assert (t.patience, t.warmup, t.weight_decay) == (defaults.PATIENCE, defaults.WARMUP_FRACTION,
                                                      defaults.WEIGHT_DECAY)
    args = build_parser(["finetune"]).parse_args(["finetune"])
    assert (args.epochs, args.patience, args.warmup, args.weight_decay) == (
        defaults.EPOCHS, defaults.PATIENCE, defaults.WARMUP_FRACTION, defaults.WEIGHT_DECAY)
    args = build_parser(["finetune"]).parse_args(["finetune", "--patience", "0", "--warmup", "0",
                                                  "--weight-decay", "0.1", "--epochs", "9"])
    assert (args.epochs, args.patience, args.warmup, args.weight_decay) == (9, 0, 0.0, 0.1)
    check_settings(dataclasses.replace(s, patience=0, warmup=0.0, weight_decay=0.0))  # the edges are allowed


@pytest.mark.parametrize(("field", "value", "flag", "allowed"), [
    ("patience", -1, "--patience", ">= 0"),
    ("warmup", 1.5, "--warmup", "[0, 1)"),
    ("warmup", 1.0, "--warmup", "[0, 1)"),
    ("warmup", -0.1, "--warmup", "[0, 1)"),
    ("warmup", float("nan"), "--warmup", "[0, 1)"),
    ("weight_decay", -0.1, "--weight-decay", ">= 0"),
    ("weight_decay", float("inf"), "--weight-decay", ">= 0"),
])
def test_check_settings_refuses_bad_protocol_values(field, value, flag, allowed):
    with pytest.raises(FinetuneError) as info:
        check_settings(dataclasses.replace(FinetuneSettings(out=Path("unused")), **{field: value}))
    message = str(info.value)
    assert message.startswith(flag + " ") and allowed in message and f"got {value}" in message


@pytest.mark.parametrize(("args", "expected"), [
    (["--patience", "-1"], "--patience must be >= 0 (got -1)"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1)"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0 (got -0.1)"),
])
def test_cli_refuses_bad_protocol_values_in_one_line(args, expected, tmp_path, capsys):
    code = main(["finetune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                 "--threads", str(torch.get_num_threads()), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("lsrfx: error: ") and expected in err, err
    assert list(tmp_path.iterdir()) == []  # refused before the model directory is even looked at


def run_record(method: str, seed: int, accs: list[float], best: int | None, test: float) -> dict:
    record = {"method": method, "seed": seed, "options": {}, "lr": 1e-2, "adapter_params": 10, "head_params": 3,
              "step_time_s": 0.1, "train_seconds": 1.0, "test": {"accuracy": test},
              "validation": [{"epoch": e, "step": 5 * e, "loss": 1.0 - a, "accuracy": a}
                             for e, a in enumerate(accs, 1)]}
    if best is not None:
        record |= {"best_epoch": best, "best_validation": record["validation"][best - 1],
                   "stopped_epoch": len(accs)}
    return record


def test_summary_reports_the_kept_epochs_validation_accuracy():
    runs = [run_record("lsr", 0, [0.5, 0.8, 0.6], 2, 0.7), run_record("lsr", 1, [0.6, 0.7, 0.9], 3, 0.8)]
    (row,) = summarise(runs)
    assert row["validation_accuracy_mean"] == pytest.approx(0.85)  # 0.8 and 0.9, not the last epochs' 0.6, 0.9
    assert row["best_epochs"] == [2, 3] and row["stopped_epochs"] == [3, 3]
    assert "| 85.00 +- 7.07 | 2, 3 |" in format_table([row])


def test_summary_of_a_report_without_best_epochs_uses_the_last_epoch():
    (row,) = summarise([run_record("lora", 0, [0.5, 0.8, 0.6], None, 0.7)])  # written by an earlier version
    assert row["validation_accuracy_mean"] == pytest.approx(0.6)
    assert row["best_epochs"] == [3] and row["stopped_epochs"] == [3]
