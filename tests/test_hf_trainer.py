"""Hugging Face ``Trainer`` with lsrfx adapters, every method (issue #9, items 1 and 2).

The recipe below is the Trainer guide's (docs/guides/trainer.md), line for line (the guide names a real base model
and task; here the base is a tiny random BERT saved with ``save_pretrained`` and the data are random token ids).
It trains eagerly for a few steps with a checkpoint every ``save_steps``, resumes a second, freshly adapted model
from the middle checkpoint, then ships the result three ways. Checked, for LoRA, LSR-Adapt, CondLoRA and GenLoRA:

* the checkpoints hold the adapters (and ``weight`` = ``W0 + dW`` for plain loaders); CondLoRA's save used to die
  on shared tensors;
* the resumed run ends bit-identical to the uninterrupted one (the checkpoint restored adapters, head, optimizer,
  scheduler and RNG), and it trained after resuming;
* ``from_pretrained`` of ``trainer.save_model``'s directory into the plain architecture reproduces the trained
  model's logits, with no missing key (before: ``query.weight`` / ``value.weight`` were re-initialised at random);
* ``save_pretrained`` of a merged model is a plain checkpoint; ``save_adapters`` / ``load_adapters`` reproduce the
  logits on the base model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

import lsrfx
from lsrfx.parametrization import adapter_parameters

from conftest import TINY_OPTIONS, tiny_bert

IDS = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(5))


class TrainSet(torch.utils.data.Dataset):
    """32 random sequences of 8 token ids with 3-class labels: what a tokenized dataset yields."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids, self.labels = torch.randint(1, 100, (32, 8), generator=g), torch.randint(0, 3, (32,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def recipe(method: str, base_dir: str, out: str, train_set: TrainSet) -> tuple:
    """The guide's recipe (only ``method=...`` and the tiny options differ)."""

    def adapted_model():
        model = AutoModelForSequenceClassification.from_pretrained(base_dir)
        return lsrfx.adapt(model, method=method, targets=["query", "value"], trainable=("classifier",),
                           **TINY_OPTIONS[method])

    args = TrainingArguments(out, max_steps=8, save_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to=[])
    model = adapted_model()
    trainer = Trainer(model=model, args=args, train_dataset=train_set)
    trainer.train()  # writes out/checkpoint-4 and out/checkpoint-8

    # Resume: the same base model adapted the same way, then the checkpoint restores adapters, head, optimizer, RNG.
    resumed = adapted_model()
    Trainer(model=resumed, args=args, train_dataset=train_set).train(resume_from_checkpoint=f"{out}/checkpoint-4")
    return model, trainer, resumed


def ship(model, trainer, out: str) -> None:
    """The guide's three ways to ship the trained model."""
    trainer.save_model(f"{out}/final")  # full checkpoint: from_pretrained gives the trained (merged) weights
    lsrfx.save_adapters(model, f"{out}/adapters")  # adapters only; lsrfx.load_adapters(base_model, dir)
    lsrfx.merge(model)  # or fold them in: a plain model
    model.save_pretrained(f"{out}/merged")


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base_model(base_dir: Path):
    return AutoModelForSequenceClassification.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'pretrained' base model: a tiny random BERT written with save_pretrained."""
    directory = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    tiny_bert().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(lsrfx.METHODS))
def run(request: pytest.FixtureRequest, base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    method, out = request.param, tmp_path_factory.mktemp(request.param)
    model, trainer, resumed = recipe(method, str(base_dir), str(out), TrainSet())
    result = {
        "method": method, "out": out,
        "final": {n: p.detach().clone() for n, p in adapter_parameters(model).items()},
        "head": model.classifier.weight.detach().clone(),
        "resumed": {n: p.detach().clone() for n, p in adapter_parameters(resumed).items()},
        "resumed_head": resumed.classifier.weight.detach().clone(),
        "logits": logits(model),
    }
    ship(model, trainer, str(out))
    result["merged_logits"] = logits(model)
    return result


def test_checkpoints_hold_the_adapters(run: dict) -> None:
    for step in (4, 8):
        saved = load_file(run["out"] / f"checkpoint-{step}" / "model.safetensors")
        assert set(run["final"]) <= set(saved), f"checkpoint-{step} lacks adapter tensors"
        assert "bert.encoder.layer.0.attention.self.query.weight" in saved  # W0 + dW, for plain loaders
    saved = load_file(run["out"] / "checkpoint-8" / "model.safetensors")
    for name, value in run["final"].items():
        assert torch.equal(saved[name], value)


def test_resume_from_checkpoint_ends_like_the_uninterrupted_run(run: dict) -> None:
    for name, value in run["final"].items():
        assert torch.equal(run["resumed"][name], value), f"{run['method']}: {name} differs after resume"
    assert torch.equal(run["resumed_head"], run["head"])
    at_resume = load_file(run["out"] / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(at_resume[n], v) for n, v in run["final"].items()), "nothing trained after resume"


def assert_merged_equal(merged: torch.Tensor, adapted: torch.Tensor) -> None:
    """A merged weight ``W0 + dW`` gives the adapted model's logits up to float rounding: the adapted layers compute
    ``x @ W0.T + s (x A^T) B^T`` and never form ``W0 + dW``."""
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-6)


def test_from_pretrained_of_saved_model_reproduces_trained_logits(run: dict, base_dir: Path) -> None:
    loaded, info = AutoModelForSequenceClassification.from_pretrained(run["out"] / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]  # before: query/value weights re-initialised
    assert info["unexpected_keys"] and all(".parametrizations.weight." in k for k in info["unexpected_keys"])
    assert_merged_equal(logits(loaded), run["logits"])
    assert not torch.allclose(logits(base_model(base_dir)), run["logits"], atol=1e-3), "training changed nothing"


def test_merged_save_pretrained_is_a_plain_checkpoint(run: dict, base_dir: Path) -> None:
    saved = load_file(run["out"] / "merged" / "model.safetensors")
    assert not any("parametrizations" in k for k in saved)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(run["out"] / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_merged_equal(logits(loaded), run["logits"])
    assert_merged_equal(run["merged_logits"], run["logits"])


def test_adapters_only_round_trip(run: dict, base_dir: Path) -> None:
    model = lsrfx.load_adapters(base_model(base_dir), run["out"] / "adapters")
    assert torch.equal(logits(model), run["logits"])
